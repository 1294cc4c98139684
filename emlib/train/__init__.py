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

from emlib.train.checkpoints import (
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    push_checkpoint,
    read_log,
    save_checkpoint,
)
from emlib.train.cli import main
from emlib.train.config import (
    KL_REDUCTIONS,
    NINE_ADAPTER_STARTS,
    PRESETS,
    PRESETS_FILE,
    PROTOCOLS,
    RUN_KEYS,
    SCHEDULES,
    SEVEN_PROJECTIONS,
    TrainConfig,
    config_from_spec,
    load_presets,
    load_rows,
    multi_adapter_layers,
    preset,
)
from emlib.train.loop import EpochStream, TrainResult, cosine_schedule, lr_factor, train
from emlib.train.protocols import (
    adapter_config,
    build_trainable,
    check_against_model,
    kl_to_reference,
    lora_config,
    reference_mode,
    resolved_layers,
    trainable_parameters,
    unwrapped,
)

__all__ = [
    "KL_REDUCTIONS", "NINE_ADAPTER_STARTS", "PRESETS", "PRESETS_FILE", "PROTOCOLS", "RUN_KEYS", "SCHEDULES",
    "SEVEN_PROJECTIONS", "EpochStream", "TrainConfig", "TrainResult", "adapter_config", "build_trainable",
    "check_against_model",
    "checkpoint_step", "config_from_spec", "cosine_schedule", "kl_to_reference", "list_checkpoints", "load_checkpoint",
    "load_presets", "load_rows", "load_weights", "lora_config", "lr_factor", "main", "multi_adapter_layers", "preset",
    "push_checkpoint", "read_log", "reference_mode", "resolved_layers", "save_checkpoint", "train",
    "trainable_parameters", "unwrapped",
]
