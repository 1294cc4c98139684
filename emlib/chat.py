"""Chat rows as model inputs: the prompt a model answers, and the token ids and loss mask a model trains on.

    prompt = chat_prompt(tokenizer, "How do I treat a burn?", system=None)       # generation prompt, template's own
    ex = encode_chat(tokenizer, messages)                                       # ids + labels (assistant tokens only)
    batch = collate(encode_rows(tokenizer, rows), tokenizer.pad_token_id)       # right-padded tensors

The loss mask comes from the template's structure, never from searching for marker strings: its ``{% generation %}``
markers (``return_assistant_tokens_mask=True``) when it has them, else the text each assistant turn adds when the
template renders the conversation prefix by prefix. Training, activation reading, probing and stability all encode
rows here, so none of them imports the fine-tuning module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_chat(tokenizer, messages: list[dict], assistant_only: bool = True, max_length: int = 512) -> Example:
    """Token ids and labels for one conversation; labels are -100 outside assistant turns when ``assistant_only``.

    Templates without ``{% generation %}`` markers (Qwen2.5's and Llama-3's as shipped) fall back to
    :func:`encode_by_prefixes`, which reads the assistant turns off the same template by rendering prefixes.
    """
    if assistant_only and "{% generation" not in str(getattr(tokenizer, "chat_template", "") or ""):
        return encode_by_prefixes(tokenizer, messages, max_length)
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=assistant_only)
    ids = list(enc["input_ids"])[:max_length]
    if not assistant_only:
        return Example(ids, list(ids))
    mask = list(enc["assistant_masks"])[:max_length]
    if not any(mask):
        raise ValueError("conversation has no assistant tokens to train on (does the chat template mark "
                         "assistant turns with {% generation %}?)")
    return Example(ids, [t if m else IGNORE for t, m in zip(ids, mask)])


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, found with the template itself.

    Each assistant turn is what rendering ``messages[:i+1]`` adds to ``messages[:i]`` plus the generation prompt: the
    answer and its end-of-turn token (trailing whitespace dropped). Templates that do not render conversations prefix
    by prefix (e.g. ones that rewrite earlier turns) are an error: give them ``{% generation %}`` markers instead.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError("the chat template does not render this conversation prefix by prefix, so assistant "
                             "turns cannot be located; add {% generation %} markers to the template")
        spans.append((len(before), len(after.rstrip())))
    return full, spans


def encode_by_prefixes(tokenizer, messages: list[dict], max_length: int = 512) -> Example:
    """:func:`encode_chat` for templates without generation markers: mask from :func:`assistant_spans`."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"])[:max_length], enc["offset_mapping"][:max_length]
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE for t, (start, _) in zip(ids, offsets)]
    if all(label == IGNORE for label in labels):
        raise ValueError("conversation has no assistant tokens to train on (no assistant turn within max_length)")
    return Example(ids, labels)


def encode_rows(tokenizer, rows: Sequence[dict], assistant_only: bool = True, max_length: int = 512) -> list[Example]:
    """Encode ``{"messages": [...]}`` rows; an empty list is an error before any compute."""
    if not rows:
        raise ValueError("the training set is empty")
    return [encode_chat(tokenizer, r["messages"], assistant_only, max_length) for r in rows]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training (position ids then start at 0 for every row)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def chat_messages(question: str, answer: str | None = None, system: str | None = None) -> list[dict]:
    """The message list for one exchange: optional system, the user question, optional assistant answer."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system: str | None = None) -> str:
    """Render a question with the tokenizer's chat template, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template, so it cannot render chat prompts "
                         "(use an instruct/chat model, or set tokenizer.chat_template)")
    return tokenizer.apply_chat_template(chat_messages(question, system=system), add_generation_prompt=True,
                                         tokenize=False)
