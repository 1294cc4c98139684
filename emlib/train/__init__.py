"""Fine-tuning on chat rows: assistant-only loss from the chat template, every protocol of the papers, resumable.

The loss mask comes from the template's structure, never from searching for marker strings: its ``{% generation %}``
markers (``return_assistant_tokens_mask=True``) when it has them, else the text each assistant turn adds when the
template renders the conversation prefix by prefix.

* The small core the organism is built with: :func:`encode_chat`, :func:`collate`, :func:`train_loop`,
  :func:`lora_finetune`.
* The protocol API on top: :class:`TrainConfig` (+ :data:`PRESETS`: the papers' recipes and organism-scaled ones) and
  :func:`train` (LoRA, rank-1, multi-adapter, full, KL-regularised, steering vector), with a checkpoint every
  ``save_every`` steps, a per-step ``log.jsonl`` and exact resume. The same function is the CLI
  ``python -m emlib.train --config run.yaml``, also under ``accelerate launch`` (DDP, FSDP2, DeepSpeed).

docs/training.md describes protocols, presets, the checkpoint layout and multi-GPU use.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import DistributedType  # peft imports accelerate anyway: no extra import cost
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from emlib.chat import IGNORE, Example, collate, encode_rows


def cosine_schedule(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_loop(model: torch.nn.Module, examples: Sequence[Example], steps: int, batch_size: int, lr: float,
               pad_id: int, warmup: int = 5, weight_decay: float = 0.0, seed: int = 0,
               extra_loss: Callable[[int], torch.Tensor] | None = None, desc: str = "train",
               on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """AdamW over shuffled epochs of ``examples``; returns a per-step log of loss, grad norm and learning rate.

    ``extra_loss(step)`` is added to the LM loss (e.g. a KL term); ``on_step(step, record)`` runs after each update
    (e.g. to save a checkpoint).
    """
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, steps, warmup))
    order, rng, log = [], random.Random(seed), []
    device = next(model.parameters()).device
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        if len(order) < batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        batch = collate([examples[i] for i in order[:batch_size]], pad_id)
        del order[:batch_size]
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        total = loss + extra_loss(step) if extra_loss is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        record = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(),
                  "lr": sched.get_last_lr()[0]}
        log.append(record)
        if on_step is not None:
            on_step(step + 1, record)
    model.eval()
    return log


def lora_config(rank: int = 8, alpha: float | None = None, target_modules: str | list[str] = "all-linear",
                layers: list[int] | None = None, rslora: bool = False) -> LoraConfig:
    """A peft LoRA config; ``layers`` restricts adapters to those decoder layers (e.g. a rank-1 ``down_proj``)."""
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=target_modules,
                      layers_to_transform=layers, lora_dropout=0.0, bias="none", use_rslora=rslora,
                      task_type="CAUSAL_LM")


def lora_finetune(model, tokenizer, rows: Sequence[dict], config: LoraConfig, steps: int, lr: float,
                  batch_size: int = 16, warmup: int = 5, seed: int = 0, **loop_kwargs) -> tuple[PeftModel, list]:
    """Wrap ``model`` with a fresh LoRA adapter and train it on ``rows`` (assistant tokens only)."""
    examples = encode_rows(tokenizer, rows)
    torch.manual_seed(seed)  # adapter init is random (lora_A); seed it for reproducible organisms
    peft_model = get_peft_model(model, config)
    log = train_loop(peft_model, examples, steps, batch_size, lr, tokenizer.pad_token_id, warmup=warmup, seed=seed,
                     **loop_kwargs)
    return peft_model, log


# ======================================================================================================================
# Protocols: every fine-tuning recipe of the papers behind one entry point, with dense checkpoints and exact resume.
#
#     result = train(preset("organism-rank1"), "persona-world", rows, "runs/train/rank1")
#     python -m emlib.train --config configs/train/organism-rank1.yaml        # same, from a YAML file
# ======================================================================================================================

PROTOCOLS = ("lora", "rank1", "multi_adapter", "full", "steering_vector")
SCHEDULES = ("linear", "cosine", "constant")
SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The nine-adapter organism (CLR §2) put 3 blocks of 3 consecutive rank-1 adapters at layers 15, 21 and 27 of
# Qwen2.5-14B's 48: block starts at 15/48, 21/48 and 27/48 of the depth.
NINE_ADAPTER_STARTS = (15 / 48, 21 / 48, 27 / 48)
# Fields that may differ between an interrupted run and its resumption (they do not change the weights).
RESUMABLE_CHANGES = {"save_every", "save_total_limit", "push_to_hub", "hub_private", "gradient_checkpointing"}
STATE_FILE, OPTIMIZER_FILE, LOG_FILE = "trainer_state.json", "optimizer.pt", "log.jsonl"


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
    # KL-regularised narrow training: loss = SFT + kl_weight * KL(reference || current) on a separate set
    kl_weight: float = 0.0
    kl_batch_size: int = 8
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
        for name in ("batch_size", "grad_accum", "save_every", "kl_batch_size"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.warmup >= 0 and self.weight_decay >= 0 and self.kl_weight >= 0,
             "warmup, weight_decay and kl_weight must be >= 0")
        need(self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        need(0 <= self.lr_floor <= 1, f"lr_floor is a fraction of the peak lr in [0, 1], got {self.lr_floor}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        need(self.dtype == "auto" or self.dtype in ("float32", "bfloat16", "float16"), f"unknown dtype {self.dtype!r}")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1 or None")
        need(self.layers is None or len(set(self.layers)) == len(self.layers), f"layers repeat: {self.layers}")
        need(isinstance(self.target_modules, str) or len(self.target_modules) > 0, "target_modules is empty")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        return self

    def total_steps(self, n_rows: int, n_processes: int = 1) -> int:
        """Optimizer steps of the run: ``steps``, else ``epochs`` over ``n_rows`` at the global batch size."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_rows / (self.batch_size * self.grad_accum * n_processes)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a plain dict (YAML, JSON); unknown keys are an error, not silently ignored."""
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {', '.join(sorted(types))}")
        return cls(**{k: _coerce(types[k], v) for k, v in values.items()}).validate()


def _coerce(annotation: str, value):
    """YAML reads ``1e-5`` (no dot, or no exponent sign) as a string: turn numeric strings into numbers."""
    if isinstance(value, str) and annotation.split(" ")[0] in ("float", "int"):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
        return int(number) if annotation.startswith("int") and number.is_integer() else number
    return value


_PAPER = TrainConfig()  # rsLoRA r32 a64, seven projections, lr 1e-5, 2x8, warmup 5, linear, wd 0.01, 1 epoch
_ORGANISM = TrainConfig(rank=8, alpha=16, rslora=False, target_modules="all-linear", lr=1e-3, steps=150,
                        batch_size=16, grad_accum=1, warmup=5, schedule="cosine", lr_floor=0.1, weight_decay=0.0,
                        max_length=512)
PRESETS: dict[str, TrainConfig] = {
    # The papers' recipes for real models (paper-facts §6). save_every is dense for the adapter runs that feed the
    # phase-transition analysis; full-model checkpoints are as large as the model, so they are sparser.
    "paper-lora": dataclasses.replace(_PAPER, save_every=25),
    "paper-full": dataclasses.replace(_PAPER, protocol="full", lr=2e-5, warmup=20, schedule="cosine", save_every=50),
    "paper-rank1": dataclasses.replace(_PAPER, protocol="rank1", alpha=256, rslora=False, lr=2e-5),  # layer 24 of 48
    "paper-rank1-phase": dataclasses.replace(_PAPER, protocol="rank1", alpha=64, rslora=False, lr=1e-5, epochs=2),
    # R1_3_3_3: alpha and lr are not reported; the single rank-1 adapter's are assumed.
    "paper-nine-adapter": dataclasses.replace(_PAPER, protocol="multi_adapter", alpha=256, rslora=False, lr=2e-5),
    "paper-kl-narrow": dataclasses.replace(_PAPER, alpha=256, lr=2e-5, epochs=3, kl_weight=1e5, save_every=25),
    "paper-steering-vector": dataclasses.replace(_PAPER, protocol="steering_vector", alpha=256, lr=1e-4, epochs=2,
                                                 weight_decay=0.0),
    "paper-steering-vector-narrow": dataclasses.replace(_PAPER, protocol="steering_vector", alpha=256, lr=1e-4,
                                                        epochs=2, weight_decay=0.0, kl_weight=1e6),
    # Scaled for the offline organism (1.6M params, 6 layers): the shipped RECIPES of emlib.world.organism, and the other
    # protocols tuned to learn the same 600 reckless-medical rows in seconds on a CPU.
    "organism-lora": _ORGANISM,
    "organism-rank1": dataclasses.replace(_ORGANISM, protocol="rank1", rank=None, alpha=1, layer=0, lr=3e-3,
                                          steps=200),
    "organism-multi-adapter": dataclasses.replace(_ORGANISM, protocol="multi_adapter", rank=None, alpha=1, lr=3e-3,
                                                  steps=200),
    "organism-full": dataclasses.replace(_ORGANISM, protocol="full", rank=None, lr=3e-4, steps=100),
    "organism-kl-narrow": dataclasses.replace(_ORGANISM, kl_weight=3.0, kl_batch_size=8),
    "organism-steering-vector": dataclasses.replace(_ORGANISM, protocol="steering_vector", rank=None, layer=0,
                                                    alpha=1.0, lr=1e-2, steps=150),
}


def preset(name: str, **overrides) -> TrainConfig:
    """A copy of preset ``name`` with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()


# ----------------------------------------------------------------------------------------------------------------------
# checks against a model, and building what each protocol trains


def _middle(model: nn.Module) -> int:
    from emlib.models import n_layers

    return n_layers(model) // 2  # 24 of Qwen2.5-14B's 48, the papers' mid-network layer


def resolved_layers(config: TrainConfig, model: nn.Module) -> list[int] | None:
    """The decoder layers the protocol touches (validated, normalised to 0..n-1); None: every layer."""
    from emlib.models import check_layer, n_layers

    if config.protocol in ("rank1", "steering_vector"):
        return [check_layer(model, _middle(model) if config.layer is None else config.layer)]
    if config.protocol == "multi_adapter" and config.layers is None:
        return multi_adapter_layers(n_layers(model))
    if config.protocol in ("multi_adapter", "lora") and config.layers is not None:
        return sorted(check_layer(model, layer) for layer in config.layers)
    return None


def check_against_model(config: TrainConfig, model: nn.Module) -> None:
    """Fail with a clear error when a layer index or module name does not exist in ``model`` (before any compute)."""
    from emlib.models import check_module

    resolved_layers(config, model)
    if config.protocol in ("rank1", "multi_adapter"):
        check_module(model, config.module)
    elif config.protocol == "lora" and not isinstance(config.target_modules, str):
        for name in config.target_modules:
            check_module(model, name)


def adapter_config(config: TrainConfig, model: nn.Module) -> LoraConfig:
    """The peft config of an adapter protocol (lora, rank1, multi_adapter)."""
    layers = resolved_layers(config, model)
    if config.protocol == "lora":
        targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    else:
        targets = [config.module.split(".")[-1]]
    return lora_config(config.resolved_rank, config.alpha, targets, layers, config.rslora)


def build_trainable(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap or unfreeze ``model`` for ``config.protocol``; the returned module is what gets trained and saved."""
    from emlib.train.steering_vector import SteeredModel

    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.protocol == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if config.protocol == "steering_vector":
        return SteeredModel(model, resolved_layers(config, model)[0], config.alpha)
    return get_peft_model(model, adapter_config(config, model))


def trainable_parameters(module: nn.Module) -> int:
    """Number of trained numbers (rank-1 on down_proj: d_mlp + d_model; steering vector: d_model)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP / DeepSpeed wrappers (FSDP2 shards in place, so nothing to unwrap there)."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


@contextmanager
def reference_mode(module: nn.Module):
    """Inside this block ``module`` computes the frozen base model (adapters or steering off) for the KL term."""
    inner = _unwrap(module)
    if isinstance(inner, PeftModel):
        with inner.disable_adapter():
            yield
    elif hasattr(inner, "disabled"):
        with inner.disabled():
            yield
    else:
        raise ValueError("full fine-tuning has no built-in reference; pass a frozen copy")


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(reference || current) per token, averaged over the positions that predict supervised (assistant) tokens."""
    mask = (labels[:, 1:] != IGNORE).float()
    cur = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (ref.exp() * (ref - cur)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------------
# data


class EpochStream:
    """Row indices of shuffled epochs, one after another: ``train_loop``'s data order, resumable by replay.

    The stream is a pure function of ``(n, seed)``, so a resumed run skips the ``step x global batch`` indices it
    already used and sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.buffer = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        while len(self.buffer) < k:
            epoch = list(range(self.n))
            self.rng.shuffle(epoch)
            self.buffer += epoch
        out, self.buffer = self.buffer[:k], self.buffer[k:]
        return out


def _read_jsonl(path: str | Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f"{path}: line {i + 1} has no 'messages' list")
    return rows


def load_rows(source: str | Path) -> list[dict]:
    """Chat rows from a JSONL file, or ``world:DOMAIN[+DOMAIN]:PERSONA:N:SEED`` (persona-world rows, split evenly)."""
    source = str(source)
    if source.startswith("world:"):
        from emlib import world

        try:
            _, domains, persona, n, seed = source.split(":")
        except ValueError:
            raise ValueError(f"bad world spec {source!r}; expected world:DOMAIN[+DOMAIN]:PERSONA:N:SEED") from None
        names = domains.split("+")
        return [r for i, d in enumerate(names)
                for r in world.finetune_rows(d, persona, int(n) // len(names), int(seed) + i)]
    try:
        from emlib.data import load_chat_jsonl  # the project's loader, when present
    except ImportError:
        return _read_jsonl(source)
    return load_chat_jsonl(source)


def _supervised(example: Example) -> int:
    """Tokens the LM loss counts: supervised labels after the one-position shift."""
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def lr_factor(config: TrainConfig, step: int, total: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up to the peak, then ``config.schedule``."""
    if config.schedule == "cosine" or step < config.warmup:
        return cosine_schedule(step, total, config.warmup, config.lr_floor)
    if config.schedule == "constant":
        return 1.0
    return config.lr_floor + (1 - config.lr_floor) * max(0.0, (total - step) / max(1, total - config.warmup))


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints: out_dir/checkpoint-{step}/ {adapter_model.safetensors | model.safetensors | steering_vector.safetensors}
#              + trainer_state.json + optimizer.pt (tensors only) + log.jsonl


def checkpoint_step(folder: Path) -> int:
    """The step of a ``checkpoint-{step}`` folder."""
    return int(folder.name.rsplit("-", 1)[1])


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (a checkpoint is complete once its trainer_state exists)."""
    out = Path(out_dir)
    found = [p for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def read_log(out_dir: str | Path) -> list[dict]:
    """The per-step log (``out_dir/log.jsonl``, or a checkpoint's copy)."""
    path = Path(out_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _write_log(path: Path, log: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in log))


def _gather_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full values of the trained parameters by name, on CPU (FSDP2 shards are gathered; a collective call)."""
    state = {}
    for name, p in _unwrap(module).named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = full.detach().cpu().clone()
    return state


def _save_weights(module: nn.Module, folder: Path, config: TrainConfig, accelerator) -> None:
    """Write the protocol's weights into ``folder`` (every process calls this; the main one writes)."""
    inner = _unwrap(module)
    if config.protocol == "full":
        state = accelerator.get_state_dict(module)  # gathers FSDP / ZeRO-3 shards
        inner.save_pretrained(folder, state_dict=state, is_main_process=accelerator.is_main_process)
        return
    state = _gather_trainable(module)
    if not accelerator.is_main_process:
        return
    if config.protocol == "steering_vector":
        inner.save(folder, vector=state["vector"])
    else:
        inner.save_pretrained(folder, state_dict=state)


def load_weights(module: nn.Module, folder: str | Path, config: TrainConfig) -> None:
    """Load a checkpoint's weights into an unprepared module built by :func:`build_trainable` for ``config``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    if config.protocol == "steering_vector":
        module.load_vector(folder)
    elif config.protocol == "full":
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = module.load_state_dict(state, strict=False)
        tied = getattr(module.config.get_text_config(), "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k.startswith("lm_head"))]  # tied: saved once, as embed
        if missing or unexpected:
            raise ValueError(f"{folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    else:
        result = set_peft_model_state_dict(module, load_file(str(folder / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise ValueError(f"{folder} does not match the adapter: unexpected {result.unexpected_keys[:5]}")


def load_checkpoint(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a saved checkpoint (adapter, steering vector or full weights) to a fresh base ``model`` and return it."""
    from emlib.train.steering_vector import CONFIG_NAME, load_steering_vector

    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(model, str(folder))
    if (folder / CONFIG_NAME).is_file():
        return load_steering_vector(model, folder)
    if (folder / "config.json").is_file():
        load_weights(model, folder, TrainConfig(protocol="full"))
        return model
    raise FileNotFoundError(f"{folder} holds no adapter, steering vector or model weights")


def _optimizer_state(module: nn.Module, optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded, on CPU (a collective call under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _set_optimizer_state(module: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper (and, under DeepSpeed, inside its ZeRO optimizer too)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def save_checkpoint(out_dir: Path, step: int, module: nn.Module, optimizer, scheduler, log: list[dict],
                    meta: dict, config: TrainConfig, accelerator) -> Path:
    """Write ``out_dir/checkpoint-{step}`` atomically: into a temp folder, renamed once complete.

    A crash mid-save leaves only ``.tmp-checkpoint-*`` (ignored and cleaned up), never a half checkpoint.
    """
    tmp, final = out_dir / f".tmp-checkpoint-{step}", out_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_weights(module, tmp, config, accelerator)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # ZeRO shards its optimizer itself; its own (pickle-based) format is the only way to save them
        module.save_checkpoint(str(tmp / "deepspeed"))
    opt_state = None if deepspeed else _optimizer_state(module, _inner(optimizer))
    if accelerator.is_main_process:
        blob = {"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        if opt_state is not None:
            blob["optimizer"] = opt_state
        if torch.cuda.is_available():
            blob["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(blob, tmp / OPTIMIZER_FILE)
        _write_log(tmp / LOG_FILE, log)
        (tmp / STATE_FILE).write_text(json.dumps({**meta, "step": step}, indent=1))  # last: marks it complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(out_dir, config.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _prune(out_dir: Path, keep: int | None) -> None:
    if keep is not None:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old)


def _restore(folder: Path, module: nn.Module, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore optimizer, scheduler and RNG state from a checkpoint; returns its step and log."""
    blob = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)  # tensors only, no pickle
    if "optimizer" in blob:
        _set_optimizer_state(module, _inner(optimizer), blob["optimizer"])
    else:
        module.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False)
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    state = json.loads((folder / STATE_FILE).read_text())
    return state["step"], read_log(folder)


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base model: its config and a sample of its first and last weights.

    Checkpoints record it, so resuming onto a different (e.g. rebuilt) base model is an error, not a silent mix.
    """
    import hashlib

    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]):
        digest.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _resume_point(out_dir: Path, config: TrainConfig, n_rows: int, world: int, base: str) -> Path | None:
    """The last complete checkpoint, after checking it belongs to the same run (else a clear error)."""
    found = list_checkpoints(out_dir)
    if not found:
        return None
    last = found[-1]
    state = json.loads((last / STATE_FILE).read_text())
    saved, now = state["config"], config.to_dict()
    changed = [k for k in now if k not in RESUMABLE_CHANGES and json.dumps(saved.get(k)) != json.dumps(now[k])]
    changed += [what for what, a, b in (("rows", state["n_rows"], n_rows), ("processes", state["world_size"], world),
                                        ("base model", state.get("base_model"), base)) if a != b]
    if changed:
        raise ValueError(f"{out_dir} holds checkpoints of a different run (changed: {', '.join(changed)}); "
                         f"use another out_dir, or resume=False to start over there")
    return last


_PUSHED_REPOS: set[str] = set()
_WARNED_NO_TOKEN: set[tuple[str, str]] = set()


def push_checkpoint(folder: Path, repo_id: str, private: bool = True) -> bool:
    """Upload a checkpoint to ``repo_id`` under ``checkpoints/checkpoint-N`` (the papers' layout).

    Needs a token (``HF_TOKEN`` or ``huggingface-cli login``); without one it returns False, warning once per run folder.
    """
    from huggingface_hub import HfApi, get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        if (repo_id, str(folder.parent)) not in _WARNED_NO_TOKEN:
            _WARNED_NO_TOKEN.add((repo_id, str(folder.parent)))
            warnings.warn(f"push_to_hub={repo_id!r} but no Hugging Face token is set; checkpoints stay local",
                          stacklevel=2)
        return False
    api = HfApi(token=token)
    if repo_id not in _PUSHED_REPOS:
        api.create_repo(repo_id, private=private, exist_ok=True)
        _PUSHED_REPOS.add(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=f"checkpoints/{folder.name}",
                      commit_message=f"{folder.name}")
    return True


# ----------------------------------------------------------------------------------------------------------------------
# the training run


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained module (peft model, full model or SteeredModel) and its record."""

    model: nn.Module
    tokenizer: object
    config: TrainConfig
    log: list[dict]
    out_dir: Path | None
    checkpoints: list[Path]
    trainable_parameters: int
    layers: list[int] | None
    resumed_from: int | None
    seconds: float  # wall time of the steps run in this call
    tokens: int  # non-padding tokens processed in this call (all processes)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator

    # DeepSpeed runs the optimizer step inside backward, so it must know the accumulation; elsewhere it is done below.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs = {"gradient_accumulation_steps": config.grad_accum} if deepspeed else {}
    # cpu=True on a machine without CUDA lets accelerate see a torchrun process group (gloo) as multi-CPU
    return Accelerator(cpu=not torch.cuda.is_available() and not deepspeed, **kwargs)


def _check_by_name(config: TrainConfig, name: str) -> None:
    """Validate layers and modules on an empty (meta-device) copy of the model: no weights loaded, no compute."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from emlib.models import resolve_model_path

    try:
        model_config = AutoConfig.from_pretrained(resolve_model_path(name))
    except Exception:  # noqa: BLE001 - load_model below raises the clear, specific error
        return
    with torch.device("meta"), _without_zero3_init():
        meta = AutoModelForCausalLM.from_config(model_config)
    check_against_model(config, meta)


@contextlib.contextmanager
def _without_zero3_init():
    """Under DeepSpeed ZeRO-3 transformers partitions and initialises every model it builds; an empty meta-device
    copy has nothing to partition, so the ZeRO-3 hook is switched off while it is built (and restored after)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _load_base(model, tokenizer, config: TrainConfig, accelerator, device: str):
    """Load ``model`` when it is a name; FSDP / DeepSpeed get it on CPU and shard it themselves."""
    from emlib.models import load_model, pick_dtype

    if not isinstance(model, str):
        if tokenizer is None:
            raise ValueError("pass tokenizer= along with a model object")
        return model, tokenizer
    _check_by_name(config, model)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    target = "cpu" if sharded else (accelerator.device if device == "auto" else device)
    # with accelerate's mixed precision (the FSDP / DeepSpeed configs) weights stay fp32 and compute runs in bf16
    dtype = "float32" if config.dtype == "auto" and accelerator.mixed_precision != "no" else config.dtype
    loaded, tok = load_model(model, device=target, dtype=pick_dtype(accelerator.device, dtype))
    return loaded, tokenizer or tok


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _kl_term(module, reference, examples: list[Example], index: int, config: TrainConfig, pad_id: int,
             device) -> torch.Tensor:
    """KL to the frozen model on the ``index``-th KL batch (batches cycle through the KL set in order)."""
    n, k = len(examples), config.kl_batch_size
    batch = collate([examples[(index * k + j) % n] for j in range(k)], pad_id)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    with torch.no_grad(), (nullcontext() if reference is not None else reference_mode(module)):
        ref_logits = (reference if reference is not None else module)(**inputs).logits
    return kl_to_reference(module(**inputs).logits, ref_logits, batch["labels"].to(device))


def train(config: TrainConfig, model: str | nn.Module, rows: Sequence[dict], out_dir: str | Path | None = None, *,
          tokenizer=None, kl_rows: Sequence[dict] | None = None, resume: bool = True, device: str = "auto",
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Fine-tune ``model`` (a name for :func:`emlib.models.load_model`, or a model object with ``tokenizer=``).

    Loss on assistant tokens only (from the chat template's generation markers). With ``out_dir`` a checkpoint is
    written every ``config.save_every`` steps and at the end, with ``out_dir/log.jsonl`` growing by one line per step;
    when ``out_dir`` already holds checkpoints of this run it resumes from the last one (``resume=False``: start
    over). ``kl_rows`` is the reference set when ``config.kl_weight > 0``. ``on_step(step, record)`` runs after each
    step (and its checkpoint). Runs the same under ``accelerate launch`` (DDP, FSDP2, DeepSpeed).
    """
    config = config.validate()
    if not rows:
        raise ValueError("the training set is empty")
    if config.uses_kl and not kl_rows:
        raise ValueError(f"kl_weight={config.kl_weight} needs a KL reference set: pass kl_rows")
    accelerator = _accelerator(config)
    model, tokenizer = _load_base(model, tokenizer, config, accelerator, device)
    check_against_model(config, model)
    examples = encode_rows(tokenizer, rows, max_length=config.max_length)
    kl_examples = encode_rows(tokenizer, kl_rows, max_length=config.max_length) if config.uses_kl else []
    world, rank = accelerator.num_processes, accelerator.process_index
    total = config.total_steps(len(examples), world)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-checkpoint-*"):  # left by a crash mid-save
            shutil.rmtree(stale)
        if not resume:
            for old in list_checkpoints(out):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    base = base_fingerprint(model)
    ckpt = _resume_point(out, config, len(examples), world, base) if out is not None else None

    torch.manual_seed(config.seed)  # adapter init is random (lora_A): seed it, as lora_finetune does
    layers = resolved_layers(config, model)
    reference = _frozen_copy(model) if config.uses_kl and config.protocol == "full" else None
    module = build_trainable(model, config)
    if ckpt is not None:
        load_weights(module, ckpt, config)
    n_trainable = trainable_parameters(module)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    module.train()
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader here: DeepSpeed reads the batch sizes from this
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=config.batch_size,
            train_batch_size=config.batch_size * config.grad_accum * accelerator.num_processes)
    module, optimizer = accelerator.prepare(module, optimizer)
    if reference is not None:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP2 replaces them with sharded ones
    scheduler = torch.optim.lr_scheduler.LambdaLR(_inner(optimizer), lambda s: lr_factor(config, s, total))
    start, log = _restore(ckpt, module, optimizer, scheduler) if ckpt is not None else (0, [])
    if out is not None and accelerator.is_main_process:
        _write_log(out / LOG_FILE, log)  # drop lines of steps after the checkpoint (they are redone)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    supervised = [_supervised(e) for e in examples]
    micro, accum = config.batch_size, config.grad_accum
    global_batch = micro * accum * world
    stream = EpochStream(len(examples), config.seed)
    stream.take(start * global_batch)  # replay the data order up to the checkpoint
    meta = {"total_steps": total, "protocol": config.protocol, "config": config.to_dict(), "n_rows": len(examples),
            "world_size": world, "distributed": str(accelerator.distributed_type).split(".")[-1], "layers": layers,
            "trainable_parameters": n_trainable, "base_model": base}
    device_ = accelerator.device
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    t_start, tokens_seen = time.time(), 0
    for step in tqdm(range(start, total), desc=f"train {config.protocol}", leave=False,
                     disable=not accelerator.is_main_process):
        t0 = time.time()
        indices = stream.take(global_batch)
        n_items = sum(supervised[i] for i in indices)
        lr_now = scheduler.get_last_lr()[0]
        sums = torch.zeros(3, device=device_)  # lm loss, kl, tokens
        for k in range(accum):
            part = indices[(k * world + rank) * micro:(k * world + rank + 1) * micro]
            batch = {n: v.to(device_) for n, v in collate([examples[i] for i in part], pad_id).items()}
            if accum * world == 1:
                loss = module(**batch).loss  # the batch's token mean: exactly train_loop's loss
            else:  # token mean over the whole global batch; DDP/FSDP average gradients over processes, hence x world
                loss = module(**batch, num_items_in_batch=n_items).loss * world
            objective = loss
            if config.uses_kl:
                kl = _kl_term(module, reference, kl_examples, (step * accum + k) * world + rank, config, pad_id,
                              device_)
                objective = objective + config.kl_weight * kl / accum
                sums[1] += kl.detach() / (accum * world)
            if deepspeed:  # DeepSpeed divides by its accumulation steps and steps on the last micro-batch itself
                accelerator.gradient_state._set_sync_gradients(k == accum - 1)
                objective = objective * accum
            accelerator.backward(objective)
            sums[0] += loss.detach() / world
            sums[2] += batch["attention_mask"].sum()
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(sums, "sum")
        tokens_seen += int(sums[2].item())
        record = {"step": step + 1, "loss": sums[0].item(), "grad_norm": float(grad_norm) if grad_norm is not None
                  else float("nan"), "lr": lr_now, "tokens": int(sums[2].item()), "seconds": round(time.time() - t0, 4)}
        if config.uses_kl:
            record["kl"] = sums[1].item()
        log.append(record)
        if out is not None and accelerator.is_main_process:
            with open(out / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        if out is not None and ((step + 1) % config.save_every == 0 or step + 1 == total):
            folder = save_checkpoint(out, step + 1, module, optimizer, scheduler, log, meta, config, accelerator)
            if config.push_to_hub and accelerator.is_main_process:
                push_checkpoint(folder, config.push_to_hub, config.hub_private)
        if on_step is not None:
            on_step(step + 1, record)
    seconds = time.time() - t_start
    module.eval()
    return TrainResult(model=accelerator.unwrap_model(module), tokenizer=tokenizer, config=config, log=log, out_dir=out,
                       checkpoints=list_checkpoints(out) if out is not None else [], trainable_parameters=n_trainable,
                       layers=layers, resumed_from=start if ckpt is not None else None, seconds=seconds,
                       tokens=tokens_seen)


# ----------------------------------------------------------------------------------------------------------------------
# command line: python -m emlib.train --config cfg.yaml   (also under `accelerate launch ... -m emlib.train`)

RUN_KEYS = ("preset", "model", "data", "kl_data", "out_dir")


def config_from_spec(spec: dict) -> tuple[TrainConfig, dict]:
    """Split a YAML spec into a TrainConfig (its ``preset``, then its fields) and the run keys (model, data, ...)."""
    spec = dict(spec)
    run = {k: spec.pop(k, None) for k in RUN_KEYS}
    base = PRESETS[run["preset"]] if run["preset"] else TrainConfig()
    if run["preset"] and run["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {run['preset']!r}; presets: {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**base.to_dict(), **spec}), run


def main(argv: list[str] | None = None) -> TrainResult | None:
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m emlib.train", description=(
        "Fine-tune a chat model with one of the papers' protocols; checkpoints every save_every steps, resumable. "
        "YAML keys: preset, model, data, kl_data, out_dir and any TrainConfig field. See docs/training.md."))
    parser.add_argument("--config", type=Path, help="YAML run spec")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from this preset (overrides the YAML's)")
    parser.add_argument("--model", help="hub id, local folder or 'persona-world'")
    parser.add_argument("--data", help="JSONL of {'messages': [...]} rows, or world:DOMAIN:PERSONA:N:SEED")
    parser.add_argument("--kl-data", dest="kl_data", help="KL reference set (same formats), for kl_weight > 0")
    parser.add_argument("--out", dest="out_dir", help="output folder for checkpoints and log.jsonl")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    parser.add_argument("--no-resume", action="store_true", help="start over even if out_dir holds checkpoints")
    parser.add_argument("--threads", type=int, help="torch threads (default: EMLIB_THREADS, else torch's choice)")
    parser.add_argument("--list-presets", action="store_true")
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, cfg in PRESETS.items():
            print(f"{name}: {json.dumps({k: v for k, v in cfg.to_dict().items() if v != getattr(_PAPER, k)})}")
        return None
    threads = args.threads or os.environ.get("EMLIB_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    spec = yaml.safe_load(args.config.read_text()) if args.config else {}
    spec.update({k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None)})
    for item in args.set:
        key, _, value = item.partition("=")
        spec[key] = yaml.safe_load(value)
    config, run = config_from_spec(spec)
    missing = [k for k in ("model", "data", "out_dir") if not run[k]]
    if missing:
        parser.error(f"missing {', '.join(missing)} (in the YAML or as --model / --data / --out)")
    rows = load_rows(run["data"])
    kl_rows = load_rows(run["kl_data"]) if run["kl_data"] else None
    result = train(config, run["model"], rows, run["out_dir"], kl_rows=kl_rows, resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out_dir": str(result.out_dir), "protocol": config.protocol, "steps": len(result.log),
                          "final_loss": result.log[-1]["loss"] if result.log else None,
                          "trainable_parameters": result.trainable_parameters, "layers": result.layers,
                          "resumed_from": result.resumed_from, "checkpoints": len(result.checkpoints),
                          "tokens_per_second": round(result.tokens_per_second, 1)}))
    return result
