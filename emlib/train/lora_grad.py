"""LoRA training on a CPU: the same layer, ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ``, with its gradients in fast matmul layouts.

peft runs a LoRA layer as three ``nn.Linear`` calls and a scaling; autograd then computes the rank-r gradients
``∂B = gᵀ(xAᵀ)`` and ``∂(xAᵀ) = g B`` as matmuls whose inner or outer size is r. On a CPU (MKL, one thread) those skinny
shapes are 4-6x slower than the same product laid out the other way round: for a 128 -> 512 projection of 1,000
tokens at rank 8, ``mm(g.t(), xa)`` takes 1.26 ms and ``mm(xa.t(), g).t()`` 0.20 ms, as long as the base layer's own
matmul. :class:`LoraLinearFunction` computes the same values (forward and gradients, up to float rounding) with every
product in its fast layout, the scaling on the r-sized factors instead of the full output. On the persona-world
organism (rank 8 on every projection, batch 16) a training step is about 20 % faster (bench/bench_train.py).

:func:`fast_lora_gradients` routes a model's eligible LoRA layers through it for the length of a ``with`` block: CPU
training, plain LoRA (:func:`emlib.interventions.plain_lora_linears`) with one active adapter, no dropout, a frozen base
layer and one dtype. Anything else (a GPU, where cuBLAS has no such gap; DoRA; hooked parts; FSDP / DeepSpeed, whose
hooks gather the LoRA weights on the sub-modules' own calls) runs peft's forward as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn


class LoraLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b + s·(x Aᵀ) Bᵀ`` for a frozen ``W``, ``b``; gradients for ``x``, ``A`` and ``B``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        xa = torch.mm(lora_a, flat.t()).t()  # (tokens, r), laid out (r, tokens): the fast way to form it
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
        out.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(flat, xa, weight, lora_a, lora_b)
        ctx.scale, ctx.shape = scale, shape
        return out.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        flat, xa, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_b = torch.mm(xa.t(), g).t().mul_(ctx.scale) if ctx.needs_input_grad[4] else None  # s·gᵀ(xAᵀ)
        grad_xa = torch.mm(lora_b.t(), g.t()).t().mul_(ctx.scale)  # (tokens, r) = s·g B
        grad_a = torch.mm(grad_xa.t(), flat) if ctx.needs_input_grad[3] else None  # (r, in)
        grad_x = torch.mm(g, weight).addmm_(grad_xa, lora_a).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_a, grad_b, None


def _forward(layer: nn.Module, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = layer.base_layer
    # whatever changed since the block was entered (adapters disabled, e.g. for the KL reference; another adapter
    # set; autocast; extra arguments) is peft's to run
    if (args or kwargs or layer.disable_adapters or layer.merged or layer.active_adapters != [adapter]
            or x.dtype != base.weight.dtype or torch.is_autocast_enabled(x.device.type)):
        return type(layer).forward(layer, x, *args, **kwargs)
    return LoraLinearFunction.apply(x, base.weight, base.bias, layer.lora_A[adapter].weight,
                                    layer.lora_B[adapter].weight, layer.scaling[adapter])


def _routed_adapter(layer: nn.Module) -> str | None:
    """The one active adapter this layer can run through :class:`LoraLinearFunction`, None if it cannot."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1:
        return None
    a = adapters[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[a], layer.lora_B[a]
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    dtypes = {base.weight.dtype, lora_a.weight.dtype, lora_b.weight.dtype}
    usable = (frozen and len(dtypes) == 1 and base.weight.device.type == "cpu"
              and isinstance(layer.lora_dropout[a], nn.Identity) and lora_a.bias is None and lora_b.bias is None)
    return a if usable else None


@contextmanager
def fast_lora_gradients(module: nn.Module) -> Iterator[int]:
    """Inside the block, each eligible LoRA layer of ``module`` runs :class:`LoraLinearFunction`; yields how many.

    Each layer's ``forward`` is shadowed by an instance attribute and restored after, even on error: peft's modules
    and parameters are untouched, so optimizer, checkpoints and saving see the same objects.
    """
    from emlib.interventions import plain_lora_linears

    routed = {layer: a for layer in plain_lora_linears(module) if (a := _routed_adapter(layer)) is not None}
    for layer, adapter in routed.items():
        layer.forward = partial(_forward, layer, adapter)
    try:
        yield len(routed)
    finally:
        for layer in routed:
            del layer.forward  # the class's forward (peft's) is back
