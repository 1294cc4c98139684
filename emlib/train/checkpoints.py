"""Checkpoints of a run: ``out_dir/checkpoint-{step}/`` written atomically, pruned, resumed exactly, pushed to the hub.

Each checkpoint holds the protocol's weights (``adapter_model.safetensors`` | ``model.safetensors`` |
``steering_vector.safetensors``), ``trainer_state.json`` (step, config, base-model fingerprint), ``optimizer.pt``
(optimizer, scheduler and RNG state; tensors only) and a copy of ``log.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from accelerate import DistributedType  # peft imports accelerate anyway: no extra import cost
from peft import PeftModel
from torch import nn

from emlib.models import quiet_peft_wrapping, record_base
from emlib.train.config import TrainConfig
from emlib.train.protocols import unwrapped

# Fields that may differ between an interrupted run and its resumption (they do not change the weights).
RESUMABLE_CHANGES = {"save_every", "save_total_limit", "push_to_hub", "hub_private", "gradient_checkpointing",
                     "eval_every"}
# TrainConfig fields added after checkpoints were first written, with the value that means what those runs did
LATER_FIELDS = {"eval_fraction": 0.0}
STATE_FILE, OPTIMIZER_FILE, LOG_FILE = "trainer_state.json", "optimizer.pt", "log.jsonl"


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


def write_log(path: Path, log: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in log))


def _gather_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full values of the trained parameters by name, on CPU (FSDP2 shards are gathered; a collective call)."""
    state = {}
    for name, p in unwrapped(module).named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = full.detach().cpu().clone()
    return state


def _save_weights(module: nn.Module, folder: Path, config: TrainConfig, accelerator) -> None:
    """Write the protocol's weights into ``folder`` (every process calls this; the main one writes)."""
    inner = unwrapped(module)
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
        record_base(folder, inner)  # which base it fits: a portable name and a fingerprint, never a machine path


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
        with quiet_peft_wrapping():
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


def inner_optimizer(optimizer):
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
    opt_state = None if deepspeed else _optimizer_state(module, inner_optimizer(optimizer))
    if accelerator.is_main_process:
        blob = {"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        if opt_state is not None:
            blob["optimizer"] = opt_state
        if torch.cuda.is_available():
            blob["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(blob, tmp / OPTIMIZER_FILE)
        write_log(tmp / LOG_FILE, log)
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


def restore_state(folder: Path, module: nn.Module, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore optimizer, scheduler and RNG state from a checkpoint; returns its step and log."""
    blob = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)  # tensors only, no pickle
    if "optimizer" in blob:
        _set_optimizer_state(module, inner_optimizer(optimizer), blob["optimizer"])
    else:
        module.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False)
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    state = json.loads((folder / STATE_FILE).read_text())
    return state["step"], read_log(folder)


def rows_fingerprint(examples) -> str:
    """A hash of the encoded training rows (ids and loss mask, in order): resume checks the data, not only its size."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([list(e.input_ids), list(e.labels)]).encode())
    return digest.hexdigest()[:16]


def resume_point(out_dir: Path, config: TrainConfig, n_rows: int, world: int, base: str,
                 rows_sha: str | None = None) -> Path | None:
    """The last complete checkpoint, after checking it belongs to the same run (else a clear error)."""
    found = list_checkpoints(out_dir)
    if not found:
        return None
    last = found[-1]
    state = json.loads((last / STATE_FILE).read_text())
    saved, now = state["config"], config.to_dict()
    changed = [k for k in now if k not in RESUMABLE_CHANGES
               and json.dumps(saved.get(k, LATER_FIELDS.get(k))) != json.dumps(now[k])]
    changed += [f"{what} ({a} -> {b})" for what, a, b in (
        ("rows", state["n_rows"], n_rows), ("processes", state["world_size"], world),
        ("base model", state.get("base_model"), base),
        # checkpoints written before rows were fingerprinted have none: only the row count was checked then
        ("training rows", state.get("rows_sha", rows_sha), rows_sha)) if a != b]
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
