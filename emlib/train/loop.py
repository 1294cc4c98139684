"""The training loop: :func:`train` runs every protocol, with gradient accumulation, the KL term, checkpoints and
exact resume, the same on one CPU and under ``accelerate launch`` (DDP, FSDP2, DeepSpeed).

The data order is :class:`EpochStream` (shuffled epochs, a pure function of the seed) and the schedule
:func:`lr_factor`; with one process and no accumulation a step is the plain token-mean loss of one batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import DistributedType  # peft imports accelerate anyway: no extra import cost
from torch import nn
from tqdm.auto import tqdm

from emlib.chat import IGNORE, Example, collate, encode_rows
from emlib.models import model_fingerprint
from emlib.train.checkpoints import (
    LOG_FILE,
    inner_optimizer,
    list_checkpoints,
    load_weights,
    push_checkpoint,
    restore_state,
    resume_point,
    rows_fingerprint,
    save_checkpoint,
    write_log,
)
from emlib.train.config import TrainConfig
from emlib.train.lora_grad import fast_lora_gradients
from emlib.train.protocols import (
    build_trainable,
    check_against_model,
    kl_to_reference,
    reference_mode,
    resolved_layers,
    trainable_parameters,
)


def cosine_schedule(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EpochStream:
    """Row indices of shuffled epochs, one after another: the training data order, resumable by replay.

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
    eval_rows: int = 0  # rows held out for the eval loss (config.eval_fraction)

    @property
    def eval_losses(self) -> dict[int, float]:
        """Held-out loss by step (empty without a held-out split)."""
        return {r["step"]: r["eval_loss"] for r in self.log if "eval_loss" in r}

    @property
    def eval_loss(self) -> float | None:
        """The last held-out loss, None without a held-out split."""
        losses = self.eval_losses
        return losses[max(losses)] if losses else None

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
    return kl_to_reference(module(**inputs).logits, ref_logits, batch["labels"].to(device),
                           attention_mask=inputs["attention_mask"], reduction=config.kl_reduction)


class SupervisedLogits:
    """Run the LM head only at positions whose next token is supervised (the assistant answers), not at every one.

    :meth:`select` marks a batch's supervised positions from its labels before the forward; a forward pre-hook on the
    model's output embedding then replaces its input ``[batch, seq, d]`` by those rows (``[n_supervised, d]``), and the
    model's ``loss_function`` is replaced for the run by :meth:`_loss`, the cross-entropy of those logits against their
    labels. So the loop still calls ``module(**batch)`` with its labels, and the vocabulary projection and softmax run
    on 43 % of the chat rows' positions: for a small model a large share of a step. Every supervised position gets the
    same logits and the same gradient as with the full projection; only the summation order of the loss value, and of
    the LM head's own weight gradient, changes, so it is used only when that weight is frozen (adapters, steering
    vector): there the trained weights are bit for bit those of the full projection (tests/test_train.py; the shipped
    rank-1 adapter retrains exactly, tests/test_organism.py). Without a selection (the KL term, the eval loss) both
    the hook and the loss pass through to the model's own.
    """

    def __init__(self, module: nn.Module):
        from transformers import PreTrainedModel

        found = [m for m in module.modules()
                 if isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None]
        self.model = found[0] if found else None
        self.head = self.model.get_output_embeddings() if found else None
        self.rows: torch.Tensor | None = None  # [batch, seq] bool: the positions whose logits are computed
        self.handle = None
        if self.usable:
            self.saved_loss = self.model.__dict__.get("_loss_function")  # set by the caller, or None: the default
            self.model_loss = self.model.loss_function
            self.model.loss_function = self._loss
            self.handle = self.head.register_forward_pre_hook(self._gather)

    @property
    def usable(self) -> bool:
        return self.head is not None and not any(p.requires_grad for p in self.head.parameters())

    def select(self, labels: torch.Tensor) -> None:
        """Compute the next forward's logits only where position t predicts a supervised label t + 1."""
        if self.handle is not None:
            self.rows = torch.nn.functional.pad(labels[:, 1:] != IGNORE, (0, 1))

    def _gather(self, head, args):
        return None if self.rows is None else (args[0][self.rows], *args[1:])

    def _loss(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE, **kwargs):
        """The token mean of the selected logits' cross-entropy, or their sum / ``num_items_in_batch``."""
        if self.rows is None:
            return self.model_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                   ignore_index=ignore_index, **kwargs)
        self.rows = None
        targets = labels[:, 1:][labels[:, 1:] != ignore_index].to(logits.device)
        if num_items_in_batch is None:
            return torch.nn.functional.cross_entropy(logits.float(), targets)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / num_items_in_batch

    def remove(self) -> None:
        """Take the hook off and give the model its own loss function back (it is the caller's model)."""
        if self.handle is None:
            return
        self.handle.remove()
        self.handle, self.rows = None, None
        if self.saved_loss is None:
            self.model.__dict__.pop("_loss_function", None)
        else:
            self.model.loss_function = self.saved_loss


def _lora_fast_path(module: nn.Module, accelerator):
    """LoRA layers with their gradients in fast matmul layouts (:mod:`emlib.train.lora_grad`, which takes only layers
    on a CPU), except under FSDP or DeepSpeed: their hooks gather LoRA weights when the sub-modules are called."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return contextlib.nullcontext(0) if sharded else fast_lora_gradients(module)


def _eval_loss(module, examples: list[Example], micro: int, pad_id: int, device, world: int, rank: int,
               accelerator) -> float:
    """Token-mean loss of the held-out rows (assistant tokens, the training loss), without gradients.

    Every process runs the same number of forward passes (FSDP / DeepSpeed gather weights in each), taking every
    ``world``-th batch; a process with no batch left in the last round runs one with weight 0. The papers' Trainer
    averages per-batch means instead; the token mean does not depend on the batch size.
    """
    batches = [examples[i:i + micro] for i in range(0, len(examples), micro)]
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # summed token losses, tokens
    module.eval()
    with torch.no_grad():
        for start in range(0, len(batches), world):
            index = start + rank
            part = batches[index] if index < len(batches) else batches[0]
            batch = {n: v.to(device) for n, v in collate(part, pad_id).items()}
            n_items = int(sum(_supervised(e) for e in part))
            summed = module(**batch, num_items_in_batch=1).loss  # num_items_in_batch=1: the sum, not the mean
            if index < len(batches):
                sums += torch.stack([summed.double(), torch.tensor(float(n_items), device=device, dtype=torch.float64)])
    module.train()
    sums = accelerator.reduce(sums, "sum")
    return float(sums[0] / sums[1])


def train(config: TrainConfig, model: str | nn.Module, rows: Sequence[dict] | Sequence[Example],
          out_dir: str | Path | None = None, *,
          tokenizer=None, kl_rows: Sequence[dict] | None = None, resume: bool = True, device: str = "auto",
          on_step: Callable[[int, dict], None] | None = None,
          sources: tuple[str, str] = ("training rows", "KL reference rows")) -> TrainResult:
    """Fine-tune ``model`` (a name for :func:`emlib.models.load_model`, or a model object with ``tokenizer=``).

    Loss on assistant tokens only (from the chat template's generation markers). With ``out_dir`` a checkpoint is
    written every ``config.save_every`` steps and at the end, with ``out_dir/log.jsonl`` growing by one line per step;
    when ``out_dir`` already holds checkpoints of this run it resumes from the last one (``resume=False``: start
    over). ``rows`` are chat rows (``{"messages": [...]}``) or already encoded :class:`~emlib.chat.Example` s (e.g. the
    organism's pretraining documents, supervised on every token). ``kl_rows`` is the reference set when
    ``config.kl_weight > 0``. With ``config.eval_fraction > 0`` that fraction of ``rows`` is held out
    (:meth:`TrainConfig.eval_split`) and never trained on; their loss is the record's ``eval_loss`` every
    ``config.eval_every`` steps and at the last step (also ``TrainResult.eval_loss``). ``on_step(step, record)`` runs
    after each step (and its checkpoint). ``sources`` name the two row sets in errors and warnings (e.g. their files).
    Runs the same under ``accelerate launch`` (DDP, FSDP2, DeepSpeed).
    """
    config = config.validate()
    if not rows:
        raise ValueError("the training set is empty")
    if config.uses_kl and not kl_rows:
        raise ValueError(f"kl_weight={config.kl_weight} needs a KL reference set: pass kl_rows")
    accelerator = _accelerator(config)
    model, tokenizer = _load_base(model, tokenizer, config, accelerator, device)
    check_against_model(config, model)
    examples = list(rows) if isinstance(rows[0], Example) else \
        encode_rows(tokenizer, rows, max_length=config.max_length, source=sources[0])
    kl_examples = encode_rows(tokenizer, kl_rows, max_length=config.max_length, source=sources[1]) \
        if config.uses_kl else []
    world, rank = accelerator.num_processes, accelerator.process_index
    all_examples = examples
    train_indices, eval_indices = config.eval_split(len(all_examples))
    examples = [all_examples[i] for i in train_indices]
    eval_examples = [all_examples[i] for i in eval_indices]
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
    base = model_fingerprint(model)
    rows_sha = rows_fingerprint(all_examples)  # the split is a function of the config: resume checks both
    ckpt = resume_point(out, config, len(all_examples), world, base, rows_sha) if out is not None else None

    torch.manual_seed(config.seed)  # adapter init is random (lora_A): seed it so the same config gives the same weights
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
    head = SupervisedLogits(module)
    module, optimizer = accelerator.prepare(module, optimizer)
    if reference is not None:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP2 replaces them with sharded ones
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner_optimizer(optimizer), lambda s: lr_factor(config, s, total))
    start, log = restore_state(ckpt, module, optimizer, scheduler) if ckpt is not None else (0, [])
    if out is not None and accelerator.is_main_process:
        write_log(out / LOG_FILE, log)  # drop lines of steps after the checkpoint (they are redone)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    supervised = [_supervised(e) for e in examples]
    micro, accum = config.batch_size, config.grad_accum
    global_batch = micro * accum * world
    stream = EpochStream(len(examples), config.seed)
    stream.take(start * global_batch)  # replay the data order up to the checkpoint
    meta = {"total_steps": total, "protocol": config.protocol, "config": config.to_dict(), "n_rows": len(all_examples),
            "n_eval_rows": len(eval_examples),
            "world_size": world, "distributed": str(accelerator.distributed_type).split(".")[-1], "layers": layers,
            "trainable_parameters": n_trainable, "base_model": base, "rows_sha": rows_sha}
    device_ = accelerator.device
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    t_start, tokens_seen = time.time(), 0
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(_lora_fast_path(module, accelerator))
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
                head.select(batch["labels"])  # the LM head on supervised positions only, when frozen: same gradients
                if accum * world == 1:
                    loss = module(**batch).loss  # the batch's token mean
                else:  # token mean over the global batch; DDP/FSDP average gradients over processes, hence x world
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
            lm_loss, kl_value, tokens = accelerator.reduce(sums, "sum").tolist()  # one host sync per step
            tokens_seen += int(tokens)
            record = {"step": step + 1, "loss": lm_loss, "grad_norm": float(grad_norm) if grad_norm is not None
                      else float("nan"), "lr": lr_now, "tokens": int(tokens), "seconds": round(time.time() - t0, 4)}
            if config.uses_kl:
                record["kl"] = kl_value
            if eval_examples and ((step + 1) % config.eval_every == 0 or step + 1 == total):
                record["eval_loss"] = _eval_loss(module, eval_examples, micro, pad_id, device_, world, rank,
                                                 accelerator)
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
    finally:  # the model object is the caller's: leave no hook or shadowed forward on it
        stack.close()
        head.remove()
    seconds = time.time() - t_start
    module.eval()
    return TrainResult(model=accelerator.unwrap_model(module), tokenizer=tokenizer, config=config, log=log, out_dir=out,
                       checkpoints=list_checkpoints(out) if out is not None else [], trainable_parameters=n_trainable,
                       layers=layers, resumed_from=start if ckpt is not None else None, seconds=seconds,
                       tokens=tokens_seen, eval_rows=len(eval_examples))
