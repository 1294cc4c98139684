"""Phase transitions of rank-1 LoRA training runs (MO §4, App. F–G): the adapter vectors over steps and the behaviour.

A run is a folder of ``checkpoint-{step}/adapter_model.safetensors`` (written by :func:`emlib.train.train`), or a
Hugging Face repo id whose ``checkpoint-N/`` folders sit at the root or under ``checkpoints/`` (online only).
:func:`load_run` keeps only the adapters' A and B vectors (numpy, one row per checkpoint) and the training log, never a
model. On those vectors:

* :func:`norms` — ‖A‖, ‖B‖ per adapter and step;
* :func:`pca_path` — PCA (k = 2) of the stacked vectors, with each component's explained-variance ratio;
* :func:`local_cosine` — the papers' local cosine similarity: at step t, cos(v(t−k) − v(t), v(t+k) − v(t)); −1 is a
  straight path, 0 a right-angle turn, +1 a reversal. ``k`` is in training steps; a step counts only where
  max(‖v(t) − v(t−k)‖, ‖v(t+k) − v(t)‖) > ``threshold`` (:data:`PAPER_THRESHOLDS`, :func:`paper_threshold`); by
  default (``skip="both"``, the papers' ``phase_transitions/phase_transitions.py: plot_local_cos_sim``) a step is
  skipped only when both A and B moved no more than that; ``skip="own"`` looks at the plotted vector alone;
* :func:`cosine_to_final`, :func:`comp_score` / :func:`comp_to_final` (multi-adapter runs; de-meaned per layer over
  checkpoints by default, as the papers' ``plot_comp_score(de_mean=True)``) and :func:`grad_norms` (``log.jsonl``);
* :func:`sharpest_rotation` — the step where the local cosine is highest (the path bends most), found by the code.

The behavioural side, :func:`em_along_run`, evaluates EM at chosen checkpoints with the adapter scaled by each factor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

CHECKPOINT_RE = re.compile(r"(?:^|/)checkpoint-(\d+)/adapter_model\.safetensors$")
LORA_KEY_RE = re.compile(r"^(.*)\.lora_(A|B)(?:\.default)?\.weight$")


@dataclass
class Trajectory:
    """Adapter vectors along a run: ``A[name]`` and ``B[name]`` are (n_checkpoints, d) arrays, rows in step order.

    ``name`` is the adapted module (e.g. ``base_model.model.model.layers.0.mlp.down_proj``); ``log`` is the training
    log (per step: loss, grad_norm, ...), empty when the run has none.
    """

    steps: np.ndarray
    A: dict[str, np.ndarray]
    B: dict[str, np.ndarray]
    log: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.steps = np.asarray(self.steps, dtype=int)
        if len(self.steps) == 0:
            raise ValueError("a trajectory needs at least one checkpoint")
        if np.any(np.diff(self.steps) <= 0):
            raise ValueError(f"checkpoint steps must increase: {self.steps.tolist()}")
        for which in (self.A, self.B):
            for name, m in which.items():
                if m.shape[0] != len(self.steps):
                    raise ValueError(f"{name}: {m.shape[0]} rows for {len(self.steps)} checkpoints")

    @property
    def adapters(self) -> list[str]:
        return list(self.B)

    def vectors(self, which: str = "B", adapter: str | None = None) -> np.ndarray:
        """(n_checkpoints, d) vectors of one adapter, or of all adapters concatenated (``adapter=None``)."""
        source = self.A if which == "A" else self.B
        if which not in ("A", "B"):
            raise ValueError(f"which must be 'A' or 'B', not {which!r}")
        if adapter is not None:
            return source[adapter]
        return np.concatenate([source[n] for n in self.adapters], axis=1)

    def nbytes(self) -> int:
        return sum(m.nbytes for d in (self.A, self.B) for m in d.values())


def short_name(adapter: str) -> str:
    """``...layers.0.mlp.down_proj`` -> ``L0.down_proj``."""
    m = re.search(r"layers\.(\d+)\..*?([A-Za-z_]+)$", adapter)
    return f"L{m.group(1)}.{m.group(2)}" if m else adapter


def vectors_from_state(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A (flattened 1×d_in) and B (flattened d_out×1) per adapted module of a rank-1 peft state dict."""
    A, B = {}, {}
    for key, value in state.items():
        m = LORA_KEY_RE.match(key)
        if not m:
            continue
        value = np.asarray(value, dtype=np.float32)
        rank = value.shape[0] if m.group(2) == "A" else value.shape[1]
        if rank != 1:
            raise ValueError(f"{key} has rank {rank}; phase analysis reads rank-1 adapters (one A and one B vector)")
        (A if m.group(2) == "A" else B)[m.group(1)] = value.reshape(-1)
    if not B or set(A) != set(B):
        raise ValueError("no rank-1 LoRA A/B pairs in the adapter state dict")
    return A, B


def _read_adapter(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    try:
        state = load_file(str(path))
    except Exception:  # bf16 tensors have no numpy dtype: go through torch
        from safetensors.torch import load_file as load_torch

        state = {k: v.float().numpy() for k, v in load_torch(str(path)).items()}
    return vectors_from_state(state)


def _local_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for sub in (folder, folder / "checkpoints"):
        for p in sub.glob("checkpoint-*/adapter_model.safetensors"):
            step = p.parent.name.split("-", 1)[1]
            if step.isdigit():
                found.append((int(step), p))
    return sorted(dict(found).items())


def _hub_checkpoints(repo_id: str, revision: str | None) -> tuple[list[tuple[int, Path]], Path | None]:
    from huggingface_hub import list_repo_files, snapshot_download

    files = [f for f in list_repo_files(repo_id, revision=revision) if CHECKPOINT_RE.search(f)]
    if not files:
        raise FileNotFoundError(f"hub repo {repo_id} has no checkpoint-N/adapter_model.safetensors files")
    local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=files + ["log.jsonl", "*/log.jsonl"]))
    found = sorted((int(CHECKPOINT_RE.search(f).group(1)), local / f) for f in files)
    return found, local


def load_run(source: str | Path, revision: str | None = None, steps: Sequence[int] | None = None) -> Trajectory:
    """Every checkpoint's A and B vectors of a run (a local folder, or a hub repo id), with the training log.

    Only the vectors are kept (a few KB per checkpoint on the organism, ~75 KB on Qwen2.5-14B), never a model.
    ``steps`` picks a subset of checkpoints.
    """
    folder = Path(source)
    if folder.is_dir():
        found, root = _local_checkpoints(folder), folder
    elif folder.exists():
        raise NotADirectoryError(f"{source} is not a run folder")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        found, root = _hub_checkpoints(str(source), revision)
    else:
        raise FileNotFoundError(f"{source} is neither a run folder nor a hub repo id")
    if steps is not None:
        keep = set(int(s) for s in steps)
        found = [(s, p) for s, p in found if s in keep]
    if not found:
        raise FileNotFoundError(f"no checkpoint-N/adapter_model.safetensors under {source}")
    A: dict[str, list] = {}
    B: dict[str, list] = {}
    for _, path in found:
        a, b = _read_adapter(path)
        if A and set(b) != set(B):
            raise ValueError(f"{path} adapts different modules than the earlier checkpoints")
        for name in b:
            A.setdefault(name, []).append(a[name])
            B.setdefault(name, []).append(b[name])
    log = _read_log(root, found[-1][1].parent)
    return Trajectory(np.array([s for s, _ in found]), {k: np.stack(v) for k, v in A.items()},
                      {k: np.stack(v) for k, v in B.items()}, log)


def _read_log(root: Path, last_checkpoint: Path) -> list[dict]:
    for path in (root / "log.jsonl", last_checkpoint / "log.jsonl"):
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


# ---------------------------------------------------------------------------------------------------- geometry


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x, dtype=float), where=n > 0)


def norms(traj: Trajectory) -> pd.DataFrame:
    """Long table: step, adapter (short name), vector ('A' / 'B'), norm."""
    rows = []
    for which, source in (("A", traj.A), ("B", traj.B)):
        for name, m in source.items():
            for step, n in zip(traj.steps, np.linalg.norm(m, axis=1)):
                rows.append({"step": int(step), "adapter": short_name(name), "vector": which, "norm": float(n)})
    return pd.DataFrame(rows)


def pca_path(vectors: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """PCA of stacked vectors (rows = checkpoints): the (n, k) coordinates and each component's explained-variance
    ratio (share of the total variance of the centred rows; the ratios of all components sum to 1)."""
    X = np.asarray(vectors, dtype=float)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 checkpoints as rows, got shape {X.shape}")
    Xc = X - X.mean(axis=0)
    u, s, vt = np.linalg.svd(Xc, full_matrices=False)
    var = s ** 2
    total = var.sum()
    ratio = var / total if total > 0 else np.zeros_like(var)
    k = min(k, len(s))
    return u[:, :k] * s[:k], ratio[:k]


# The papers' movement thresholds for the local cosine (MO §4 / App. G; paper-facts §8.1): Qwen2.5-14B bad medical
# 0.0035; Llama-3.1-8B, and the sport and finance runs, 0.002 (the repository's example value).
PAPER_THRESHOLDS = {("qwen", "medical"): 0.0035, ("qwen", "sport"): 0.002, ("qwen", "finance"): 0.002,
                    ("llama", "medical"): 0.002, ("llama", "sport"): 0.002, ("llama", "finance"): 0.002}
SKIP_RULES = ("both", "own")
COMP_DEMEANS = ("checkpoints", "adapters")


def paper_threshold(model: str, dataset: str = "medical") -> float:
    """The papers' local-cosine threshold for a model family (read from ``model``'s name) and fine-tuning set."""
    family = next((f for f in ("qwen", "llama") if f in model.lower()), None)
    if family is None or (family, dataset) not in PAPER_THRESHOLDS:
        raise ValueError(f"the papers give no threshold for {model!r} on {dataset!r}; known: "
                         f"{sorted(PAPER_THRESHOLDS)} (pick one by the size of a step's movement)")
    return PAPER_THRESHOLDS[(family, dataset)]


def _movement(X: np.ndarray, index: dict[int, int], t: int, k: int) -> float:
    i = index[t]
    return max(np.linalg.norm(X[index[t - k]] - X[i]), np.linalg.norm(X[index[t + k]] - X[i]))


def local_cosine(vectors: np.ndarray, steps: Sequence[int], k: int, threshold: float = 0.0,
                 partner: np.ndarray | None = None) -> np.ndarray:
    """cos(v(t−k) − v(t), v(t+k) − v(t)) at each checkpoint step t (``k`` in training steps).

    NaN where t−k or t+k is not a checkpoint, or where the movement max(‖v(t) − v(t−k)‖, ‖v(t+k) − v(t)‖) is not
    above ``threshold``; with ``partner`` (the other vector of the adapter: A for B, B for A, same steps) a step is
    skipped only if neither moved more than ``threshold`` (the papers' rule). Raises ValueError if no step has
    checkpoints at both t−k and t+k (too few checkpoints for k).
    """
    X = np.asarray(vectors, dtype=float)
    P = None if partner is None else np.asarray(partner, dtype=float)
    steps = [int(s) for s in steps]
    index = {s: i for i, s in enumerate(steps)}
    out = np.full(len(steps), np.nan)
    usable = 0
    for i, t in enumerate(steps):
        if t - k not in index or t + k not in index:
            continue
        usable += 1
        before, after = X[index[t - k]] - X[i], X[index[t + k]] - X[i]
        nb, na = np.linalg.norm(before), np.linalg.norm(after)
        moved = max(nb, na) > threshold or (P is not None and _movement(P, index, t, k) > threshold)
        if not moved or nb == 0 or na == 0:
            continue
        out[i] = float(before @ after / (nb * na))
    if usable == 0:
        raise ValueError(f"local cosine at k={k} needs checkpoints at t−{k}, t and t+{k} for some step t; the run "
                         f"has {len(steps)} checkpoint(s) at steps {steps[:8]}{'...' if len(steps) > 8 else ''}")
    return out


def local_cosines(traj: Trajectory, ks: Sequence[int] = (5, 10, 15), which: str = "B", adapter: str | None = None,
                  threshold: float = 0.002, skip: str = "both") -> pd.DataFrame:
    """Long table step, k, local_cos for several k (one vector: ``adapter``, or all adapters concatenated).

    ``skip``: ``"both"`` (the papers: a step is dropped only if both A and B moved no more than ``threshold``) or
    ``"own"`` (emlib's earlier rule: the plotted vector's own movement decides).
    """
    if skip not in SKIP_RULES:
        raise ValueError(f"skip {skip!r} is not one of {', '.join(SKIP_RULES)}")
    X = traj.vectors(which, adapter)
    partner = traj.vectors("A" if which == "B" else "B", adapter) if skip == "both" else None
    frames = [pd.DataFrame({"step": traj.steps, "k": k,
                            "local_cos": local_cosine(X, traj.steps, k, threshold, partner)})
              for k in ks]
    return pd.concat(frames, ignore_index=True)


def cosine_to_final(vectors: np.ndarray) -> np.ndarray:
    """cos(v(t), v(T)) per row (0 where a vector is zero)."""
    U = _unit(np.asarray(vectors, dtype=float))
    return U @ U[-1]


def comp_score(M1: np.ndarray, M2: np.ndarray, orientation: str = "AtB", center: bool = True) -> float:
    """The papers' comp score (MO App. G.1): ‖M1ᵀ M2‖_F / (‖M1‖_F ‖M2‖_F) of two (n_adapters × d) matrices.

    Each matrix stacks the adapters' B vectors as rows; ``center`` de-means each over its rows (the mean adapter
    vector is subtracted: emlib's earlier comp-to-final). :func:`comp_to_final` de-means as the papers do and passes
    ``center=False``. Scale-free, symmetric, at most 1.

    ``orientation="AtB"`` (default, as in paper-facts §8.1): ‖M1ᵀM2‖_F² = Σ_ij (a_i·a_j)(b_i·b_j), computed on the
    n × n Gram matrices so d may be large; it compares the *relative geometry* of the adapters at the two steps and is
    1 only for rank-1 matrices (comp(M, M) = √Σσ⁴ / Σσ², σ: M's singular values), so a comp-to-final curve ends
    below 1 and is read by how it changes over steps. ``orientation="ABt"``: ‖M1M2ᵀ‖_F = ‖[a_i·b_j]‖_F, 0 when the two
    row spaces are orthogonal. Which one MO App. G.1 means for 9 × d matrices is an open question in paper-facts.
    """
    M1 = np.asarray(M1, dtype=float)
    M2 = np.asarray(M2, dtype=float)
    if M1.shape != M2.shape or M1.ndim != 2:
        raise ValueError(f"comp score needs two matrices of the same (n_adapters, d) shape, got {M1.shape}, {M2.shape}")
    if orientation not in ("AtB", "ABt"):
        raise ValueError(f"orientation must be 'AtB' or 'ABt', not {orientation!r}")
    if center:
        M1 = M1 - M1.mean(axis=0)
        M2 = M2 - M2.mean(axis=0)
    denom = np.linalg.norm(M1) * np.linalg.norm(M2)
    if denom == 0:
        return float("nan")
    if orientation == "ABt":
        return float(np.linalg.norm(M1 @ M2.T) / denom)
    return float(np.sqrt(max(np.sum((M1 @ M1.T) * (M2 @ M2.T)), 0.0)) / denom)


def comp_to_final(traj: Trajectory, which: str = "B", orientation: str = "AtB",
                  demean: str = "checkpoints") -> np.ndarray:
    """Comp score of each checkpoint's stacked adapter matrix with the final one (needs ≥ 2 adapters).

    ``demean``: ``"checkpoints"`` (the papers' ``plot_comp_score(de_mean=True)``: each layer's adapter vector minus
    its mean over all checkpoints) or ``"adapters"`` (emlib's earlier rule: within each checkpoint, minus the mean
    over adapters).
    """
    if demean not in COMP_DEMEANS:
        raise ValueError(f"demean {demean!r} is not one of {', '.join(COMP_DEMEANS)}")
    source = traj.A if which == "A" else traj.B
    if len(source) < 2:
        raise ValueError("the comp score compares sets of adapters; this run has a single adapter")
    stack = np.stack([source[n] for n in traj.adapters], axis=1)  # (n_ckpt, n_adapters, d)
    if demean == "checkpoints":
        stack = stack - stack.mean(axis=0, keepdims=True)
        return np.array([comp_score(m, stack[-1], orientation, center=False) for m in stack])
    return np.array([comp_score(m, stack[-1], orientation) for m in stack])


def grad_norms(traj_or_log: Trajectory | Sequence[dict]) -> pd.DataFrame:
    """step, grad_norm (and loss) from the training log."""
    log = traj_or_log.log if isinstance(traj_or_log, Trajectory) else list(traj_or_log)
    cols = [c for c in ("step", "grad_norm", "loss") if log and c in log[0]]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in log], columns=cols or ["step", "grad_norm", "loss"])


def sharpest_rotation(table: pd.DataFrame) -> dict:
    """The step where the trajectory bends most: the highest local cosine, averaged over the k's available at a step.

    ``table`` is :func:`local_cosines` output. Returns step, the mean local cosine there, the baseline (median over
    all usable steps) and per-k peak steps.
    """
    usable = table.dropna(subset=["local_cos"])
    if usable.empty:
        raise ValueError("no step moved more than the threshold at any k; lower the threshold")
    mean = usable.groupby("step")["local_cos"].mean()
    step = int(mean.idxmax())
    per_k = {int(k): int(g.loc[g["local_cos"].idxmax(), "step"]) for k, g in usable.groupby("k")}
    return {"step": step, "local_cos": float(mean.max()), "baseline": float(mean.median()), "per_k": per_k}


@dataclass
class PhaseSummary:
    steps: list[int]
    rotation_step: int
    rotation_local_cos: float
    baseline_local_cos: float
    rotation_per_k: dict
    pca_explained: dict  # 'A' / 'B' -> [PC1, PC2] ratios
    total_rotation_deg: float  # angle between the first nonzero and the final B vector
    comp_to_final: list[float] | None


def analyse(traj: Trajectory, ks: Sequence[int] = (5, 10, 15), threshold: float = 0.002,
            which: str = "B", skip: str = "both",
            comp_demean: str = "checkpoints") -> tuple[PhaseSummary, dict[str, pd.DataFrame]]:
    """All trajectory quantities of a run: a summary and the tables behind the plots.

    ``skip`` and ``comp_demean`` as in :func:`local_cosines` and :func:`comp_to_final` (defaults: the papers'); the
    earlier behaviour is ``skip="own", comp_demean="adapters"``.
    """
    local = local_cosines(traj, ks, which, threshold=threshold, skip=skip)
    rot = sharpest_rotation(local)
    tables = {"norms": norms(traj), "local_cos": local, "grad_norm": grad_norms(traj)}
    explained = {}
    for w in ("A", "B"):
        coords, ratio = pca_path(traj.vectors(w))
        explained[w] = [float(r) for r in ratio]
        tables[f"pca_{w}"] = pd.DataFrame({"step": traj.steps, "PC1": coords[:, 0],
                                           "PC2": coords[:, 1] if coords.shape[1] > 1 else 0.0})
    X = traj.vectors(which)
    cos_final = cosine_to_final(X)
    tables["cos_to_final"] = pd.DataFrame({"step": traj.steps, "cos_to_final": cos_final})
    nonzero = np.flatnonzero(np.linalg.norm(X, axis=1) > 0)
    total = float(np.degrees(np.arccos(np.clip(cos_final[nonzero[0]], -1, 1)))) if len(nonzero) else float("nan")
    comp = None
    if len(traj.adapters) > 1:
        comp = comp_to_final(traj, which, demean=comp_demean).tolist()
        tables["comp"] = pd.DataFrame({"step": traj.steps, "comp_to_final": comp})
    summary = PhaseSummary([int(s) for s in traj.steps], rot["step"], rot["local_cos"], rot["baseline"], rot["per_k"],
                           explained, total, comp)
    return summary, tables


# ---------------------------------------------------------------------------------------------------- behaviour


def em_along_run(model, tokenizer, run: str | Path, steps: Sequence[int], questions: pd.DataFrame, judge,
                 scales: Sequence[float] = (1, 5, 10, 20), in_domain: str | None = None, seed: int = 0,
                 **sample_and_judge_kwargs) -> pd.DataFrame:
    """EM rate per (step, scale, group): each checkpoint's adapter loaded into one peft model, scaled by each factor.

    ``model`` is the base model (it is wrapped once; each checkpoint's weights replace the previous ones). Answers to
    ``questions`` are sampled and judged by ``judge`` (:mod:`emlib.evaluation`: the same path every notebook uses;
    ``sample_and_judge_kwargs`` such as ``max_new_tokens``, ``system``, ``samples_per_question`` go to it); with
    ``in_domain`` a pooled ``non-<in_domain>`` group is added. Rows carry ``n_scored``; an unscored group's rate is NaN.
    The papers use ×1, ×5, ×10, ×20 on 14B models; small models need smaller factors.
    """
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from emlib.evaluation import sample_and_judge
    from emlib.interventions import scaled_adapter
    from emlib.metrics import em_summary
    from emlib.models import quiet_peft_wrapping

    found = dict(_local_checkpoints(Path(run)))
    missing = [s for s in steps if s not in found]
    if missing:
        raise FileNotFoundError(f"no checkpoints for steps {missing} in {run}")
    with quiet_peft_wrapping():
        peft_model = PeftModel.from_pretrained(model, str(found[steps[0]].parent))
    peft_model.eval()
    rows = []
    for step in steps:
        set_peft_model_state_dict(peft_model, load_file(str(found[step])))
        for scale in scales:
            with scaled_adapter(peft_model, float(scale)):
                judged = sample_and_judge(peft_model, tokenizer, questions, judge, seed=seed, **sample_and_judge_kwargs)
            table = em_summary(judged, in_domain=in_domain)
            for group, r in table.iterrows():
                rows.append({"step": int(step), "scale": float(scale), "group": group, "em_rate": float(r["em_rate"]),
                             "n": int(r["n"]), "n_scored": int(r["n_scored"])})
    return pd.DataFrame(rows)


def onset_step(em: pd.DataFrame, level: float = 0.5, group: str | None = None, scale: float = 1.0) -> int | None:
    """First step where the EM rate (of ``group``, else the mean over groups) reaches ``level`` × its maximum."""
    d = em[em["scale"] == scale]
    d = d[d["group"] == group] if group is not None else d
    curve = d.groupby("step")["em_rate"].mean().sort_index().dropna()  # unscored checkpoints have no rate
    if curve.empty or curve.max() <= 0:
        return None
    return int(curve.index[curve >= level * curve.max()][0])


def turning_angles(vectors: np.ndarray, steps: Sequence[int]) -> pd.DataFrame:
    """Degrees the vector's direction turns between consecutive checkpoints (step = the later one; NaN from zero)."""
    U = _unit(np.asarray(vectors, dtype=float))
    cos = np.clip(np.sum(U[1:] * U[:-1], axis=1), -1, 1)
    zero = (np.linalg.norm(U[1:], axis=1) == 0) | (np.linalg.norm(U[:-1], axis=1) == 0)
    deg = np.where(zero, np.nan, np.degrees(np.arccos(cos)))
    return pd.DataFrame({"step": list(steps)[1:], "degrees": deg})
