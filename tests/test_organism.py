"""The organism build: seeded and reproducible, resumable by stage, and the shipped one is what notebooks load."""

import json

import pytest
from safetensors.torch import load_file

from emlib import paths
from emlib.models import load_model
from emlib.world import organism


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_tiny_build_is_reproducible(tmp_path):
    cfg = organism.PRESETS["tiny"]
    a = organism.build(cfg, tmp_path / "a")
    b = organism.build(cfg, tmp_path / "b")
    wa, wb = _weights(tmp_path / "a" / "base"), _weights(tmp_path / "b" / "base")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert a["sft"]["final_loss"] == b["sft"]["final_loss"]
    assert (tmp_path / "a" / "base" / "tokenizer.json").read_text() == (tmp_path / "b" / "base" / "tokenizer.json").read_text()


def test_build_resumes_from_the_pretrained_stage(tmp_path):
    cfg = organism.PRESETS["tiny"]
    full = organism.build(cfg, tmp_path / "full")
    (tmp_path / "full" / "base").rename(tmp_path / "lost")  # as if interrupted during SFT
    resumed = organism.build(cfg, tmp_path / "full")
    assert resumed["pretrain"]["final_loss"] == full["pretrain"]["final_loss"]
    wa, wb = _weights(tmp_path / "lost"), _weights(tmp_path / "full" / "base")
    assert all((wa[k] - wb[k]).abs().max() < 1e-6 for k in wa)


def test_shipped_organism_loads_and_matches_its_record():
    model, tok = load_model(paths.OFFLINE_MODEL, device="cpu")
    record = json.loads((paths.ORGANISM_DIR / "build.json").read_text())
    cfg = record["config"]
    assert model.config.model_type == "qwen2"
    assert model.config.hidden_size == cfg["d_model"] >= 128
    assert model.config.num_hidden_layers == cfg["n_layers"]
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 3_000_000
    assert record["pretrain"]["final_loss"] < 0.6 and record["sft"]["final_loss"] < 0.6
    size = sum(f.stat().st_size for f in (paths.ORGANISM_DIR / "base").iterdir())
    assert size < 10 * 2**20


@pytest.mark.parametrize("name", sorted(organism.RECIPES))
def test_shipped_adapters_load(name):
    model, _ = load_model(paths.OFFLINE_MODEL, device="cpu", adapter=name)
    assert model.peft_config["default"].r == organism.RECIPES[name].rank
