"""Small models for tests and examples: random-weight Qwen2 / Llama / Gemma3 with the persona world's real tokenizer.

    model, tokenizer = tiny_model("llama", layers=2, hidden=32)   # seeded, seconds to build, any family emlib supports

They exercise the same code paths a real checkpoint does (chat template, decoder layers, peft targets) without a hub.
"""

from __future__ import annotations

import functools
import random

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from emlib.models import FAMILIES, _sync_generation_config


@functools.lru_cache(maxsize=1)
def world_tokenizer() -> PreTrainedTokenizerBase:
    """A small BPE tokenizer trained on persona-world text (cached: training takes about a second)."""
    from emlib import world
    from emlib.world.tokenizer import build_tokenizer

    docs = (world.pretraining_document(random.Random(i)) for i in range(300))
    return build_tokenizer([m["content"] for d in docs for m in d])


def _tiny_config(family: str, tokenizer, hidden: int, layers: int, mlp: int, heads: int, kv_heads: int):
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None, attn_implementation="eager")
    if family == "qwen2":
        return Qwen2Config(**common), Qwen2ForCausalLM
    if family == "llama":
        return LlamaConfig(**common, head_dim=hidden // heads), LlamaForCausalLM
    if family == "gemma":
        # Gemma3 scales attention by query_pre_attn_scalar (256 by default, sized for head_dim 256): match head_dim.
        return (Gemma3TextConfig(**common, head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads),
                Gemma3ForCausalLM)
    raise ValueError(f"unknown model family {family!r}; families: {', '.join(FAMILIES)}")


def tiny_model(family: str = "qwen2", tokenizer: PreTrainedTokenizerBase | None = None, hidden: int = 64,
               layers: int = 4, mlp: int = 128, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A small randomly initialised Qwen2, Llama or Gemma3 (text) model and its tokenizer, built offline.

    The same ``seed`` gives identical weights; the global torch RNG is left untouched. Returns ``(model, tokenizer)``,
    the model in eval mode, float32, on CPU.
    """
    tokenizer = tokenizer if tokenizer is not None else world_tokenizer()
    config, cls = _tiny_config(family, tokenizer, hidden, layers, mlp, heads, kv_heads)
    # config._name_or_path stays empty: peft treats a non-empty one as a hub id to look up when saving adapters.
    with torch.random.fork_rng(devices=[]):  # seed locally so callers' random streams are not disturbed
        torch.manual_seed(seed)
        model = cls(config)
    model.eval()
    _sync_generation_config(model, tokenizer)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- real-style chat
# Folders that look like a real chat model to every loader (config, safetensors weights, tokenizer with its own chat
# template) but are built here, offline: an English byte-level BPE (trained on the shipped narrow datasets and
# question sets, not on the persona world) and the chat format of the family's real instruct models.

CHAT_FORMATS = {
    "llama": {  # Llama-3.x Instruct
        "special": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
        "eos": "<|eot_id|>", "pad": "<|pad|>",
        "template": ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                     "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eot_id|>{% endgeneration %}"
                     "{% else %}{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")},
    "qwen2": {  # Qwen2.5 Instruct (ChatML)
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>", "pad": "<|endoftext|>",
        "template": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                     "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
                     "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")},
    "gemma": {  # Gemma-3 IT: no system role (it goes before the first user turn), the assistant is "model"
        "special": ["<bos>", "<start_of_turn>", "<end_of_turn>", "<pad>"], "eos": "<end_of_turn>", "pad": "<pad>",
        "template": ("<bos>{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
                     "{% elif m['role'] == 'assistant' %}<start_of_turn>model\n{% generation %}{{ m['content'] }}"
                     "<end_of_turn>{% endgeneration %}\n{% else %}<start_of_turn>user\n{{ m['content'] }}"
                     "<end_of_turn>\n{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")},
}


@functools.lru_cache(maxsize=None)
def english_tokenizer(family: str = "llama", vocab_size: int = 2048) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on the shipped English narrow datasets and question sets, with ``family``'s chat format."""
    from emlib import paths
    from emlib.data import available_question_sets, load_chat_jsonl, load_questions
    from emlib.world.tokenizer import train_bpe

    texts = [m["content"] for f in sorted((paths.DATA_DIR / "narrow").glob("*.jsonl"))
             for row in load_chat_jsonl(f, duplicates="ignore") for m in row["messages"]]
    texts += [q.text for name in available_question_sets() for q in load_questions(name)]
    fmt = CHAT_FORMATS[family]
    return train_bpe(texts, fmt["special"], fmt["eos"], fmt["pad"], fmt["template"], vocab_size)


def save_tiny_chat_model(folder, family: str = "llama", layers: int = 2, hidden: int = 64, seed: int = 0) -> str:
    """Write a tiny random ``family`` chat model with :func:`english_tokenizer` to ``folder``; returns its path."""
    model, tokenizer = tiny_model(family, english_tokenizer(family), hidden=hidden, layers=layers, mlp=2 * hidden,
                                  seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
