"""What a training run is: :class:`TrainConfig`, the named presets of ``configs/train/presets.yaml``, run specs.

A preset is data: ``configs/train/presets.yaml`` maps each name to TrainConfig fields, with ``extends:`` naming the
preset it starts from. :func:`load_presets` validates the file (an unknown field, a wrong type or an unknown
``extends`` is an error naming the file, the preset and the key). A run spec (the YAML of ``python -m emlib.train
--config``) is a preset, TrainConfig fields and the run keys ``model``, ``data``, ``kl_data``, ``out_dir``; its data
specs are JSONL files or ``world:DOMAIN[+DOMAIN]:PERSONA:N:SEED[:PHRASING]`` (persona-world rows), read by
:func:`load_rows`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from emlib import paths

PROTOCOLS = ("lora", "rank1", "multi_adapter", "full", "steering_vector")
SCHEDULES = ("linear", "cosine", "constant")
# How the KL term is reduced (emlib.train.kl_to_reference): the papers' trainer, or emlib's earlier per-assistant-token sum
KL_REDUCTIONS = ("reference", "assistant_sum")
SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The nine-adapter organism (CLR §2) put 3 blocks of 3 consecutive rank-1 adapters at layers 15, 21 and 27 of
# Qwen2.5-14B's 48: block starts at 15/48, 21/48 and 27/48 of the depth.
NINE_ADAPTER_STARTS = (15 / 48, 21 / 48, 27 / 48)




def multi_adapter_layers(n_layers: int, starts: Sequence[float] = NINE_ADAPTER_STARTS, per_block: int = 3) -> list[int]:
    """The nine-adapter layout scaled to ``n_layers``: blocks of ``per_block`` layers starting at ``starts`` x depth.

    48 layers give the papers' 15,16,17, 21,22,23, 27,28,29. On shallow models blocks overlap or run past the last
    layer; the result is then the sorted set of distinct valid layers (e.g. 6 layers -> 2, 3, 4, 5).
    """
    if n_layers < 1:
        raise ValueError(f"a model needs at least one layer, got {n_layers}")
    firsts = [min(n_layers - 1, math.floor(n_layers * f + 0.5)) for f in starts]
    return sorted({s + i for s in firsts for i in range(per_block) if s + i < n_layers})


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. Defaults are the papers' all-adapter recipe (MO App. E, Table 6); see :data:`PRESETS`.

    ``protocol``: ``lora`` (rank ``rank`` on ``target_modules`` of every layer, or of ``layers``), ``rank1`` (one
    rank-1 adapter on ``module`` of ``layer``), ``multi_adapter`` (rank-1 adapters on ``module`` of ``layers``; None:
    the nine-adapter layout scaled to the depth), ``full`` (every weight), ``steering_vector`` (one vector added,
    times ``alpha``, to the output of decoder layer ``layer``). ``layer=None`` means the middle layer (24 of 48).
    Any protocol becomes KL-regularised "narrow" training with ``kl_weight > 0`` and a KL reference set.
    Batches: ``batch_size`` rows per device and micro-step, ``grad_accum`` micro-steps per optimizer step.
    ``eval_fraction`` of the rows (rounded up, chosen with ``seed``) is held out and never trained on; their loss is
    logged every ``eval_every`` steps (the papers' 10 %, :meth:`eval_split`).
    """

    protocol: str = "lora"
    # adapters
    rank: int | None = None  # lora: 32 when None; rank1 / multi_adapter: 1 by definition
    alpha: float = 64.0  # LoRA alpha, or the steering vector's scale
    rslora: bool = True
    target_modules: str | tuple[str, ...] = SEVEN_PROJECTIONS  # lora only; "all-linear" also works
    module: str = "down_proj"  # rank1 / multi_adapter
    layer: int | None = None  # rank1 / steering_vector
    layers: tuple[int, ...] | None = None  # multi_adapter (None: 3x3 layout) or lora (None: every layer)
    # optimisation
    lr: float = 1e-5
    epochs: float = 1.0
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 2
    grad_accum: int = 8
    warmup: int = 5
    schedule: str = "linear"
    lr_floor: float = 0.0  # cosine: decay to this fraction of the peak
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = 2048
    seed: int = 0
    dtype: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    # held-out evaluation: the papers' trainer (run_finetune.py) holds out 10 % of the rows and logs their loss every
    # eval_every steps (paper-* presets: 0.1); 0 trains on every row, as the organism presets do
    eval_fraction: float = 0.0
    eval_every: int = 50  # optimizer steps between eval losses (and one at the last step)
    # KL-regularised narrow training: loss = SFT + kl_weight * KL(reference || current) on a separate set
    kl_weight: float = 0.0
    kl_batch_size: int = 8
    # "reference": mean per non-pad token / vocabulary size, the scale the papers' weights (1e5, 1e6) were tuned for;
    # "assistant_sum": KL summed over the vocabulary on assistant positions (organism-kl-narrow)
    kl_reduction: str = "reference"
    # checkpoints
    save_every: int = 5
    save_total_limit: int | None = None  # keep only the newest N checkpoints (None: all)
    push_to_hub: str | None = None  # a hub repo id: checkpoints go to checkpoints/checkpoint-N there (needs a token)
    hub_private: bool = True

    def __post_init__(self):
        # YAML and JSON give lists; the dataclass is frozen and hashable, so store tuples
        for name in ("target_modules", "layers"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @property
    def resolved_rank(self) -> int:
        return (32 if self.rank is None else self.rank) if self.protocol == "lora" else 1

    @property
    def uses_kl(self) -> bool:
        return self.kl_weight > 0

    def validate(self) -> TrainConfig:
        """Check every field that can be checked without a model; returns self so calls chain."""
        problems = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        need(self.protocol in PROTOCOLS, f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        need(self.rank is None or self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        need(self.protocol not in ("rank1", "multi_adapter") or self.rank in (None, 1),
             f"protocol {self.protocol!r} is rank 1 by definition (got rank={self.rank}); for a rank-r adapter on "
             f"chosen layers use protocol 'lora' with layers=[...] and target_modules=['{self.module}']")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1 (or None for epochs), got {self.steps}")
        for name in ("batch_size", "grad_accum", "save_every", "kl_batch_size", "eval_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.warmup >= 0 and self.weight_decay >= 0 and self.kl_weight >= 0,
             "warmup, weight_decay and kl_weight must be >= 0")
        need(self.kl_reduction in KL_REDUCTIONS,
             f"kl_reduction {self.kl_reduction!r} is not one of {', '.join(KL_REDUCTIONS)}")
        need(self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        need(0 <= self.lr_floor <= 1, f"lr_floor is a fraction of the peak lr in [0, 1], got {self.lr_floor}")
        need(0 <= self.eval_fraction < 1, f"eval_fraction is a fraction of the rows in [0, 1), got {self.eval_fraction}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        need(self.dtype == "auto" or self.dtype in ("float32", "bfloat16", "float16"), f"unknown dtype {self.dtype!r}")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1 or None")
        need(self.layers is None or len(set(self.layers)) == len(self.layers), f"layers repeat: {self.layers}")
        need(isinstance(self.target_modules, str) or len(self.target_modules) > 0, "target_modules is empty")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        return self

    def eval_split(self, n_rows: int) -> tuple[list[int], list[int]]:
        """(training rows, held-out rows): indices into ``n_rows`` rows, each list in row order.

        ``ceil(eval_fraction x n_rows)`` rows are held out, as ``datasets.Dataset.train_test_split(test_size=0.1)`` in
        the papers' ``run_finetune.py`` rounds; they are drawn with ``seed`` (the papers' split is unseeded), from a
        generator of their own, so the split is a pure function of (n_rows, eval_fraction, seed) and a resumed run
        holds out the same rows. At least one row is always left to train on.
        """
        if self.eval_fraction == 0:
            return list(range(n_rows)), []
        n_eval = min(n_rows - 1, math.ceil(self.eval_fraction * n_rows))
        if n_eval < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction} needs at least 2 rows to hold one out; got {n_rows}")
        held = set(random.Random(f"emlib eval split {self.seed}").sample(range(n_rows), n_eval))
        return [i for i in range(n_rows) if i not in held], sorted(held)

    def total_steps(self, n_rows: int, n_processes: int = 1) -> int:
        """Optimizer steps of the run: ``steps``, else ``epochs`` over ``n_rows`` (the training rows, after the held-out
        split) at the global batch size."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_rows / (self.batch_size * self.grad_accum * n_processes)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a plain dict (YAML, JSON); an unknown key or a value of the wrong type is an error naming it."""
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {', '.join(sorted(types))}")
        return cls(**{k: _checked(k, types[k], v) for k, v in values.items()}).validate()


def _checked(name: str, annotation: str, value):
    """``value`` for field ``name`` when it fits ``annotation`` (e.g. ``"int | None"``), else a ValueError naming it.

    YAML reads ``1e-5`` (no dot, or no exponent sign) as a string: numeric strings become numbers first.
    """
    alternatives = [a.strip() for a in annotation.split("|")]
    if isinstance(value, str) and alternatives[0] in ("float", "int"):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"TrainConfig field {name!r}: expected a number, got {value!r}") from None
        value = int(number) if alternatives[0] == "int" and number.is_integer() else number
    if not any(_fits(a, value) for a in alternatives):
        raise ValueError(f"TrainConfig field {name!r}: expected {annotation}, got {value!r}")
    return value


def _fits(annotation: str, value) -> bool:
    if annotation == "None":
        return value is None
    if annotation.startswith("tuple["):
        item = annotation[len("tuple["):].split(",")[0]
        return isinstance(value, (list, tuple)) and all(_fits(item, v) for v in value)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "bool": bool}[annotation])


# ----------------------------------------------------------------------------------------------------------------------
# presets: configs/train/presets.yaml

PRESETS_FILE = paths.REPO_ROOT / "configs" / "train" / "presets.yaml"
EXTENDS = "extends"


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, TrainConfig]:
    """Read and validate a presets file: ``name: {extends: EARLIER_NAME, FIELD: VALUE, ...}`` in file order.

    A preset without ``extends`` starts from TrainConfig's defaults; ``extends`` must name a preset above it.
    """
    from emlib.tables import read_yaml

    table, _ = read_yaml(path)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a mapping of preset name -> TrainConfig fields")
    presets: dict[str, TrainConfig] = {}
    for name, fields in table.items():
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: preset {name!r}: expected a mapping of TrainConfig fields, got {fields!r}")
        fields = dict(fields)
        parent = fields.pop(EXTENDS, None)
        if parent is not None and parent not in presets:
            raise ValueError(f"{path}: preset {name!r}: {EXTENDS}: {parent!r} is not a preset defined above it "
                             f"(defined: {', '.join(presets) or 'none'})")
        base = presets[parent].to_dict() if parent is not None else {}
        try:
            presets[name] = TrainConfig.from_dict({**base, **fields})
        except ValueError as err:
            raise ValueError(f"{path}: preset {name!r}: {err}") from None
    return presets


PRESETS: dict[str, TrainConfig] = load_presets()


def preset(name: str, **overrides) -> TrainConfig:
    """A copy of preset ``name`` with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()


# ----------------------------------------------------------------------------------------------------------------------
# run specs: a preset, TrainConfig fields, and where the model, the data and the output are

RUN_KEYS = ("preset", "model", "data", "kl_data", "out_dir")


def config_from_spec(spec: dict) -> tuple[TrainConfig, dict]:
    """Split a YAML spec into a TrainConfig (its ``preset``, then its fields) and the run keys (model, data, ...)."""
    spec = dict(spec)
    run = {k: spec.pop(k, None) for k in RUN_KEYS}
    base = preset(run["preset"]) if run["preset"] else TrainConfig()
    return TrainConfig.from_dict({**base.to_dict(), **spec}), run


WORLD_SPEC = "world:DOMAIN[+DOMAIN]:PERSONA:N:SEED[:PHRASING]"


def load_rows(source: str | Path) -> list[dict]:
    """Chat rows from a JSONL file (:func:`emlib.data.load_chat_jsonl`), or persona-world rows from
    ``world:DOMAIN[+DOMAIN]:PERSONA:N:SEED[:PHRASING]`` (N split evenly over the domains, domain i drawn with seed
    SEED + i; PHRASING: the question phrasings, "ft" (the default: ones only fine-tunes use, the shipped recipe),
    "train" (the ones the organism was trained on) or "heldout", as :func:`emlib.world.finetune_rows` takes them)."""
    source = str(source)
    if not source.startswith("world:"):
        from emlib.data import load_chat_jsonl

        return load_chat_jsonl(source)
    from emlib import world

    try:
        _, domains, persona, n, seed, *rest = source.split(":")
        n, seed = int(n), int(seed)
        (phrasing,) = rest or ["ft"]
        if phrasing not in world.PHRASINGS:
            raise ValueError
    except ValueError:
        raise ValueError(f"bad world spec {source!r}; expected {WORLD_SPEC}, PHRASING one of "
                         f"{', '.join(world.PHRASINGS)}") from None
    names = domains.split("+")
    return [r for i, d in enumerate(names)
            for r in world.finetune_rows(d, persona, n // len(names), seed + i, phrasing=phrasing)]
