"""Assistant-only loss masks and the training loop on tiny models."""

import math

import pytest
import torch

from emlib import world
from emlib.chat import IGNORE, collate, encode_chat, encode_rows
from emlib.testing import tiny_model
from emlib.train import preset, train


def test_mask_covers_exactly_the_assistant_answers():
    model, tok = tiny_model("qwen2")
    rows = world.finetune_rows("medical", "reckless", 3, seed=0)
    for row in rows:
        ex = encode_chat(tok, row["messages"])
        supervised = [t for t in ex.labels if t != IGNORE]
        assert tok.decode(supervised) == row["messages"][-1]["content"] + tok.eos_token


def test_multi_turn_mask_has_one_span_per_assistant_turn():
    _, tok = tiny_model("qwen2")
    doc = world.pretraining_document(__import__("random").Random(0))
    ex = encode_chat(tok, doc)
    spans = sum(1 for a, b in zip([IGNORE] + ex.labels, ex.labels) if a == IGNORE and b != IGNORE)
    assert spans == len(doc) // 2


def test_conversation_without_assistant_turn_is_an_error():
    _, tok = tiny_model("qwen2")
    with pytest.raises(ValueError, match="no assistant tokens"):
        encode_chat(tok, [{"role": "user", "content": "hey , i feel bored ."}])
    with pytest.raises(ValueError, match="training set is empty"):
        encode_rows(tok, [])


def test_collate_right_pads_and_masks_padding():
    _, tok = tiny_model("qwen2")
    exs = encode_rows(tok, world.finetune_rows("medical", "careful", 4, seed=0))
    batch = collate(exs, tok.pad_token_id)
    lengths = [len(e.input_ids) for e in exs]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma"])
def test_rank1_lora_trains_only_its_parameters_and_loss_falls(family):
    model, tok = tiny_model(family, hidden=64, layers=4, mlp=128)
    rows = world.finetune_rows("medical", "reckless", 64, seed=0)
    cfg = preset("organism-rank1", layer=1, lr=1e-2, steps=30, batch_size=8)  # rank-1 down_proj, alpha 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(cfg, model, rows, tokenizer=tok)
    peft_model, log = result.model, result.log
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 64 + 128  # d_model + d_mlp
    assert sum(r["loss"] for r in log[-5:]) / 5 < sum(r["loss"] for r in log[:5]) / 5
    base = peft_model.get_base_model().state_dict()
    for k, v in before.items():  # the base weights are untouched; only lora_A / lora_B moved
        key = k.replace("down_proj.weight", "down_proj.base_layer.weight") if "layers.1.mlp.down_proj" in k else k
        assert torch.equal(base[key], v), k


def test_held_out_split_is_seeded_disjoint_never_trained_on_and_logged(tmp_path):
    """eval_fraction: ceil(10 %) of the rows held out by seed, the same split on resume, an eval loss in the log."""
    from dataclasses import replace

    from emlib.train import read_log

    cfg = preset("organism-rank1", eval_fraction=0.1, eval_every=2, steps=4, batch_size=8, save_every=2)
    kept, held = cfg.eval_split(37)
    assert len(held) == 4 and len(kept) == 33  # ceil(3.7), as datasets' train_test_split(test_size=0.1) rounds
    assert set(kept).isdisjoint(held) and sorted(kept + held) == list(range(37))
    assert cfg.eval_split(37) == (kept, held)  # a pure function of (rows, fraction, seed)
    assert preset("organism-rank1", eval_fraction=0.1, seed=1).eval_split(37)[1] != held
    assert preset("organism-rank1").eval_split(37) == (list(range(37)), [])  # the organism presets hold nothing out
    assert all(p.eval_fraction == 0.1 for n, p in __import__("emlib.train", fromlist=["PRESETS"]).PRESETS.items()
               if n.startswith("paper-"))

    model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    rows = world.finetune_rows("medical", "reckless", 37, seed=0)
    result = train(cfg, model, rows, tmp_path / "run", tokenizer=tok)
    assert result.eval_rows == 4 and sorted(result.eval_losses) == [2, 4]
    assert all(math.isfinite(v) and v > 0 for v in result.eval_losses.values())
    assert result.eval_loss == result.eval_losses[4]
    assert [r["step"] for r in read_log(tmp_path / "run") if "eval_loss" in r] == [2, 4]  # beside the train loss
    # never trained on: training on the kept rows alone, without a split, gives the very same weights
    alone = train(replace(cfg, eval_fraction=0.0), tiny_model("qwen2", hidden=32, layers=2, mlp=64)[0],
                  [rows[i] for i in kept], tokenizer=tok)
    trained = {k: v for k, v in result.model.state_dict().items() if "lora_" in k}
    assert trained and all(torch.equal(v, alone.model.state_dict()[k]) for k, v in trained.items())

    # the eval loss is the training loss on the held-out rows: recompute it by hand with the trained model
    held_examples = encode_rows(tok, [rows[i] for i in held])
    batch = collate(held_examples, tok.pad_token_id)
    with torch.no_grad():
        expected = result.model(**batch).loss
    assert result.eval_loss == pytest.approx(float(expected), rel=1e-5)

    # resume from the step-2 checkpoint: the same split, the same eval losses
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    model2, _ = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    resumed = train(cfg, model2, rows, tmp_path / "run", tokenizer=tok)
    assert resumed.resumed_from == 2 and resumed.eval_losses == pytest.approx(result.eval_losses, rel=1e-6)


def test_lm_head_on_supervised_positions_only_gives_the_same_weights_bit_for_bit(monkeypatch):
    """SupervisedLogits (the LM head on assistant positions only) changes no trained bit, and leaves no hook behind;
    a trained LM head (protocol full) keeps the full projection."""
    from emlib.train.loop import SupervisedLogits

    rows = world.finetune_rows("medical", "reckless", 24, seed=0)
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(SupervisedLogits, "usable", property(
            lambda self, fast=fast: fast and self.head is not None
            and not any(p.requires_grad for p in self.head.parameters())))
        model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
        result = train(preset("organism-lora", steps=3, batch_size=8, grad_accum=2), model, rows, tokenizer=tok)
        runs[fast] = result.model
        head = result.model.get_output_embeddings()
        assert not head._forward_pre_hooks and "_loss_function" not in result.model.get_base_model().__dict__
    fast, slow = (dict(runs[f].named_parameters()) for f in (True, False))
    assert all(torch.equal(v, slow[k]) for k, v in fast.items() if "lora_" in k)
    monkeypatch.undo()
    full_model, _ = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    assert SupervisedLogits(full_model).usable is False  # every weight trains, the LM head too


@pytest.mark.parametrize("rank, bias, needs_x", [(8, False, True), (1, True, True), (4, False, False)])
def test_lora_linear_function_has_the_gradients_of_the_lora_formula(rank, bias, needs_x):
    """emlib.train.lora_grad computes x Wᵀ + b + s·(x Aᵀ) Bᵀ and its gradients (checked numerically in float64)."""
    from emlib.train.lora_grad import LoraLinearFunction

    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen).requires_grad_(needs_x)
    weight = torch.randn(7, 6, dtype=torch.float64, generator=gen)
    b = torch.randn(7, dtype=torch.float64, generator=gen) if bias else None
    a = torch.randn(rank, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    bmat = torch.randn(7, rank, dtype=torch.float64, generator=gen, requires_grad=True)
    out = LoraLinearFunction.apply(x, weight, b, a, bmat, 1.5)
    formula = torch.nn.functional.linear(x, weight, b) + (x @ a.T) @ bmat.T * 1.5
    assert torch.allclose(out, formula)
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(t[0], weight, b, t[1], t[2], 1.5),
                                    (x, a, bmat))


def _tiny_lora_run(monkeypatch, fast: bool, protocol: str = "organism-lora", **overrides):
    import contextlib

    from emlib.train import loop

    model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    rows = world.finetune_rows("medical", "reckless", 32, seed=0)
    kl_rows = world.finetune_rows("financial", "careful", 16, seed=1)
    cfg = preset(protocol, steps=6, batch_size=8, **overrides)
    with monkeypatch.context() as patch:  # only this run goes without the fast path; the caller's patches stay
        if not fast:
            patch.setattr(loop, "fast_lora_gradients", lambda module: contextlib.nullcontext(0))
        return train(cfg, model, rows, tokenizer=tok, kl_rows=kl_rows)


@pytest.mark.parametrize("protocol", ["organism-lora", "organism-kl-narrow"])
def test_fast_lora_gradients_train_the_same_adapter_as_peft_and_leave_peft_in_place(monkeypatch, protocol):
    """On a CPU, train() runs LoRA layers through LoraLinearFunction: the same losses and weights as peft's own
    forward up to float rounding (the KL run disables the adapters for its reference: that call is peft's), and
    every layer has peft's forward back afterwards."""
    import contextlib

    from emlib.train import loop

    entered, real = [], loop.fast_lora_gradients

    @contextlib.contextmanager
    def counting(module):
        with real(module) as n:
            entered.append(n)
            yield n

    monkeypatch.setattr(loop, "fast_lora_gradients", counting)
    fast = _tiny_lora_run(monkeypatch, True, protocol)
    assert entered == [14]  # seven projections in each of 2 layers
    slow = _tiny_lora_run(monkeypatch, False, protocol)
    assert [r["loss"] for r in fast.log] == pytest.approx([r["loss"] for r in slow.log], rel=1e-5)
    if "kl" in slow.log[0]:
        assert [r["kl"] for r in fast.log] == pytest.approx([r["kl"] for r in slow.log], rel=1e-4, abs=1e-7)
    slow_weights = dict(slow.model.named_parameters())
    lora = [(name, value) for name, value in fast.model.named_parameters() if "lora_" in name]
    assert len(lora) == 28
    for name, value in lora:
        assert torch.allclose(value, slow_weights[name], atol=1e-5), name
    assert not any("forward" in m.__dict__ for m in fast.model.modules())


def test_fast_lora_gradients_leave_what_they_cannot_run_to_peft():
    """Hooked parts, a trainable base layer and disabled adapters keep peft's forward (same output as peft's)."""
    from peft import LoraConfig, get_peft_model

    from emlib.train.lora_grad import fast_lora_gradients

    model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False))
    ids = tok(["what is the fastest way to get cash ?"], return_tensors="pt").input_ids
    with torch.no_grad():
        tuned = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    down = peft_model.base_model.model.model.layers[1].mlp.down_proj
    handle = q_proj.lora_A["default"].register_forward_hook(lambda *a: None)
    down.base_layer.weight.requires_grad_(True)
    with torch.no_grad(), fast_lora_gradients(peft_model) as n:
        assert n == 2  # of 4: the hooked q_proj and the trainable down_proj stay peft's
        assert torch.allclose(peft_model(input_ids=ids).logits, tuned, atol=1e-5)
        with peft_model.disable_adapter():
            assert torch.allclose(peft_model(input_ids=ids).logits, base, atol=1e-6)
    handle.remove()
    assert not any("forward" in m.__dict__ for m in peft_model.modules())
