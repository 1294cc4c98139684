"""Every intervention on a model's computation, in one place: steering, ablation, adapter scaling, B projection.

Activation level (decoder-layer outputs): :class:`Steer` adds ``scale * v`` (at all, prompt or last positions),
:class:`Ablate` projects ``v`` out, :class:`Compose` applies several. Each is a small object holding the one formula it
applies; the same object registers plain forward hooks for the batched sampler (``sample_answers(..., steering=...)``)
or edits layer outputs inside an nnsight trace (:func:`intervened_logits`), and the tests check the two agree.

Weight level: :func:`scaled_adapter` / :func:`scaled_adapters` multiply LoRA adapters' outputs (all, or by name),
:func:`scaled_solution` rescales a trained solution (LoRA or steering vector), :func:`lora_b_projected_out` removes a
direction from every residual-writing LoRA B column. All are context managers that restore the model after.

Adapter scalars: :func:`recorded_lora_scalars` reads each LoRA adapter's ``A . x`` (the scalar a rank-1 adapter
multiplies its B by), :func:`lora_scalar_patch` builds a :class:`PatchLoraScalars` that replaces them on target prompts
with those a source prompt gave (CLR App. J), usable as a sampler ``steering`` argument.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from emlib.models import check_layer, d_model, decoder_layers, n_layers

POSITIONS = ("all", "prompt", "last")  # where Steer adds its vector
_LAYER_MODULE = re.compile(r"layers\.(\d+)\.(?:.*\.)?([A-Za-z_][\w]*)$")  # "...layers.21.mlp.down_proj" -> 21, down_proj

# ------------------------------------------------------------------------------------------ activation level


def layer_module_names(model: nn.Module) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in decoder_layers(model)]


def envoy_at(wrapped, dotted: str):
    """The nnsight envoy of the submodule at ``dotted`` (e.g. ``base_model.model.model.layers.3``)."""
    envoy = wrapped
    for part in dotted.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def layer_hidden(output) -> torch.Tensor:
    """A decoder layer's hidden states: transformers 5 returns the tensor, older versions a (hidden, ...) tuple."""
    return output[0] if isinstance(output, tuple) else output


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dimension (a zero vector stays zero)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _layer_vectors(model: nn.Module, vectors: torch.Tensor, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    """{layer: vector} from a per-layer ``[n_layers, d]`` tensor or a single ``[d]`` vector (``layers`` None: all).

    A single vector at every layer is the papers' single-direction ablation (one layer's direction removed at all
    layers, CLR §3.3).
    """
    if vectors.dim() == 1:
        chosen = range(n_layers(model)) if layers is None else layers
        return {check_layer(model, layer): vectors for layer in chosen}
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

    def prompt_may_be_split(self) -> bool:
        """Whether the edit is the same when a prompt is prefilled in parts (see :func:`prompt_may_be_split`)."""
        return False

    def targets(self, model: nn.Module) -> dict[int, torch.Tensor]:
        return _layer_vectors(model, torch.as_tensor(self.vectors), self.layers)

    def __call__(self, model: nn.Module) -> list:
        layers = decoder_layers(model)
        return [layers[i].register_forward_hook(self._hook(v)) for i, v in self.targets(model).items()]

    def _hook(self, vector: torch.Tensor):
        def hook(module, args, output):
            hidden = layer_hidden(output)
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

    def prompt_may_be_split(self) -> bool:
        return self.positions != "last"  # "last" edits the final token of the pass it sees

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

    def prompt_may_be_split(self) -> bool:
        return True  # every position alike

    def edit(self, hidden: torch.Tensor, vector: torch.Tensor, prefill: bool) -> torch.Tensor:
        v = unit(vector)
        return hidden - (hidden @ v).unsqueeze(-1) * v


@dataclass
class Compose(Intervention):
    """Several interventions at once (e.g. ablate one direction and steer with another); applied in order."""

    parts: Sequence[Intervention]

    def prompt_may_be_split(self) -> bool:
        return all(part.prompt_may_be_split() for part in self.parts)

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
    names = layer_module_names(model)
    prefill = input_ids.shape[1] > 1
    with wrapped.trace(input_ids=input_ids, attention_mask=attention_mask):
        for layer in sorted(by_layer):  # nnsight must visit modules in execution order
            envoy = envoy_at(wrapped, names[layer])
            output = envoy.output
            hidden = layer_hidden(output)
            for part, vector in by_layer[layer]:
                hidden = part.edit(hidden, vector.to(hidden), prefill)
            envoy.output = (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        logits = wrapped.output.logits.save()
    return logits


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


@contextmanager
def scaled_adapter(model: nn.Module, factor: float | None) -> Iterator[nn.Module]:
    """Multiply every LoRA layer's contribution by ``factor`` inside the block (None: leave it); restored after.

    peft computes ``base(x) + B(A(x)) * scaling[adapter]``, so scaling that dict scales the adapter's output exactly
    (0 gives the base model, 1 the adapter as trained, 5 the papers' "x5" amplification).
    """
    if factor is None:
        yield model
        return
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("adapter_scale needs a peft LoRA model, but the model has no LoRA layers")
    if any(getattr(m, "merged", False) for m in layers):
        raise ValueError("cannot scale a merged adapter; load it unmerged (PeftModel.from_pretrained)")
    with scaled_lora_layers({m: factor for m in layers}):
        yield model


@contextmanager
def scaled_lora_layers(factors: Mapping[nn.Module, float]) -> Iterator[None]:
    """Multiply each peft LoRA layer's ``scaling`` by its factor inside the block; restored after, even on error."""
    saved = [(m, dict(m.scaling)) for m in factors]
    try:
        for m, factor in factors.items():
            for name in m.scaling:
                m.scaling[name] *= factor
        yield
    finally:
        for m, scaling in saved:
            m.scaling.update(scaling)


def _adder(vector: torch.Tensor) -> Callable:
    def hook(module, args, output):
        if isinstance(output, tuple):  # older transformers: (hidden, ...); v5 decoder layers return the tensor
            return (output[0] + vector.to(output[0]),) + tuple(output[1:])
        return output + vector.to(output)
    return hook


def prompt_may_be_split(steering: Steering | None) -> bool:
    """Whether ``steering`` acts the same when the sampler prefills a prompt in parts: first the prefix every prompt
    of the batch shares (the chat template's opening, the system prompt), then each prompt's rest, each part a
    prefill pass of more than one token. True for none, for ``[(layer, vector), ...]`` (added at every position) and
    for interventions that edit every position alike (:class:`Ablate`, :class:`Steer` at ``all`` positions) or every
    prompt position alike (:class:`Steer` at ``prompt``); False for :class:`Steer` at the ``last`` position and for
    any other callable, whose hooks may expect the whole prompt in one pass."""
    if steering is None:
        return True
    if isinstance(steering, Intervention):
        return steering.prompt_may_be_split()
    return not callable(steering)


@contextmanager
def steered(model: nn.Module, steering: Steering | None) -> Iterator[nn.Module]:
    """Apply ``steering`` inside the block and remove every hook after, even on error."""
    if steering is None:
        yield model
        return
    if callable(steering):
        handles = list(steering(model) or [])
    else:
        layers = decoder_layers(model)
        handles = [layers[check_layer(model, layer)].register_forward_hook(_adder(torch.as_tensor(vec)))
                   for layer, vec in steering]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA layer of ``model`` by readable name ``L{layer}.{module}``, in layer order.

    Raises when the model has no LoRA layers (a plain model, or an adapter merged into its weights).
    """
    from peft.tuners.lora import LoraLayer

    found = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        match = _LAYER_MODULE.search(path)
        if match is None:
            raise ValueError(f"LoRA layer {path!r} is not inside a numbered decoder layer; cannot name it L<layer>")
        found.append((int(match.group(1)), match.group(2), module))
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: probing and adapter steering need a peft LoRA "
                         "model (load one with emlib.models.load_model(name, adapter=...))")
    if any(getattr(m, "merged", False) for _, _, m in found):
        raise ValueError("the LoRA adapter is merged into the weights, so its scalars cannot be read or scaled; "
                         "load it unmerged (PeftModel.from_pretrained)")
    return {f"L{layer}.{name}": m for layer, name, m in sorted(found, key=lambda t: (t[0], t[1]))}


@contextmanager
def scaled_adapters(model: nn.Module, factors: Mapping[str, float], default: float = 1.0) -> Iterator[nn.Module]:
    """Multiply each named adapter's output by its factor, every other adapter by ``default``; restored after.

    Names are :func:`lora_modules` names (``"L21.down_proj"``). peft adds ``B(A(x)) * scaling``, so scaling that dict
    scales the adapter exactly: ``{}`` with ``default=0`` is the base model, ``{"L2.down_proj": 20}`` with
    ``default=0`` keeps only that adapter, amplified (the papers' "x20, others zeroed").
    """
    layers = lora_modules(model)
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise ValueError(f"no adapter named {unknown}; this model's adapters are {list(layers)}")
    with scaled_lora_layers({m: float(factors.get(name, default)) for name, m in layers.items()}):
        yield model


# ------------------------------------------------------------------------------------------ adapter scalars A . x

ANSWER_SCALARS = ("own", "first_token")  # what PatchLoraScalars gives generated tokens


def active_adapter(module: nn.Module) -> str:
    """The one active peft adapter of a LoRA layer (several stacked adapters would make A . x ambiguous)."""
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        raise ValueError(f"expected exactly one active LoRA adapter per layer, found {active}")
    return active[0]


@contextmanager
def recorded_lora_scalars(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, ``{adapter name: A . x}`` of the last forward pass: each LoRA layer's ``lora_A`` output
    ``[batch, seq, rank]`` (names as :func:`lora_modules`); the hooks are removed after, even on error."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in lora_modules(model).items():
        def hook(_module, _inputs, output, name=name):
            seen[name] = output.detach()
        handles.append(module.lora_A[active_adapter(module)].register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class PatchLoraScalars:
    """Generate on target prompts with each LoRA adapter's ``A . x`` taken from a source prompt (CLR App. J).

    ``scalars`` maps a target prompt's token ids to its source prompt's scalars ``{adapter: [source tokens, rank]}``
    (build it with :func:`lora_scalar_patch`). A rank-1 adapter adds ``B * scaling * (A . x)``, so fixing ``A . x``
    fixes its whole contribution: this is the reference's patching of each adapter's delta into the residual stream
    (``lora_analysis/util/lora_patch_util.py``). Prompt positions are aligned from the first token, as the reference
    aligns them; target positions past the source's length keep their own scalars. ``answer_scalars``: ``"own"``
    (generated tokens keep the scalars the model computes) or ``"first_token"`` (every generated token gets the
    source's first-token scalar: what the reference's KV-cached generation adds, since it slices the stored deltas
    to the one new position; the first chat token is the same in every prompt, so this is a context-free constant).

    Called on a model it registers the hooks and returns their handles, so it is a sampler ``steering`` argument:
    ``sample_answers(model, tok, targets, steering=patch)``. Each prefill row is matched to its target by its token
    ids (left padding: the row ends with them), so batching, sharing and reordering of prompts do not matter; a prompt
    that is not a target raises.
    """

    scalars: Mapping[tuple[int, ...], Mapping[str, torch.Tensor]]
    answer_scalars: str = "own"
    first_token: dict[str, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        if self.answer_scalars not in ANSWER_SCALARS:
            raise ValueError(f"answer_scalars must be one of {ANSWER_SCALARS}, got {self.answer_scalars!r}")
        if not self.scalars:
            raise ValueError("PatchLoraScalars needs at least one target prompt")
        self._lengths = sorted({len(ids) for ids in self.scalars}, reverse=True)
        sources = list(self.scalars.values())
        self.first_token = {name: s[0] for name, s in sources[0].items()}
        # a constant for every generated token only makes sense if all sources agree on it
        for source in sources[1:] if self.answer_scalars == "first_token" else []:
            for name, first in self.first_token.items():
                if not torch.allclose(source[name][0].float(), first.float(), rtol=1e-2, atol=1e-3):
                    raise ValueError(f"answer_scalars='first_token' needs every source prompt to start alike, but "
                                     f"{name}'s first-token scalar differs between sources ({first.tolist()} vs "
                                     f"{source[name][0].tolist()}); use answer_scalars='own'")

    def _source_of(self, row: list[int]) -> tuple[int, Mapping[str, torch.Tensor]]:
        for n in self._lengths:  # the longest target the (left-padded) row ends with
            if n > len(row):  # row[-n:] would be the whole, shorter row: a target this long cannot be in it
                continue
            key = tuple(row[-n:])
            if key in self.scalars:
                return n, self.scalars[key]
        raise ValueError(f"a prompt of {len(row)} tokens (padding included) is not one of the patch's "
                         f"{len(self.scalars)} target prompts; sample exactly the targets given to lora_scalar_patch")

    def __call__(self, model: nn.Module) -> list:
        adapters = lora_modules(model)
        plan: list = []  # per prefill row: (target length, source scalars); empty while decoding

        def read_ids(_module, args):
            ids = args[0]
            plan[:] = [self._source_of(row) for row in ids.tolist()] if ids.shape[1] > 1 else []

        def patch(name: str):
            def hook(_module, _inputs, output):
                if plan:
                    out = output.clone()
                    for b, (n_target, source) in enumerate(plan):
                        k = min(n_target, len(source[name]))
                        start = output.shape[1] - n_target
                        out[b, start:start + k] = source[name][:k].to(out)
                    return out
                if self.answer_scalars == "first_token":
                    return self.first_token[name].to(output).expand_as(output)
                return output
            return hook

        missing = sorted(set(adapters) - set(next(iter(self.scalars.values()))))
        if missing:
            raise ValueError(f"the patch has no scalars for adapters {missing}; build it on this model")
        handles = [model.get_input_embeddings().register_forward_pre_hook(read_ids)]
        handles += [m.lora_A[active_adapter(m)].register_forward_hook(patch(name)) for name, m in adapters.items()]
        return handles


@torch.no_grad()
def lora_scalar_patch(model: nn.Module, tokenizer, targets: Sequence[str], sources: Sequence[str],
                      system: str | None = None, answer_scalars: str = "own") -> PatchLoraScalars:
    """A :class:`PatchLoraScalars` giving each target question the LoRA scalars of its source question's prompt.

    ``targets[i]`` is answered with the scalars ``sources[i]`` gave: each source's chat prompt (with ``system``, as the
    sampler builds it) runs once, unpadded, through ``model`` and every adapter's ``A . x`` at its tokens is kept (the
    reference's pass 1, run in the fine-tuned model). A target listed twice must have one source.
    """
    from emlib.chat import chat_prompt

    if len(targets) != len(sources):
        raise ValueError(f"{len(targets)} targets but {len(sources)} sources: give one source per target")
    device = next(model.parameters()).device

    def ids_of(question: str) -> tuple[int, ...]:  # tokenised as the sampler tokenises its prompts
        return tuple(tokenizer(chat_prompt(tokenizer, question, system), add_special_tokens=False)["input_ids"])

    recorded: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
    with recorded_lora_scalars(model) as seen, torch.no_grad():  # a read: no autograd graph for the source passes
        for target, source in zip(targets, sources):
            if source not in recorded:
                model(input_ids=torch.tensor([ids_of(source)], device=device))
                recorded[source] = {name: value[0].clone() for name, value in seen.items()}
            key = ids_of(target)
            if key in scalars and scalars[key] is not recorded[source]:
                raise ValueError(f"target {target!r} is listed with two different sources")
            scalars[key] = recorded[source]
    return PatchLoraScalars(scalars, answer_scalars)


def lora_layers(module: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def plain_lora_linears(module: nn.Module) -> list:
    """LoRA layers on an ``nn.Linear`` that peft runs as plain ``base(x) + B(A(x))·s`` per active adapter: not
    merged, adapters enabled, no variant (DoRA...), no ``forward`` already shadowed and no hook on any part (e.g.
    :class:`PatchLoraScalars` reads ``A·x``). The layers whose computation a fast path may replace with the same
    formula (:func:`emlib.generate.merged_lora`, :func:`emlib.train.lora_grad.fast_lora_gradients`)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []

    def hooked(part: nn.Module) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in part.modules())

    return [m for m in module.modules()
            if isinstance(m, LoraLinear) and isinstance(m.base_layer, nn.Linear) and not m.merged
            and not m.disable_adapters and "forward" not in m.__dict__
            and not any(a in m.lora_variant for a in m.active_adapters)
            and not any(hooked(part) for part in (m.base_layer, m.lora_A, m.lora_B, m.lora_dropout))]


def steering_vector_of(module: nn.Module):
    return module if hasattr(module, "vector") and hasattr(module, "disabled") else None


@contextmanager
def scaled_solution(module: nn.Module, factor: float) -> Iterator[nn.Module]:
    """Multiply the learned update by ``factor`` inside the block (LoRA: every layer's scaling; steering: the vector).

    0 gives the base model, 1 the solution as trained; the original values are restored after, even on error.
    """
    steered = steering_vector_of(module)
    if steered is not None:
        saved = steered.vector.detach().clone()
        try:
            with torch.no_grad():
                steered.vector.mul_(factor)
            yield module
        finally:
            with torch.no_grad():
                steered.vector.copy_(saved)
        return
    if not lora_layers(module):
        raise ValueError("expected a peft LoRA model or a SteeredModel; found neither LoRA layers nor a vector")
    with scaled_adapter(module, factor):  # the same LoRA scaling generation uses
        yield module


# A steering intervention: (layer, vector) pairs added to those decoder layers' outputs, or a callable that registers
# forward hooks on the model and returns their handles (anything with .remove()).
Steering = Union[Sequence[tuple[int, torch.Tensor]], Callable[[nn.Module], Sequence[Any]]]
