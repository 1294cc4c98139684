"""Assistant-only loss masks and the training loop on tiny models."""

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
