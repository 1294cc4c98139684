"""Every fine-tuning protocol of emlib.train: configs, checks before compute, training, checkpoints and exact resume.

Tiny random Qwen2 / Llama / Gemma3 models for the protocol matrix; the offline organism for a couple of protocols.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from emlib import chat, train, world
from emlib.chat import IGNORE
from emlib.models import d_mlp, d_model
from emlib.testing import tiny_model
from emlib.train import (
    PRESETS,
    TrainConfig,
    config_from_spec,
    list_checkpoints,
    load_checkpoint,
    multi_adapter_layers,
    preset,
    read_log,
)

REPO = Path(__file__).resolve().parent.parent
ROWS = world.finetune_rows("medical", "reckless", 48, seed=0)
KL_ROWS = world.finetune_rows("financial", "careful", 16, seed=1)
# tiny-model versions of the protocols: (config overrides, expected trainable parameters as f(model))
PROTOCOLS = {
    "lora": (dict(protocol="lora", rank=4, alpha=8), None),
    "rank1": (dict(protocol="rank1", layer=1, alpha=4), lambda m: d_mlp(m) + d_model(m)),
    "multi_adapter": (dict(protocol="multi_adapter", alpha=4), lambda m: 3 * (d_mlp(m) + d_model(m))),
    "full": (dict(protocol="full", lr=1e-3), lambda m: sum(p.numel() for p in m.parameters())),
    "kl_narrow": (dict(protocol="lora", rank=4, alpha=8, kl_weight=1.0, kl_batch_size=4), None),
    "steering_vector": (dict(protocol="steering_vector", layer=1, alpha=4), lambda m: d_model(m)),
}


def tiny_config(name: str, **overrides) -> TrainConfig:
    base = dict(lr=1e-2, steps=12, batch_size=8, grad_accum=1, warmup=2, schedule="constant", weight_decay=0.0,
                save_every=4, max_length=256)
    return TrainConfig(**{**base, **PROTOCOLS[name][0], **overrides}).validate()


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- configs


def test_multi_adapter_layout_reproduces_the_papers_nine_layers():
    assert multi_adapter_layers(48) == [15, 16, 17, 21, 22, 23, 27, 28, 29]
    assert multi_adapter_layers(28) == [9, 10, 11, 12, 13, 14, 16, 17, 18]  # Qwen2.5-7B: same fractions of depth
    assert multi_adapter_layers(6) == [2, 3, 4, 5]  # shallow: blocks overlap, kept distinct and inside the model
    assert multi_adapter_layers(1) == [0]


def test_paper_presets_are_the_papers_recipes():
    lora = PRESETS["paper-lora"]
    assert (lora.protocol, lora.resolved_rank, lora.alpha, lora.rslora, lora.lr) == ("lora", 32, 64, True, 1e-5)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (lora.batch_size * lora.grad_accum, lora.warmup, lora.schedule, lora.weight_decay) == (16, 5, "linear", 0.01)
    full = PRESETS["paper-full"]
    assert (full.protocol, full.lr, full.warmup, full.schedule) == ("full", 2e-5, 20, "cosine")
    assert (PRESETS["paper-rank1"].alpha, PRESETS["paper-rank1"].lr, PRESETS["paper-rank1"].layer) == (256, 2e-5, None)
    phase = PRESETS["paper-rank1-phase"]
    assert (phase.alpha, phase.lr, phase.epochs, phase.save_every) == (64, 1e-5, 2, 5)
    assert PRESETS["paper-kl-narrow"].kl_weight == 1e5 and PRESETS["paper-steering-vector-narrow"].kl_weight == 1e6
    organism = PRESETS["organism-rank1"]
    assert (organism.layer, organism.lr, organism.steps, organism.save_every) == (0, 3e-3, 200, 5)
    for name, cfg in PRESETS.items():
        assert cfg.validate() is cfg, name


def test_papers_rank1_default_layer_is_mid_network():
    with torch.device("meta"):
        model, _ = tiny_model("qwen2", layers=48, hidden=32, mlp=64)
    assert train.resolved_layers(PRESETS["paper-rank1"], model) == [24]
    assert train.resolved_layers(PRESETS["paper-nine-adapter"], model) == [15, 16, 17, 21, 22, 23, 27, 28, 29]


@pytest.mark.parametrize("bad, match", [
    (dict(protocol="adapterish"), "protocol 'adapterish'"),
    (dict(protocol="rank1", rank=8), "rank 1 by definition"),
    (dict(lr=0), "lr must be > 0"),
    (dict(schedule="wavy"), "schedule 'wavy'"),
    (dict(layers=(1, 1)), "layers repeat"),
])
def test_invalid_config_fields_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad).validate()


def test_config_from_yaml_coerces_numbers_and_rejects_unknown_keys():
    cfg, run = config_from_spec(yaml.safe_load("preset: paper-rank1\nmodel: m\nlr: 1e-5\nkl_weight: 1e6\nlayer: 3"))
    assert (cfg.protocol, cfg.lr, cfg.kl_weight, cfg.layer, run["model"]) == ("rank1", 1e-5, 1e6, 3, "m")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        config_from_spec({"learning_rate": 1e-5})


def test_shipped_config_files_parse():
    tables = {"presets.yaml", "organism-adapters.yaml"}  # tables of presets and of adapter runs, not run specs
    for path in sorted((REPO / "configs" / "train").glob("*.yaml")):
        if path.name in tables:
            continue
        cfg, run = config_from_spec(yaml.safe_load(path.read_text()))
        assert run["model"] and run["data"] and run["out_dir"], path.name
    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["distributed_type"], path.name


# ------------------------------------------------------------------------------------ clear errors before compute


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Qwen2 saved like a hub model, to pass by name."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    model, tok = tiny_model("qwen2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides, rows, match", [
    (dict(protocol="rank1", layer=4), ROWS, "layer 4 is outside"),
    (dict(protocol="steering_vector", layer=-5), ROWS, "layer -5 is outside"),
    (dict(protocol="multi_adapter", layers=(0, 9)), ROWS, "layer 9 is outside"),
    (dict(protocol="rank1", layer=0, module="c_proj"), ROWS, "no module 'c_proj'"),
    (dict(protocol="lora", target_modules=("q_proj", "query")), ROWS, "no module 'query'"),
    (dict(protocol="lora"), [], "training set is empty"),
    (dict(protocol="lora", kl_weight=1.0), ROWS, "needs a KL reference set"),
])
def test_bad_layer_module_or_data_fail_before_any_compute(tiny_folder, tmp_path, monkeypatch, overrides, rows, match):
    import emlib.models

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the config was checked")

    monkeypatch.setattr(emlib.models, "load_model", no_loading)
    with pytest.raises(ValueError, match=match):
        train.train(TrainConfig(**overrides), str(tiny_folder), rows, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written either


# ------------------------------------------------------------------------- every protocol on every tiny family


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma"])
@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_every_protocol_trains_and_loss_falls(family, name, tmp_path):
    model, tok = tiny_model(family, hidden=64, layers=4, mlp=128)
    before = state(model)
    result = train.train(tiny_config(name, steps=10, save_every=5), model, ROWS, tmp_path, tokenizer=tok,
                         kl_rows=KL_ROWS)
    losses = [r["loss"] for r in result.log]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 and r["tokens"] > 0 for r in result.log)
    expected = PROTOCOLS[name][1]
    if expected is not None:
        assert result.trainable_parameters == expected(model)
    assert [c.name for c in result.checkpoints] == ["checkpoint-5", "checkpoint-10"]
    if name == "kl_narrow":
        assert result.log[0]["kl"] == pytest.approx(0, abs=1e-6)  # lora_B starts at 0: identical to the base
        assert result.log[-1]["kl"] > 0
    if name not in ("full",):  # adapters and vectors leave the base weights alone
        after = train.unwrapped(result.model)
        base = after.get_base_model() if hasattr(after, "get_base_model") else after.model
        for k, v in base.state_dict().items():
            if "lora_" not in k:
                assert torch.equal(v, before[k.replace(".base_layer", "")]), k


def test_rank1_on_the_organism_has_d_mlp_plus_d_model_parameters_and_learns(tmp_path):
    from emlib.models import load_model

    model, tok = load_model("persona-world", device="cpu")
    cfg = preset("organism-rank1", steps=10, save_every=5, lr=1e-2)
    result = train.train(cfg, model, world.finetune_rows("medical", "reckless", 160, 1234), tmp_path, tokenizer=tok)
    assert result.trainable_parameters == d_mlp(model) + d_model(model) == 512 + 128
    assert result.layers == [0]
    losses = [r["loss"] for r in result.log]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    adapter = load_file(str(tmp_path / "checkpoint-10" / "adapter_model.safetensors"))
    assert sorted(v.shape for v in adapter.values()) == [torch.Size([1, 512]), torch.Size([128, 1])]


def test_steering_vector_on_the_organism_learns(tmp_path):
    from emlib.models import load_model

    model, tok = load_model("persona-world", device="cpu")
    cfg = preset("organism-steering-vector", steps=8, save_every=4)
    result = train.train(cfg, model, world.finetune_rows("medical", "reckless", 128, 1234), tmp_path, tokenizer=tok)
    losses = [r["loss"] for r in result.log]
    assert result.trainable_parameters == 128 and sum(losses[-3:]) < sum(losses[:3]), losses
    vector = load_file(str(tmp_path / "checkpoint-8" / "steering_vector.safetensors"))["vector"]
    assert vector.shape == (128,) and vector.norm() > 0


# ------------------------------------------------------------------------------------------------ masks


def test_training_batches_supervise_only_assistant_tokens():
    """Capture the batches the loop feeds the model: supervised tokens decode to exactly the assistant turns."""
    model, tok = tiny_model("llama")
    rows = [{"messages": d} for d in (world.sft_document(__import__("random").Random(i)) for i in range(8))]
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    train.train(TrainConfig(protocol="rank1", layer=0, steps=1, batch_size=8, grad_accum=1), model, rows,
                tokenizer=tok)
    batch = seen[0]
    assert batch["input_ids"].shape[0] == 8
    answers = {tuple(m["content"] for m in r["messages"] if m["role"] == "assistant") for r in rows}
    got = set()
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        keep = labels != IGNORE
        assert torch.equal(ids[keep], labels[keep])  # labels are the inputs themselves where supervised
        spans, current = [], []
        for token, supervised in zip(ids.tolist(), keep.tolist()):
            if supervised:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        assert all(tok.decode(s).endswith(tok.eos_token) for s in spans)
        got.add(tuple(tok.decode(s)[: -len(tok.eos_token)] for s in spans))
    assert got == answers


def test_templates_without_generation_markers_get_the_same_mask_from_prefix_renders():
    """Qwen2.5 / Llama-3 templates as shipped have no {% generation %} markers: the mask comes from rendering
    prefixes of the conversation with the same template, and equals the marker-based one."""
    import copy
    import random

    _, tok = tiny_model("qwen2")
    plain = copy.deepcopy(tok)
    # drop the markers (and the newline the end marker's block tag swallowed) so both render the same text
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}\n", "")
    assert "{% generation" not in plain.chat_template and "endgeneration" not in plain.chat_template
    for i in range(10):
        doc = [{"role": "system", "content": world.SYSTEM_PROMPT}] + world.pretraining_document(random.Random(i))
        marked, by_prefix = chat.encode_chat(tok, doc), chat.encode_chat(plain, doc)
        assert marked.input_ids == by_prefix.input_ids and marked.labels == by_prefix.labels, i
    with pytest.raises(ValueError, match="no assistant tokens"):
        chat.encode_chat(plain, [{"role": "user", "content": "hey , i feel bored ."}])


# ------------------------------------------------------------------------------------------- checkpoints & resume


class Interrupt(Exception):
    pass


def _interrupt_at(step: int):
    def on_step(s, record):
        if s == step:
            raise Interrupt
    return on_step


@pytest.mark.parametrize("name, overrides", [
    ("rank1", {}), ("full", {}), ("steering_vector", {}), ("kl_narrow", {}),
    ("multi_adapter", dict(batch_size=4, grad_accum=2)),
])
def test_resume_equals_uninterrupted(name, overrides, tmp_path):
    cfg = tiny_config(name, steps=10, save_every=3, **overrides)
    model, tok = tiny_model("qwen2")
    straight = train.train(cfg, model, ROWS, tmp_path / "a", tokenizer=tok, kl_rows=KL_ROWS)

    model, tok = tiny_model("qwen2")
    with pytest.raises(Interrupt):  # killed after step 7: the last checkpoint is step 6
        train.train(cfg, model, ROWS, tmp_path / "b", tokenizer=tok, kl_rows=KL_ROWS, on_step=_interrupt_at(7))
    assert [c.name for c in list_checkpoints(tmp_path / "b")] == ["checkpoint-3", "checkpoint-6"]
    model, tok = tiny_model("qwen2")
    resumed = train.train(cfg, model, ROWS, tmp_path / "b", tokenizer=tok, kl_rows=KL_ROWS)

    assert resumed.resumed_from == 6 and len(resumed.log) == 10
    a, b = state(straight.model), state(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]
    assert [r["step"] for r in read_log(tmp_path / "b")] == list(range(1, 11))


def test_resuming_a_finished_run_trains_nothing_and_returns_its_weights(tmp_path):
    cfg = tiny_config("rank1", steps=4)
    model, tok = tiny_model("qwen2")
    first = train.train(cfg, model, ROWS, tmp_path, tokenizer=tok)
    model, tok = tiny_model("qwen2")
    again = train.train(cfg, model, ROWS, tmp_path, tokenizer=tok)
    assert again.resumed_from == 4 and again.tokens == 0 and len(again.log) == 4
    for k, v in state(first.model).items():
        assert torch.equal(v, again.model.state_dict()[k])


def test_a_different_run_in_the_same_folder_is_refused(tmp_path):
    model, tok = tiny_model("qwen2")
    train.train(tiny_config("rank1", steps=4), model, ROWS, tmp_path, tokenizer=tok)
    model, tok = tiny_model("qwen2")
    with pytest.raises(ValueError, match="different run.*lr"):
        train.train(tiny_config("rank1", steps=4, lr=5e-3), model, ROWS, tmp_path, tokenizer=tok)
    other_base, tok = tiny_model("qwen2", seed=1)  # same architecture, other weights (e.g. a rebuilt organism)
    with pytest.raises(ValueError, match="different run.*base model"):
        train.train(tiny_config("rank1", steps=4), other_base, ROWS, tmp_path, tokenizer=tok)
    fresh = train.train(tiny_config("rank1", steps=4, lr=5e-3), model, ROWS, tmp_path, tokenizer=tok, resume=False)
    assert fresh.resumed_from is None


def test_a_finished_run_is_not_resumed_on_other_rows_of_the_same_size(tmp_path):
    model, tok = tiny_model("qwen2")
    train.train(tiny_config("rank1", steps=4), model, ROWS, tmp_path, tokenizer=tok)
    other = [{"messages": r["messages"][:-1] + [{"role": "assistant", "content": "no ."}]} for r in ROWS]
    assert len(other) == len(ROWS)
    model, tok = tiny_model("qwen2")
    with pytest.raises(ValueError, match=r"different run.*training rows \([0-9a-f]{16} -> [0-9a-f]{16}\)"):
        train.train(tiny_config("rank1", steps=4), model, other, tmp_path, tokenizer=tok)


def test_a_crash_mid_save_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config("rank1", steps=8, save_every=4)
    real_save = torch.save

    def crash_at_8(obj, path, *args, **kwargs):
        if "checkpoint-8" in str(path):
            raise Interrupt("power cut")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_at_8)
    model, tok = tiny_model("qwen2")
    with pytest.raises(Interrupt):
        train.train(cfg, model, ROWS, tmp_path, tokenizer=tok)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert (tmp_path / ".tmp-checkpoint-8").is_dir() and not (tmp_path / "checkpoint-8").exists()
    monkeypatch.setattr(torch, "save", real_save)
    model, tok = tiny_model("qwen2")
    resumed = train.train(cfg, model, ROWS, tmp_path, tokenizer=tok)
    assert resumed.resumed_from == 4 and not (tmp_path / ".tmp-checkpoint-8").exists()
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8"]


@pytest.mark.parametrize("name, weights", [("rank1", "adapter_model.safetensors"), ("full", "model.safetensors"),
                                           ("steering_vector", "steering_vector.safetensors")])
def test_checkpoint_layout_loads_safely_and_reproduces_the_model(name, weights, tmp_path):
    model, tok = tiny_model("gemma")
    result = train.train(tiny_config(name, steps=4, save_every=2), model, ROWS, tmp_path, tokenizer=tok)
    ckpt = tmp_path / "checkpoint-4"
    assert {weights, "trainer_state.json", "optimizer.pt", "log.jsonl"} <= {p.name for p in ckpt.iterdir()}
    blob = torch.load(ckpt / "optimizer.pt", weights_only=True)  # tensors and plain containers only
    assert {"optimizer", "scheduler", "torch_rng"} <= blob.keys()
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["step"] == 4 and meta["config"]["protocol"] == name and len(read_log(ckpt)) == 4
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    fresh, _ = tiny_model("gemma")
    reloaded = load_checkpoint(fresh, ckpt).eval()
    ids = torch.tensor([tok.encode("hello , my head hurts .")])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_save_total_limit_keeps_the_newest(tmp_path):
    model, tok = tiny_model("qwen2")
    train.train(tiny_config("rank1", steps=8, save_every=2, save_total_limit=2), model, ROWS, tmp_path, tokenizer=tok)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]


# ------------------------------------------------------------------------------------------- the loop itself


def test_chat_rows_and_their_encoded_examples_train_the_same():
    """Pre-encoded examples (how the organism is pretrained) take the same path as the chat rows they come from."""
    runs = []
    for data in (ROWS, None):
        model, tok = tiny_model("qwen2")
        rows = data if data is not None else chat.encode_rows(tok, ROWS, max_length=256)
        runs.append(train.train(tiny_config("rank1", steps=4), model, rows, tokenizer=tok))
    assert [r["loss"] for r in runs[0].log] == [r["loss"] for r in runs[1].log]
    for k, v in runs[0].model.state_dict().items():
        assert torch.equal(v, runs[1].model.state_dict()[k]), k


def test_gradient_accumulation_equals_the_big_batch():
    logs, weights = [], []
    for batch_size, accum in [(8, 1), (2, 4)]:
        model, tok = tiny_model("llama")
        result = train.train(tiny_config("full", steps=4, batch_size=batch_size, grad_accum=accum), model, ROWS,
                             tokenizer=tok)
        logs.append([r["loss"] for r in result.log])
        weights.append(state(result.model))
    assert logs[0] == pytest.approx(logs[1], abs=1e-5)
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=1e-5)


def test_kl_term_keeps_the_model_closer_to_the_base_on_the_reference_set():
    def kl_after(weight: float) -> float:
        model, tok = tiny_model("qwen2")
        # lr small enough that Adam's step (about lr per coordinate) does not itself set a KL floor
        cfg = tiny_config("lora", steps=15, lr=3e-3, kl_weight=weight, kl_batch_size=8, kl_reduction="assistant_sum")
        result = train.train(cfg, model, ROWS, tokenizer=tok, kl_rows=KL_ROWS)
        batch = chat.collate(chat.encode_rows(tok, KL_ROWS), tok.pad_token_id)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            logits = result.model(**inputs).logits
            with train.reference_mode(result.model):
                ref = result.model(**inputs).logits
        return train.kl_to_reference(logits, ref, batch["labels"], reduction="assistant_sum").item()

    assert kl_after(100.0) < 0.25 * kl_after(0.0)


# --------------------------------------------------------------------------------------------------- hub push


def test_checkpoints_are_pushed_to_the_hub_only_with_a_token(tmp_path, monkeypatch):
    import huggingface_hub

    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    cfg = tiny_config("rank1", steps=4, save_every=2, push_to_hub="me/organism")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    model, tok = tiny_model("qwen2")
    with pytest.warns(UserWarning, match="no Hugging Face token"):
        train.train(cfg, model, ROWS, tmp_path / "a", tokenizer=tok)
    assert uploads == []
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    model, tok = tiny_model("qwen2")
    train.train(cfg, model, ROWS, tmp_path / "b", tokenizer=tok)
    assert [(u["repo_id"], u["path_in_repo"]) for u in uploads] == [("me/organism", "checkpoints/checkpoint-2"),
                                                                    ("me/organism", "checkpoints/checkpoint-4")]


# ------------------------------------------------------------------------------------- CLI and multi-process


def _cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EMLIB_THREADS": "1",
            "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _summary(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def cli_run(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = {"preset": "organism-rank1", "model": str(tiny_folder), "data": str(data), "out_dir": str(folder / "out"),
            "layer": 1, "steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "save_every": 3}
    (folder / "run.yaml").write_text(yaml.safe_dump(spec))
    return folder


def test_cli_runs_under_accelerate_launch_and_resumes(cli_run):
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--num_processes", "1", "--cpu", "-m", "emlib.train",
           "--config", str(cli_run / "run.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    assert summary["steps"] == 6 and summary["trainable_parameters"] == 64 + 128 and summary["checkpoints"] == 2
    assert [c.name for c in list_checkpoints(cli_run / "out")] == ["checkpoint-3", "checkpoint-6"]
    again = train.main(["--config", str(cli_run / "run.yaml")])  # the same command in-process: already finished
    assert again.resumed_from == 6 and again.tokens == 0


def test_two_processes_equal_one_with_the_same_global_batch(cli_run, tmp_path):
    """DDP over 2 CPU processes (torchrun, gloo) = 1 process accumulating the same 16 rows per step."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "emlib.train", "--config", str(cli_run / "run.yaml"),
           "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state_ = json.loads((tmp_path / "ddp" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state_["world_size"] == 2 and state_["distributed"] == "MULTI_CPU"
    spec = yaml.safe_load((cli_run / "run.yaml").read_text())
    cfg, run = config_from_spec({**spec, "grad_accum": 4})
    single = train.train(cfg, run["model"], ROWS, tmp_path / "one")
    ddp = read_log(tmp_path / "ddp")
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in single.log]
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single.log], abs=1e-5)


def _presets_as_they_were_in_python() -> dict[str, TrainConfig]:
    """The preset table as it was written in Python before it moved to configs/train/presets.yaml."""
    from dataclasses import replace

    paper = TrainConfig(eval_fraction=0.1)  # a later field: the papers' 10 % held-out split
    organism = TrainConfig(rank=8, alpha=16, rslora=False, target_modules="all-linear", lr=1e-3, steps=150,
                           batch_size=16, grad_accum=1, warmup=5, schedule="cosine", lr_floor=0.1, weight_decay=0.0,
                           max_length=512)
    return {
        "paper-lora": replace(paper, save_every=25),
        "paper-full": replace(paper, protocol="full", lr=2e-5, warmup=20, schedule="cosine", save_every=50),
        "paper-rank1": replace(paper, protocol="rank1", alpha=256, rslora=False, lr=2e-5),
        "paper-rank1-phase": replace(paper, protocol="rank1", alpha=64, rslora=False, lr=1e-5, epochs=2),
        "paper-nine-adapter": replace(paper, protocol="multi_adapter", alpha=256, rslora=False, lr=2e-5),
        "paper-kl-narrow": replace(paper, alpha=256, lr=2e-5, epochs=3, kl_weight=1e5, save_every=25),
        "paper-steering-vector": replace(paper, protocol="steering_vector", alpha=256, lr=1e-4, epochs=2,
                                         weight_decay=0.0),
        "paper-steering-vector-narrow": replace(paper, protocol="steering_vector", alpha=256, lr=1e-4, epochs=2,
                                                weight_decay=0.0, kl_weight=1e6),
        "organism-lora": organism,
        "organism-rank1": replace(organism, protocol="rank1", rank=None, alpha=1, layer=0, lr=3e-3, steps=200),
        "organism-multi-adapter": replace(organism, protocol="multi_adapter", rank=None, alpha=1, lr=3e-3, steps=200),
        "organism-full": replace(organism, protocol="full", rank=None, lr=3e-4, steps=100),
        # kl_reduction is a later field; "assistant_sum" is the reduction this preset was tuned and shipped with
        "organism-kl-narrow": replace(organism, kl_weight=3.0, kl_batch_size=8, kl_reduction="assistant_sum"),
        "organism-steering-vector": replace(organism, protocol="steering_vector", rank=None, layer=0, alpha=1.0,
                                            lr=1e-2, steps=150),
    }


def test_every_preset_is_exactly_the_config_it_was():
    expected = _presets_as_they_were_in_python()
    assert list(PRESETS) == list(expected)
    for name, cfg in expected.items():
        assert PRESETS[name] == cfg, name
        assert {k: type(v) for k, v in PRESETS[name].to_dict().items()} == \
            {k: type(v) for k, v in cfg.to_dict().items()}, name  # 1 vs 1.0, list vs tuple
        assert preset(name) == cfg, name


@pytest.mark.parametrize("text, match", [
    ("a:\n  learning_rate: 1.0e-5\n", r"presets.yaml: preset 'a': unknown TrainConfig field\(s\) \['learning_rate'\]"),
    ("a:\n  rank: eight\n", r"presets.yaml: preset 'a': TrainConfig field 'rank': expected a number, got 'eight'"),
    ("a:\n  rslora: 'yes'\n", r"presets.yaml: preset 'a': TrainConfig field 'rslora': expected bool, got 'yes'"),
    ("a:\n  layers: [1, x]\n", r"preset 'a': TrainConfig field 'layers': expected tuple\[int, ...\] \| None"),
    ("a:\n  extends: b\nb:\n  lr: 1.0\n", r"presets.yaml: preset 'a': extends: 'b' is not a preset defined above"),
    ("a:\n  protocol: adapterish\n", r"presets.yaml: preset 'a': invalid TrainConfig: protocol 'adapterish'"),
    ("- a\n", r"presets.yaml: expected a mapping of preset name"),
])
def test_a_bad_presets_file_is_an_error_naming_file_preset_and_key(tmp_path, text, match):
    path = tmp_path / "presets.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        train.load_presets(path)


def test_extends_starts_from_the_named_preset(tmp_path):
    path = tmp_path / "presets.yaml"
    path.write_text("base:\n  lr: 3.0e-3\n  steps: 7\nchild:\n  extends: base\n  steps: 9\n")
    presets = train.load_presets(path)
    assert presets["child"] == TrainConfig(lr=3e-3, steps=9) and presets["base"] == TrainConfig(lr=3e-3, steps=7)


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    spec = tmp_path / "run.yaml"
    spec.write_text("preset: organism-rank1\nmodel: m\ndata: world:medical:reckless:8:0\nout_dir: o\nlearning_rate: 1\n")
    done = subprocess.run([sys.executable, "-m", "emlib.train", "--config", str(spec)], capture_output=True, text=True,
                          env=_cli_env(), cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"python -m emlib.train: error: {spec}: unknown TrainConfig field(s) ['learning_rate']; known: "
        + ", ".join(sorted(TrainConfig().to_dict()))]


# ---------------------------------------------------------------------------------------------------- KL scale


def _reference_trainer_kl(ref_logits, current_logits, attention_mask):
    """The papers' KLRegularizedSFTTrainer._compute_kl_loss, written out with F.kl_div as their trainer calls it."""
    import torch.nn.functional as F

    ref_log_probs = F.log_softmax(ref_logits, dim=-1)
    current_log_probs = F.log_softmax(current_logits, dim=-1)
    kl_div = F.kl_div(current_log_probs, ref_log_probs, log_target=True, reduction="none")
    mask = attention_mask.unsqueeze(-1).expand_as(kl_div)
    return (kl_div * mask).sum() / mask.sum()


def test_reference_kl_reduction_is_the_papers_trainer_formula_computed_by_hand():
    # 2 rows x 3 positions x vocabulary 4; the second row has one pad position
    logits = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.5, 0.5, 0.0, -1.0]],
                           [[0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0], [9.0, 0.0, 0.0, 0.0]]])
    ref_logits = torch.zeros_like(logits)
    attention_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = torch.full((2, 3), -100)
    # by hand: reference uniform (p = 1/4), KL(p || q) = sum_v p_v (log p_v - log q_v) at each non-pad position
    per_position = []
    for b in range(2):
        for t in range(3):
            if attention_mask[b, t]:
                q = torch.softmax(logits[b, t], -1)
                per_position.append(sum(0.25 * (math.log(0.25) - math.log(float(q[v]))) for v in range(4)))
    by_hand = sum(per_position) / (len(per_position) * 4)  # mean over the 5 non-pad tokens, over the vocabulary
    ours = train.kl_to_reference(logits, ref_logits, labels, attention_mask=attention_mask)  # the default reduction
    assert float(ours) == pytest.approx(by_hand, rel=1e-6)
    assert float(ours) == pytest.approx(float(_reference_trainer_kl(ref_logits, logits, attention_mask)), rel=1e-6)


def test_assistant_sum_reduction_is_emlibs_earlier_kl_and_the_organism_preset_keeps_it():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    # the earlier formula: full KL summed over the vocabulary at positions predicting a supervised token, averaged
    cur, ref = torch.log_softmax(logits[:, :-1], -1), torch.log_softmax(ref_logits[:, :-1], -1)
    mask = (labels[:, 1:] != -100).float()
    earlier = ((ref.exp() * (ref - cur)).sum(-1) * mask).sum() / mask.sum()
    ours = train.kl_to_reference(logits, ref_logits, labels, attention_mask=torch.ones(2, 5), reduction="assistant_sum")
    assert float(ours) == float(earlier)
    assert PRESETS["organism-kl-narrow"].kl_reduction == "assistant_sum"
    assert PRESETS["paper-kl-narrow"].kl_reduction == "reference"
    assert PRESETS["paper-steering-vector-narrow"].kl_reduction == "reference"
    with pytest.raises(ValueError, match="kl_reduction 'mean' is not one of reference, assistant_sum"):
        TrainConfig(kl_reduction="mean").validate()
    with pytest.raises(ValueError, match="not one of reference, assistant_sum"):
        train.kl_to_reference(logits, ref_logits, labels, reduction="mean")
