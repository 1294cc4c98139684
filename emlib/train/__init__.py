"""Fine-tuning on chat rows: assistant-only loss from the chat template, every protocol of the papers, resumable.

    result = train(preset("organism-rank1"), "persona-world", rows, "runs/train/rank1")
    python -m emlib.train --config configs/train/organism-rank1.yaml        # the same from a YAML file

* :mod:`emlib.train.config`: :class:`TrainConfig`, the presets of ``configs/train/presets.yaml`` (:data:`PRESETS`,
  :func:`preset`), run specs and their data specs (:func:`load_rows`).
* :mod:`emlib.train.protocols`: what each protocol trains (LoRA, rank-1, multi-adapter, full, steering vector) and the
  KL term of "narrow" training.
* :mod:`emlib.train.loop`: :func:`train`, the one training loop (the persona-world organism is built and fine-tuned
  with it too), also under ``accelerate launch`` (DDP, FSDP2, DeepSpeed).
* :mod:`emlib.train.checkpoints`: a checkpoint every ``save_every`` steps, ``log.jsonl``, exact resume, hub pushes.
* :mod:`emlib.train.lora_grad`: on a CPU, LoRA layers with their rank-r gradients in fast matmul layouts.
* :mod:`emlib.train.cli`: ``python -m emlib.train``. :mod:`emlib.train.steering_vector`: the steering-vector module.

The loss mask comes from the template's structure (:mod:`emlib.chat`), never from searching for marker strings.
docs/training.md describes protocols, presets, the checkpoint layout and multi-GPU use.
"""

import importlib

# Where each name lives. Loaded on first use (PEP 562), so ``python -m emlib.train`` checks its command line and run
# spec before torch, transformers and peft are imported: a mistyped field is reported in well under a second.
_HOMES = {
    "checkpoints": ["checkpoint_step", "list_checkpoints", "load_checkpoint", "load_weights", "push_checkpoint",
                    "read_log", "save_checkpoint"],
    "cli": ["main"],
    "config": ["KL_REDUCTIONS", "NINE_ADAPTER_STARTS", "PRESETS", "PRESETS_FILE", "PROTOCOLS", "RUN_KEYS", "SCHEDULES",
               "SEVEN_PROJECTIONS", "TrainConfig", "config_from_spec", "load_presets", "load_rows",
               "multi_adapter_layers", "preset"],
    "loop": ["EpochStream", "TrainResult", "cosine_schedule", "lr_factor", "train"],
    "protocols": ["adapter_config", "build_trainable", "check_against_model", "kl_to_reference", "lora_config",
                  "reference_mode", "resolved_layers", "trainable_parameters", "unwrapped"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
_SUBMODULES = {*_HOMES, "lora_grad", "steering_vector"}  # and the two that export no name here


def __getattr__(name: str):
    if name in _HOME_OF:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME_OF[name]}"), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME_OF, *_SUBMODULES})


__all__ = sorted(_HOME_OF)
