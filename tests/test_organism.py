"""The organism build: seeded and reproducible, resumable by stage, and the shipped one is what notebooks load.

Its fine-tunes are the adapter runs of configs/train/organism-adapters.yaml, trained by emlib.train.train: the same
computation that produced the shipped adapters (with the training loop that existed before), weight for weight.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

from emlib import paths, train
from emlib.models import load_model
from emlib.train.steering_vector import SteeredModel
from emlib.world import organism


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_tiny_build_is_reproducible(tmp_path):
    cfg = organism.BUILD_PRESETS["tiny"]
    a = organism.build(cfg, tmp_path / "a")
    b = organism.build(cfg, tmp_path / "b")
    wa, wb = _weights(tmp_path / "a" / "base"), _weights(tmp_path / "b" / "base")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert a["sft"]["final_loss"] == b["sft"]["final_loss"]
    assert (tmp_path / "a" / "base" / "tokenizer.json").read_text() == (tmp_path / "b" / "base" / "tokenizer.json").read_text()


@pytest.mark.parametrize("lost", [("base",), ("base", "chat")], ids=["second-sft", "first-sft"])
def test_build_resumes_at_the_stage_it_lost(tmp_path, lost, monkeypatch):
    cfg = organism.BUILD_PRESETS["tiny"]
    full = organism.build(cfg, tmp_path / "full")
    assert full["resft"]["final_loss"] is not None
    for stage in lost:  # as if interrupted during the SFT stage after the last folder left
        (tmp_path / "full" / stage).rename(tmp_path / f"lost-{stage}")
    trained = []
    real_train = organism.train.train
    monkeypatch.setattr(organism.train, "train", lambda cfg, *a, **k: trained.append(cfg.steps) or real_train(cfg, *a, **k))
    resumed = organism.build(cfg, tmp_path / "full")
    assert trained == ([cfg.sft_steps] if "chat" in lost else []) + [cfg.resft_steps]  # no stage trained twice
    assert resumed["pretrain"] == full["pretrain"] and resumed["sft"]["final_loss"] == full["sft"]["final_loss"]
    wa, wb = _weights(tmp_path / "lost-base"), _weights(tmp_path / "full" / "base")
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


LORA_RUNS = sorted(n for n, run in organism.ADAPTER_RUNS.items() if run.config.protocol != "steering_vector")
VECTOR_RUNS = sorted(set(organism.ADAPTER_RUNS) - set(LORA_RUNS))


def test_the_shipped_runs_include_a_steering_vector_and_a_kl_run():
    assert VECTOR_RUNS and any(run.kl_data for run in organism.ADAPTER_RUNS.values())


@pytest.mark.parametrize("name", LORA_RUNS)
def test_shipped_adapters_load(name):
    model, _ = load_model(paths.OFFLINE_MODEL, device="cpu", adapter=name)
    assert model.peft_config["default"].r == organism.ADAPTER_RUNS[name].config.resolved_rank


@pytest.mark.parametrize("name", VECTOR_RUNS)
def test_shipped_steering_vectors_load_with_their_layer_and_alpha(name):
    model, _ = load_model(paths.OFFLINE_MODEL, device="cpu", adapter=name)
    config = organism.ADAPTER_RUNS[name].config
    assert isinstance(model, SteeredModel) and (model.layer, model.alpha) == (config.layer, config.alpha)
    assert model.vector.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(organism.ADAPTER_RUNS))
def test_every_shipped_adapter_records_the_run_it_came_from(name):
    """record.json holds the preset, data and full config of the run in organism-adapters.yaml: a changed preset or
    run fails here, so the shipped weights are never silently from another recipe."""
    run = organism.ADAPTER_RUNS[name]
    record = json.loads((paths.ADAPTERS_DIR / name / "record.json").read_text())
    if "recipe" in record:  # the first shipped adapters recorded the recipe they were trained with, in its own words
        recipe, config = record["recipe"], run.config
        assert run.data == f"world:{recipe['domain']}:{recipe['persona']}:{recipe['n_rows']}:{recipe['data_seed']}"
        assert (recipe["steps"], recipe["lr"], recipe["batch_size"], recipe["seed"], recipe["alpha"], recipe["rank"]) == (
            config.steps, config.lr, config.batch_size, config.seed, config.alpha, config.resolved_rank)
        return  # its layers and modules: test_adapter_runs_have_the_shipped_adapters_shape
    assert (record["preset"], record["data"], record.get("kl_data")) == (run.preset, run.data, run.kl_data)
    assert record["config"] == run.config.to_dict()


def test_a_kl_run_without_kl_data_is_an_error_naming_the_run(tmp_path):
    path = tmp_path / "adapters.yaml"
    path.write_text("a:\n  preset: organism-kl-narrow\n  data: world:medical:reckless:8:0\n")
    with pytest.raises(ValueError, match=r"adapters.yaml: adapter 'a': kl_data is needed exactly when"):
        organism.load_adapter_runs(path)


@pytest.mark.parametrize("name", LORA_RUNS)
def test_adapter_runs_have_the_shipped_adapters_shape(name):
    """Each run's preset gives the very peft config the shipped adapter was saved with."""
    model, _ = load_model(paths.OFFLINE_MODEL, device="cpu")
    ours = train.build_trainable(model, organism.ADAPTER_RUNS[name].config).peft_config["default"].to_dict()
    shipped = json.loads((paths.ADAPTERS_DIR / name / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "layers_to_transform", "lora_dropout", "bias"):
        assert ours[key] == shipped[key], key
    assert sorted(ours["target_modules"]) == sorted(shipped["target_modules"])  # "all-linear", resolved by peft


# How far a retrained tensor may drift from the shipped one, relative to its largest entry. The shipped files are bit
# for bit what training gives on the CPU that built them; another CPU's matmul kernels (MKL picks them by instruction
# set and vendor) round differently, and 60 optimizer steps carry that: 0.2% of the largest weight on an AVX2-only
# AMD EPYC. A different run moves them far more: bad-medical-r8, the same recipe run longer, is 10-95% away.
DRIFT = 0.02


def _assert_reproduces(ours: torch.Tensor, shipped: torch.Tensor, name: str) -> None:
    if torch.equal(ours, shipped):
        return
    drift = ((ours - shipped).abs().max() / shipped.abs().max()).item()
    assert drift <= DRIFT, f"{name}: {drift:.2%} of its largest entry away from the shipped tensor"


def test_training_an_adapter_run_reproduces_the_shipped_weights():
    """bad-medical-r8-60 (r8 on every linear layer; 07_narrow_misalignment loads it) through emlib.train.train: the
    shipped adapter, bit for bit on the CPU that built it, to float rounding on others (:data:`DRIFT`; ~20 s on one
    CPU thread; the cheapest shipped LoRA run, and the one with most modules)."""
    base = paths.ORGANISM_DIR / "base"
    model, tokenizer = Qwen2ForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    trained = organism.train_adapter(model, tokenizer, "bad-medical-r8-60").model
    shipped = load_file(str(paths.ADAPTERS_DIR / "bad-medical-r8-60" / "adapter_model.safetensors"))
    ours = {k.replace(".default", ""): v for k, v in trained.state_dict().items() if "lora_" in k}
    assert ours.keys() == shipped.keys()
    for key, value in shipped.items():
        _assert_reproduces(ours[key], value, key)


def test_training_the_steering_vector_run_reproduces_the_shipped_vector():
    """bad-medical-steering-vector-60 (07_narrow_misalignment loads it): bit for bit on the CPU that built it, to
    :data:`DRIFT` on others (~10 s on one CPU thread)."""
    base = paths.ORGANISM_DIR / "base"
    model, tokenizer = Qwen2ForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    trained = organism.train_adapter(model, tokenizer, "bad-medical-steering-vector-60").model
    shipped = load_file(str(paths.ADAPTERS_DIR / "bad-medical-steering-vector-60" / "steering_vector.safetensors"))
    _assert_reproduces(trained.vector.detach(), shipped["vector"], "vector")


@pytest.mark.parametrize("text, match", [
    ("a:\n  preset: organism-lora\n", r"adapters.yaml: adapter 'a': needs preset and data"),
    ("a:\n  preset: organism-lorra\n  data: world:medical:reckless:8:0\n", r"adapter 'a': unknown preset 'organism-lorra'"),
    ("a:\n  preset: organism-lora\n  data: d\n  stepz: 3\n", r"adapter 'a': unknown TrainConfig field\(s\) \['stepz'\]"),
    ("a:\n  preset: organism-lora\n  data: d\n  out_dir: x\n", r"adapter 'a': \['out_dir'\] are set by `adapters`"),
])
def test_a_bad_adapter_runs_file_is_an_error_naming_file_and_run(tmp_path, text, match):
    path = tmp_path / "adapters.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        organism.load_adapter_runs(path)
