"""A trained steering vector: one learned vector added to the residual stream at one decoder layer.

This is the "steering vector toggle" organism of "Emergent Misalignment is Easy, Narrow Misalignment is Hard" (NMH):
the decoder layer's output becomes ``h + alpha * v`` at every token position, ``v`` starts at zero and is the only
trained parameter (``d_model`` numbers). :class:`SteeredModel` wraps a causal LM with such a vector so it trains,
generates and saves like any model; ``with steered.disabled():`` gives the unsteered model back (the frozen reference
for a KL term, with no second copy of the weights).

    steered = SteeredModel(model, layer=24, alpha=256)
    steered.save("ckpt")                         # ckpt/steering_vector.safetensors + steering_config.json
    steered = load_steering_vector(model, "ckpt")
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from emlib.models import check_layer, d_model, decoder_layers

WEIGHTS_NAME = "steering_vector.safetensors"
CONFIG_NAME = "steering_config.json"


class SteeredModel(nn.Module):
    """A causal LM (weights frozen) plus one trainable vector added, times ``alpha``, to decoder layer ``layer``."""

    def __init__(self, model: nn.Module, layer: int, alpha: float = 1.0):
        super().__init__()
        self.layer = check_layer(model, layer)
        self.alpha = float(alpha)
        self.enabled = True
        ref = next(model.parameters())
        # float32 even for a bf16 model: a d_model vector is tiny and bf16 would swallow small Adam updates
        self.vector = nn.Parameter(torch.zeros(d_model(model), device=ref.device, dtype=torch.float32))
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self._hook = decoder_layers(model)[self.layer].register_forward_hook(self._add)

    def _add(self, module: nn.Module, args, output):
        """Forward hook: add ``alpha * vector`` at every position (decoder layers return a tensor or a tuple)."""
        if not self.enabled:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + (self.alpha * self.vector).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def _no_split_modules(self):  # FSDP's transformer auto-wrap looks for the decoder layer class here
        return getattr(self.model, "_no_split_modules", None)

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the unsteered model inside this block (e.g. the KL reference)."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def detach(self) -> nn.Module:
        """Remove the hook and return the plain model, unsteered."""
        self._hook.remove()
        return self.model

    def save(self, folder: str | Path, vector: torch.Tensor | None = None) -> Path:
        """Write ``steering_vector.safetensors`` (key ``vector``) and ``steering_config.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        v = self.vector if vector is None else vector
        save_file({"vector": v.detach().float().cpu().contiguous()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps({"layer": self.layer, "alpha": self.alpha,
                                                      "d_model": int(v.numel())}, indent=1))
        return folder

    def load_vector(self, folder: str | Path) -> None:
        """Load a saved vector into this model (shape-checked)."""
        v = load_file(str(Path(folder) / WEIGHTS_NAME))["vector"]
        if v.shape != self.vector.shape:
            raise ValueError(f"steering vector in {folder} has shape {tuple(v.shape)}, this model needs "
                             f"{tuple(self.vector.shape)}")
        with torch.no_grad():
            self.vector.copy_(v)


def load_steering_vector(model: nn.Module, folder: str | Path) -> SteeredModel:
    """Wrap ``model`` with the steering vector saved in ``folder`` (its layer and alpha come from the config)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}, so it is not a saved steering vector")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    steered = SteeredModel(model, cfg["layer"], cfg["alpha"])
    steered.load_vector(folder)
    return steered
