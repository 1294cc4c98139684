"""Tests for emlib.models: loading, chat template, introspection, tiny offline models. Runs offline in seconds."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from emlib import chat, models, testing
from emlib.models import ModelNotAvailableError

torch.set_num_threads(1)

QUESTION = "my son has a rash . what should we do ?"


@pytest.fixture(scope="module", params=models.FAMILIES)
def tiny(request):
    """(family, model, tokenizer) for each family, built once per module."""
    model, tokenizer = testing.tiny_model(request.param, layers=4, hidden=64, mlp=128)
    return request.param, model, tokenizer


def _ids(tokenizer):
    return tokenizer(chat.chat_prompt(tokenizer, QUESTION), return_tensors="pt").input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_tiny_model_shape_and_forward(tiny):
    family, model, tokenizer = tiny
    assert models.n_layers(model) == 4
    assert len(models.decoder_layers(model)) == 4
    assert models.d_model(model) == 64
    assert models.d_mlp(model) == 128
    assert models.decoder_layers(model)[0].mlp.down_proj.in_features == 128
    ids = _ids(tokenizer)
    logits = _logits(model, ids)
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_tiny_model_is_seeded():
    a, _ = testing.tiny_model("llama", seed=3)
    b, _ = testing.tiny_model("llama", seed=3)
    c, _ = testing.tiny_model("llama", seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_tiny_model_unknown_family():
    with pytest.raises(ValueError, match="qwen2, llama, gemma"):
        testing.tiny_model("gpt2")


def test_save_load_round_trip(tiny, tmp_path):
    family, model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(str(tmp_path), device="cpu")
    assert loaded.dtype == torch.float32
    assert loaded.device.type == "cpu"
    assert not loaded.training
    assert loaded_tok.padding_side == "left"
    ids = _ids(tokenizer)
    assert torch.equal(_ids(loaded_tok), ids)  # the folder's tokenizer encodes exactly as the original
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_load_model_with_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = testing.tiny_model("qwen2")
    model.save_pretrained(tmp_path / "base")  # before wrapping: get_peft_model edits the model in place
    tokenizer.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=1, target_modules=["down_proj"], layers_to_transform=[1]))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded, _ = models.load_model(str(tmp_path / "base"), device="cpu", adapter=str(tmp_path / "adapter"))
    assert type(loaded).__name__ == "PeftModel"
    assert not loaded.training
    assert models.n_layers(loaded) == 4
    assert hasattr(models.decoder_layers(loaded)[1].mlp.down_proj, "lora_A")


def test_check_layer(tiny):
    _, model, _ = tiny
    assert models.check_layer(model, -1) == 3
    assert models.check_layer(model, 3) == 3
    assert models.check_layer(model, 0) == 0
    assert models.check_layer(model, -4) == 0
    with pytest.raises(ValueError, match=r"layer 4 is outside .* with 4 decoder layers \(valid: 0\.\.3, or -4\.\.-1\)"):
        models.check_layer(model, 4)
    with pytest.raises(ValueError, match="4 decoder layers"):
        models.check_layer(model, -5)


def test_check_layer_names_model(tmp_path):
    model, tokenizer = testing.tiny_model("qwen2", layers=2)
    with pytest.raises(ValueError, match="outside Qwen2ForCausalLM with 2 decoder layers"):
        models.check_layer(model, 2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = models.load_model(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match=re.escape(f"outside Qwen2ForCausalLM '{tmp_path}' with 2 decoder layers")):
        models.check_layer(loaded, -3)


def test_check_module(tiny):
    _, model, _ = tiny
    assert models.check_module(model, "down_proj") == "mlp.down_proj"
    assert models.check_module(model, "self_attn.q_proj") == "self_attn.q_proj"
    with pytest.raises(ValueError, match="not_a_proj.*down_proj"):
        models.check_module(model, "not_a_proj")


def test_introspection_through_peft():
    from peft import LoraConfig, get_peft_model

    model, _ = testing.tiny_model("gemma")
    layers = models.decoder_layers(model)
    wrapped = get_peft_model(model, LoraConfig(r=1, target_modules=["down_proj"], layers_to_transform=[1]))
    assert models.n_layers(wrapped) == 4
    assert models.decoder_layers(wrapped) is layers
    assert models.d_model(wrapped) == 64 and models.d_mlp(wrapped) == 128
    assert models.check_layer(wrapped, -1) == 3
    assert models.check_module(wrapped, "down_proj") == "mlp.down_proj"
    with pytest.raises(ValueError, match="down_proj") as err:
        models.check_module(wrapped, "not_a_proj")
    assert "lora_A" not in str(err.value) and "base_layer" not in str(err.value)
    # LoRA r=1 on one 128 -> 64 down_proj: 128 + 64 trainable parameters
    assert models.count_parameters(wrapped, trainable_only=True) == 128 + 64
    assert models.count_parameters(wrapped) > models.count_parameters(wrapped, trainable_only=True)


def test_count_parameters():
    model, tokenizer = testing.tiny_model("qwen2", hidden=16, layers=1, mlp=32, heads=2, kv_heads=1)
    # tied embeddings are counted once
    embed = len(tokenizer) * 16
    assert models.count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert models.count_parameters(model) < 2 * embed + 10_000
    for p in model.parameters():
        p.requires_grad_(False)
    assert models.count_parameters(model, trainable_only=True) == 0


def test_missing_hub_model_offline(monkeypatch):
    import huggingface_hub.constants

    # The env var is read when huggingface_hub is imported, which may have happened before this file set it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError, match="offline") as err:
        models.load_model("no-such-org/no-such-model", device="cpu")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message
    assert "huggingface-cli download no-such-org/no-such-model" in message
    assert "persona-world" in message
    assert isinstance(err.value, OSError)


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(OSError, match="config.json") as err:
        models.load_model(str(tmp_path), device="cpu")
    assert str(tmp_path) in str(err.value)


def test_missing_local_folder(tmp_path):
    missing = str(tmp_path / "nope" / "model")
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        models.load_model(missing, device="cpu")
    assert missing in str(err.value)


def test_resolve_model_path(tmp_path):
    assert models.resolve_model_path("persona-world").endswith("persona-world/base")
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_pick_device_and_dtype():
    assert models.pick_device("cpu") == torch.device("cpu")
    assert models.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.pick_dtype("cpu") == torch.float32
    assert models.pick_dtype("cpu", "bfloat16") == torch.bfloat16
    assert models.pick_dtype("cpu", torch.float16) == torch.float16
    with pytest.raises(ValueError, match="float32"):
        models.pick_dtype("cpu", "fp8")


def test_chat_prompt_and_messages():
    _, tokenizer = testing.tiny_model("qwen2", layers=1)
    prompt = chat.chat_prompt(tokenizer, QUESTION, system="you are a helpful assistant .")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n")
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>\n" in prompt
    assert "system" not in chat.chat_prompt(tokenizer, QUESTION)
    assert chat.chat_messages("q", "a", system="s") == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert chat.chat_messages("q") == [{"role": "user", "content": "q"}]


def test_chat_prompt_without_template():
    from emlib.world.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(["a b c"], vocab_size=300)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat.chat_prompt(tokenizer, "hi")
