"""The shipped ``accelerate launch`` configs (configs/accelerate/*.yaml) for 14B-32B training.

What a CPU-only machine can check, and does here: every file loads with accelerate's own config loader (no unknown
keys), every ``fsdp_config`` / ``deepspeed_config`` key is an option ``accelerate launch`` knows with a value it
accepts, DeepSpeed's gradient clipping matches emlib's, and the FSDP and DeepSpeed files launch ``emlib.train`` on a
tiny model (one process, ``--cpu``), train and checkpoint.

What it cannot: sharding itself. Measured with accelerate 1.15 on this machine: with no CUDA, an FSDP config gives
``DistributedType.NO`` (Accelerator(cpu=False): each process trains alone) or ``MULTI_CPU`` DDP (cpu=True, what
emlib asks for), never FSDP. DeepSpeed ZeRO-3 runs for real in one CPU process when deepspeed is installed (last
test). docs/training.md says how to check them on a GPU box.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from emlib import train, world
from emlib.testing import tiny_model

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {o.lstrip("-") for a in launch_command_parser()._actions for o in a.option_strings}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
    assert config.num_processes >= 1 and config.num_machines == 1, path.name
    options = launch_options()
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in (getattr(config, section) or {}):
            option = key if key.startswith(prefix) else prefix + key
            assert option in options, f"{path.name}: {section}.{key} is not an `accelerate launch` option"


def test_fsdp_values_are_ones_accelerate_accepts():
    from accelerate.utils.constants import FSDP_AUTO_WRAP_POLICY, FSDP_STATE_DICT_TYPE

    spec = yaml.safe_load((REPO / "configs/accelerate/fsdp.yaml").read_text())
    fsdp = spec["fsdp_config"]
    assert spec["distributed_type"] == "FSDP" and str(fsdp["fsdp_version"]) == "2"
    assert fsdp["fsdp_auto_wrap_policy"] in FSDP_AUTO_WRAP_POLICY
    assert fsdp["fsdp_state_dict_type"] in FSDP_STATE_DICT_TYPE
    # emlib's checkpoints are gathered safetensors: a sharded state dict would not load outside FSDP
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_deepspeed_values_match_emlib():
    spec = yaml.safe_load((REPO / "configs/accelerate/deepspeed_zero3.yaml").read_text())
    ds = spec["deepspeed_config"]
    assert spec["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == 3
    assert ds["offload_optimizer_device"] in OFFLOAD_DEVICES and ds["offload_param_device"] in OFFLOAD_DEVICES
    assert ds["gradient_clipping"] == train.TrainConfig().max_grad_norm, "DeepSpeed clips; keep it equal to emlib's"
    assert ds["zero3_save_16bit_model"] is True  # lets checkpoints gather one full safetensors model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("accel")
    model, tok = tiny_model("qwen2")
    model.save_pretrained(folder / "tiny")
    tok.save_pretrained(folder / "tiny")
    rows = world.finetune_rows("medical", "reckless", 16, 1)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero3"])
def test_gpu_configs_launch_emlib_train_on_one_cpu_process(tiny_run, name):
    """The same file and command as on a GPU box, with --cpu --num_processes 1 (no sharding: see module doc)."""
    out = tiny_run / f"out-{name}"
    spec = {"preset": "organism-lora", "model": str(tiny_run / "tiny"), "data": str(tiny_run / "rows.jsonl"),
            "out_dir": str(out), "steps": 4, "batch_size": 4, "save_every": 2}
    (tiny_run / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EMLIB_THREADS": "1",
           "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(REPO / "configs/accelerate" / f"{name}.yaml"), "--cpu", "--num_processes", "1", "-m", "emlib.train",
           "--config", str(tiny_run / f"{name}.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["steps"] == 4 and summary["checkpoints"] == 2
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and (out / "checkpoint-4" / "adapter_model.safetensors").is_file()


def test_deepspeed_zero3_config_trains_checkpoints_and_resumes_on_cpu(tiny_run, tmp_path):
    """ZeRO-3 for real, one CPU process (DeepSpeed's CPU accelerator, gloo): the shipped file with bf16 and the process
    count swapped for CPU. Needs ``pip install deepspeed`` (not an emlib dependency): skipped without it. This found
    three bugs a GPU launch would have hit too (a device_map under ZeRO-3, no micro-batch size without a DataLoader,
    LambdaLR on DeepSpeed's optimizer wrapper)."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    config = yaml.safe_load((REPO / "configs/accelerate/deepspeed_zero3.yaml").read_text())
    config.update(mixed_precision="no", num_processes=1)
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    spec = {"preset": "organism-lora", "model": str(tiny_run / "tiny"), "data": str(tiny_run / "rows.jsonl"),
            "out_dir": str(out), "steps": 4, "batch_size": 4, "save_every": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EMLIB_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(tmp_path / "ds.yaml"),
           "-m", "emlib.train", "--config", str(tmp_path / "run.yaml")]

    def launch():
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    launch()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["distributed"] == "DEEPSPEED"
    uninterrupted = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 2: the next launch resumes from checkpoint-2
    launch()
    resumed = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    assert set(resumed) == set(uninterrupted)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
