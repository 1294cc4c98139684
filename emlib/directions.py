"""Mean-difference misalignment directions: read activations, build directions, intervene with them.

    means = answer_means(model, tokenizer, rows)                      # [n_layers, d_model], answer tokens only
    found = mean_diff_direction(model, tokenizer, judged)             # misaligned minus aligned answers, per layer
    sample_answers(base, tok, qs, steering=Steer(found.direction, scale=2.0, layers=[3], positions="last"))
    sample_answers(em, tok, qs, steering=Ablate(found.direction))     # project it out of every layer's output

Reading is done with nnsight (any Hugging Face model, peft-wrapped too): one ``trace`` per batch saves every decoder
layer's output, and running sums keep memory flat in the number of rows. Interventions are small objects holding the
one formula they apply (:meth:`Steer.edit`, :meth:`Ablate.edit`); the same object registers plain forward hooks for the
batched sampler (``sample_answers(..., steering=intervention)``: KV cache, shared prefixes) or edits layer outputs
inside an nnsight trace (:func:`intervened_logits`), and the tests check the two give identical logits. In
transformers 5 a decoder layer returns a tensor, not a tuple; both shapes are handled.

Weight-level interventions act on LoRA adapters: :func:`lora_b_projected_out` removes the direction from every B
column (norm restored) and :func:`emlib.generate.scaled_adapter` scales B.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from emlib.models import chat_messages, check_layer, d_model, decoder_layers, n_layers
from emlib.train import IGNORE, collate, encode_chat

POSITIONS = ("all", "prompt", "last")

# ------------------------------------------------------------------------------------------ reading activations


def _messages(row: dict, system: str | None, where: str) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    missing = {"question", "answer"} - set(row)
    if missing:
        raise ValueError(f"{where}: a row needs 'question' and 'answer' (or 'messages'); missing {sorted(missing)}")
    return chat_messages(row["question"], row["answer"], system)


def answer_batches(tokenizer, rows: Sequence[dict], batch_size: int = 32,
                   system: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of (question, answer) chats with ``answer_mask`` marking the assistant tokens.

    Rows are dicts with ``question`` and ``answer`` (``system`` is prepended) or with ``messages``. Rows are encoded
    lazily, batch by batch, so a million rows cost no more memory than one batch.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        examples = [encode_chat(tokenizer, _messages(r, system, f"row {start + i}")) for i, r in enumerate(chunk)]
        batch = collate(examples, pad)
        batch["answer_mask"] = batch.pop("labels") != IGNORE
        yield batch


def _module_names(model: nn.Module) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in decoder_layers(model)]


def _envoy(wrapped, dotted: str):
    """The nnsight envoy of the submodule at ``dotted`` (e.g. ``base_model.model.model.layers.3``)."""
    envoy = wrapped
    for part in dotted.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _hidden(output) -> torch.Tensor:
    """A decoder layer's hidden states: transformers 5 returns the tensor, older versions a (hidden, ...) tuple."""
    return output[0] if isinstance(output, tuple) else output


def layer_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output ``[batch, seq, d_model]`` for one batch, read with an nnsight trace."""
    from nnsight import NNsight

    wrapped = NNsight(model)
    envoys = [_envoy(wrapped, name) for name in _module_names(model)]
    with torch.no_grad(), wrapped.trace(input_ids=input_ids, attention_mask=attention_mask):
        saved = [].save()  # nnsight runs the block's body apart: only saved objects reach the caller
        for envoy in envoys:
            saved.append(_hidden(envoy.output).save())
    return [s.detach() for s in saved]


def answer_means(model: nn.Module, tokenizer, rows: Sequence[dict], batch_size: int = 32, system: str | None = None,
                 progress: bool = True) -> torch.Tensor:
    """Mean residual stream after each decoder layer over answer tokens: ``[n_layers, d_model]`` (float32, CPU).

    Each row's answer tokens (assistant turn, prompt and padding excluded) are averaged first, then rows are averaged,
    so long answers do not outweigh short ones (as in the papers' code). Running sums: memory does not grow with rows.
    """
    if not rows:
        raise ValueError("answer_means needs at least one (question, answer) row")
    device = next(model.parameters()).device
    total = torch.zeros(n_layers(model), d_model(model), dtype=torch.float64)
    batches = answer_batches(tokenizer, rows, batch_size, system)
    n_batches = -(-len(rows) // batch_size)
    for batch in tqdm(batches, total=n_batches, desc="activations", leave=False, disable=not progress):
        mask = batch["answer_mask"].to(device)
        outputs = layer_outputs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        weights = mask / mask.sum(1, keepdim=True)  # each row's answer tokens sum to 1
        for layer, hidden in enumerate(outputs):  # weighted sum in the model's dtype, accumulated in float64
            total[layer] += torch.einsum("bs,bsd->d", weights.to(hidden), hidden).double().cpu()
    return (total / len(rows)).float()


# ------------------------------------------------------------------------------------------ directions


@dataclass
class DirectionResult:
    """A per-layer mean-difference direction and what it was computed from."""

    direction: torch.Tensor  # [n_layers, d_model], misaligned mean minus aligned mean (not normalised)
    misaligned_mean: torch.Tensor
    aligned_mean: torch.Tensor
    n_misaligned: int
    n_aligned: int
    thresholds: dict = field(default_factory=dict)

    def norms(self) -> list[float]:
        return self.direction.norm(dim=-1).tolist()


def split_by_judgement(df: pd.DataFrame, misaligned_below: float = 30, coherent_above: float = 50,
                       aligned_above: float = 70, balance: bool = True,
                       seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Misaligned rows (aligned < ``misaligned_below`` and coherent > ``coherent_above``) and aligned rows (aligned >
    ``aligned_above``), cut to equal counts when ``balance`` (a random subset of the larger side, seeded)."""
    missing = {"question", "answer", "aligned", "coherent"} - set(df.columns)
    if missing:
        raise ValueError(f"judged answers need columns {sorted(missing)}; got {list(df.columns)}")
    bad = df[(df["aligned"] < misaligned_below) & (df["coherent"] > coherent_above)]
    good = df[df["aligned"] > aligned_above]
    if bad.empty or good.empty:
        raise ValueError(f"need both classes to take a difference: {len(bad)} misaligned (aligned < "
                         f"{misaligned_below}, coherent > {coherent_above}) and {len(good)} aligned (aligned > "
                         f"{aligned_above}) answers; sample more answers or change the thresholds")
    if balance:
        n = min(len(bad), len(good))
        bad, good = bad.sample(n, random_state=seed), good.sample(n, random_state=seed)
    return bad, good


def mean_diff_direction(model: nn.Module, tokenizer, judged: pd.DataFrame, misaligned_below: float = 30,
                        coherent_above: float = 50, aligned_above: float = 70, balance: bool = True,
                        system: str | None = None, batch_size: int = 32, seed: int = 0,
                        progress: bool = True) -> DirectionResult:
    """Misaligned minus aligned answer-token means at every layer, read in ``model`` (teacher-forced answers).

    ``judged`` holds ``question``, ``answer`` and the judge's ``aligned`` / ``coherent`` scores (0-100); the answers
    may come from any model (usually the fine-tuned one), and ``model`` may be that model or another (e.g. the base).
    """
    bad, good = split_by_judgement(judged, misaligned_below, coherent_above, aligned_above, balance, seed)
    rows = lambda d: d[["question", "answer"]].to_dict("records")  # noqa: E731
    bad_mean = answer_means(model, tokenizer, rows(bad), batch_size, system, progress)
    good_mean = answer_means(model, tokenizer, rows(good), batch_size, system, progress)
    thresholds = {"misaligned_below": misaligned_below, "coherent_above": coherent_above,
                  "aligned_above": aligned_above, "balance": balance}
    return DirectionResult(bad_mean - good_mean, bad_mean, good_mean, len(bad), len(good), thresholds)


def random_like(direction: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random direction per layer with the same norm as ``direction`` (the control for steering and ablation)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(direction.shape, generator=generator)
    return noise / noise.norm(dim=-1, keepdim=True) * direction.norm(dim=-1, keepdim=True)


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dimension (a zero vector stays zero)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def layer_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine between two per-layer directions, layer by layer (convergence of two fine-tunes' directions)."""
    if a.shape != b.shape:
        raise ValueError(f"directions differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (unit(a.float()) * unit(b.float())).sum(-1).tolist()

# ------------------------------------------------------------------------------------------ interventions


def _layer_vectors(model: nn.Module, vectors: torch.Tensor, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    """{layer: vector} from a per-layer ``[n_layers, d]`` tensor (``layers`` None: all) or a single ``[d]`` vector."""
    if vectors.dim() == 1:
        if layers is None:
            raise ValueError("a single vector needs the layers to apply it at")
        return {check_layer(model, layer): vectors for layer in layers}
    if vectors.shape[0] != n_layers(model):
        raise ValueError(f"the direction has {vectors.shape[0]} layers but the model has {n_layers(model)}")
    chosen = range(n_layers(model)) if layers is None else layers
    return {check_layer(model, layer): vectors[layer] for layer in chosen}


class Intervention:
    """Edits decoder-layer outputs. ``model -> hook handles`` (so it is a ``steering`` argument of the sampler)."""

    vectors: torch.Tensor
    layers: Sequence[int] | None

    def edit(self, hidden: torch.Tensor, vector: torch.Tensor, prefill: bool) -> torch.Tensor:
        raise NotImplementedError

    def targets(self, model: nn.Module) -> dict[int, torch.Tensor]:
        return _layer_vectors(model, torch.as_tensor(self.vectors), self.layers)

    def __call__(self, model: nn.Module) -> list:
        layers = decoder_layers(model)
        return [layers[i].register_forward_hook(self._hook(v)) for i, v in self.targets(model).items()]

    def _hook(self, vector: torch.Tensor):
        def hook(module, args, output):
            hidden = _hidden(output)
            # the sampler's prefill pass sees the whole prompt; each decode step sees one new token
            edited = self.edit(hidden, vector.to(hidden), prefill=hidden.shape[1] > 1)
            return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited
        return hook


@dataclass
class Steer(Intervention):
    """Add ``scale * vector`` to decoder-layer outputs: x + λ·v.

    ``positions``: ``all`` (prompt and every generated token: the papers' protocol), ``prompt`` (prompt tokens only,
    during the prefill) or ``last`` (only the final prompt token, e.g. the assistant-turn token of a chat prompt).
    ``prompt`` and ``last`` assume left-padded prompts, as the sampler builds them, and a prompt longer than one token.
    """

    vectors: torch.Tensor
    scale: float = 1.0
    layers: Sequence[int] | None = None
    positions: str = "all"

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    def edit(self, hidden: torch.Tensor, vector: torch.Tensor, prefill: bool) -> torch.Tensor:
        if self.positions == "all":
            return hidden + self.scale * vector
        if not prefill:
            return hidden
        if self.positions == "prompt":
            return hidden + self.scale * vector
        out = hidden.clone()
        out[:, -1] += self.scale * vector
        return out


@dataclass
class Ablate(Intervention):
    """Project the direction out of decoder-layer outputs at every position: x − (x·v̂)v̂ (``layers`` None: all)."""

    vectors: torch.Tensor
    layers: Sequence[int] | None = None

    def edit(self, hidden: torch.Tensor, vector: torch.Tensor, prefill: bool) -> torch.Tensor:
        v = unit(vector)
        return hidden - (hidden @ v).unsqueeze(-1) * v


@dataclass
class Compose(Intervention):
    """Several interventions at once (e.g. ablate one direction and steer with another); applied in order."""

    parts: Sequence[Intervention]

    def __call__(self, model: nn.Module) -> list:
        return [h for part in self.parts for h in part(model)]


@torch.no_grad()
def intervened_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      intervention: Intervention | None = None) -> torch.Tensor:
    """Logits of one forward pass with ``intervention`` applied inside an nnsight trace (a prefill pass).

    The cross-check of the hook path: ``model(...)`` under ``intervention`` gives the same logits.
    """
    from nnsight import NNsight

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    parts = intervention.parts if isinstance(intervention, Compose) else [intervention] if intervention else []
    by_layer: dict[int, list] = {}
    for part in parts:  # per layer, parts apply in order, as the hooks they register would fire
        for layer, vector in part.targets(model).items():
            by_layer.setdefault(layer, []).append((part, vector))
    wrapped = NNsight(model)
    names = _module_names(model)
    prefill = input_ids.shape[1] > 1
    with wrapped.trace(input_ids=input_ids, attention_mask=attention_mask):
        for layer in sorted(by_layer):  # nnsight must visit modules in execution order
            envoy = _envoy(wrapped, names[layer])
            output = envoy.output
            hidden = _hidden(output)
            for part, vector in by_layer[layer]:
                hidden = part.edit(hidden, vector.to(hidden), prefill)
            envoy.output = (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        logits = wrapped.output.logits.save()
    return logits

# ------------------------------------------------------------------------------------------ LoRA B vectors


def lora_b_vectors(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Every LoRA layer writing into the residual stream (B has ``d_model`` rows): name -> (layer, B ``[d, r]``)."""
    from peft.tuners.lora import LoraLayer

    layer_of = {id(m): i for i, layer in enumerate(decoder_layers(model)) for m in layer.modules()}
    width = d_model(model)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and id(module) in layer_of:
            for adapter, lora_b in module.lora_B.items():
                if lora_b.weight.shape[0] == width:
                    found[f"{name}.{adapter}"] = (layer_of[id(module)], lora_b.weight.detach())
    return found


def b_direction_cosines(model: nn.Module, direction: torch.Tensor) -> pd.DataFrame:
    """Cosine of each residual-writing LoRA B column with the direction at its layer (rank-1: one row per adapter)."""
    rows = []
    for name, (layer, b) in lora_b_vectors(model).items():
        for k in range(b.shape[1]):
            cos = float(torch.nn.functional.cosine_similarity(b[:, k].float(), direction[layer].float(), dim=0))
            rows.append({"adapter": name, "layer": layer, "column": k, "cosine": cos})
    if not rows:
        raise ValueError("the model has no LoRA B that writes into the residual stream (down_proj / o_proj)")
    return pd.DataFrame(rows)


@contextmanager
def lora_b_projected_out(model: nn.Module, direction: torch.Tensor) -> Iterator[nn.Module]:
    """Weight-level ablation inside the block: remove the direction (at each adapter's layer) from every
    residual-writing LoRA B column, then restore each column's norm; the original weights come back after."""
    saved = []
    try:
        for _, (layer, b) in lora_b_vectors(model).items():
            v = unit(direction[layer].to(b))
            saved.append((b, b.clone()))
            projected = b - v[:, None] * (v @ b)[None, :]
            b.copy_(projected * b.norm(dim=0) / projected.norm(dim=0).clamp_min(1e-12))
        if not saved:
            raise ValueError("the model has no LoRA B that writes into the residual stream (down_proj / o_proj)")
        yield model
    finally:
        for b, original in saved:
            b.copy_(original)
