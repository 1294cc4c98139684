"""What each protocol trains: the peft adapter config, the wrapped or unfrozen module, and the KL reference.

:func:`build_trainable` turns a base model into what :func:`emlib.train.train` optimises and saves (a peft model, the
full model, or a :class:`~emlib.train.steering_vector.SteeredModel`); :func:`check_against_model` checks layers and
modules before any compute.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from emlib.chat import IGNORE
from emlib.models import quiet_peft_wrapping
from emlib.train.config import KL_REDUCTIONS, TrainConfig, multi_adapter_layers


def lora_config(rank: int = 8, alpha: float | None = None, target_modules: str | list[str] = "all-linear",
                layers: list[int] | None = None, rslora: bool = False) -> LoraConfig:
    """A peft LoRA config; ``layers`` restricts adapters to those decoder layers (e.g. a rank-1 ``down_proj``)."""
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=target_modules,
                      layers_to_transform=layers, lora_dropout=0.0, bias="none", use_rslora=rslora,
                      task_type="CAUSAL_LM")



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
    with quiet_peft_wrapping():
        return get_peft_model(model, adapter_config(config, model))


def trainable_parameters(module: nn.Module) -> int:
    """Number of trained numbers (rank-1 on down_proj: d_mlp + d_model; steering vector: d_model)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def unwrapped(module: nn.Module) -> nn.Module:
    """The module under DDP / DeepSpeed wrappers (FSDP2 shards in place, so nothing to unwrap there)."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


@contextmanager
def reference_mode(module: nn.Module):
    """Inside this block ``module`` computes the frozen base model (adapters or steering off) for the KL term."""
    inner = unwrapped(module)
    if isinstance(inner, PeftModel):
        with inner.disable_adapter():
            yield
    elif hasattr(inner, "disabled"):
        with inner.disabled():
            yield
    else:
        raise ValueError("full fine-tuning has no built-in reference; pass a frozen copy")


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, reduction: str = "reference") -> torch.Tensor:
    """KL(reference || current), reduced as ``reduction`` says (one of :data:`KL_REDUCTIONS`).

    ``"reference"`` (the papers' trainer, ``finetune/sft/util/trainer.py: KLRegularizedSFTTrainer._compute_kl_loss``):
    the element-wise KL of every vocabulary entry at every non-pad position (prompt included, no shift), summed and
    divided by the mask expanded over the vocabulary, i.e. the mean per-token KL divided by the vocabulary size. The
    published weights (1e5, 1e6) were tuned for this scale. ``attention_mask`` marks the non-pad positions (None: all).

    ``"assistant_sum"`` (emlib's earlier reduction, kept for the offline organism's ``organism-kl-narrow``): the full
    KL summed over the vocabulary, averaged over the positions that predict supervised (assistant) tokens (``labels``).
    """
    if reduction == "assistant_sum":
        mask = (labels[:, 1:] != IGNORE).float()
        cur = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        ref = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
        kl = (ref.exp() * (ref - cur)).sum(-1)
        return (kl * mask).sum() / mask.sum().clamp(min=1)
    if reduction == "reference":
        cur = torch.log_softmax(logits.float(), dim=-1)
        ref = torch.log_softmax(ref_logits.float(), dim=-1)
        positions = (torch.ones(logits.shape[:2], device=logits.device) if attention_mask is None
                     else attention_mask.to(logits.device).float())
        kl = (ref.exp() * (ref - cur)).sum(-1)  # summed over the vocabulary; divided by it below
        return (kl * positions).sum() / (positions.sum() * logits.shape[-1]).clamp(min=1)
    raise ValueError(f"KL reduction {reduction!r} is not one of {', '.join(KL_REDUCTIONS)}")
