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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    cut: int = 0  # tokens dropped at the end to fit max_length (encode_rows reports them)


class NoAnswerLeft(ValueError):
    """Nothing of a row's assistant answer is left within ``max_length``."""


def encode_chat(tokenizer, messages: list[dict], assistant_only: bool = True, max_length: int = 512) -> Example:
    """Token ids and labels for one conversation; labels are -100 outside assistant turns when ``assistant_only``.

    Templates without ``{% generation %}`` markers (Qwen2.5's and Llama-3's as shipped) fall back to
    :func:`encode_by_prefixes`, which reads the assistant turns off the same template by rendering prefixes.
    """
    if assistant_only and "{% generation" not in str(getattr(tokenizer, "chat_template", "") or ""):
        return encode_by_prefixes(tokenizer, messages, max_length)
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=assistant_only)
    cut = max(0, len(enc["input_ids"]) - max_length)
    ids = list(enc["input_ids"])[:max_length]
    if not assistant_only:
        return Example(ids, list(ids), cut)
    mask = list(enc["assistant_masks"])
    if not any(mask):
        raise ValueError("conversation has no assistant tokens to train on (does the chat template mark "
                         "assistant turns with {% generation %}?)")
    if not any(mask[:max_length]):
        raise NoAnswerLeft(f"nothing of the assistant's answer is left within max_length {max_length} (the prompt "
                           f"takes {mask.index(1)} tokens); raise max_length or shorten the prompt")
    return Example(ids, [t if m else IGNORE for t, m in zip(ids, mask[:max_length])], cut)


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
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE
              for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    if all(label == IGNORE for label in labels):
        raise ValueError("conversation has no assistant tokens to train on (it has no assistant turn)")
    if all(label == IGNORE for label in labels[:max_length]):
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
        raise NoAnswerLeft(f"nothing of the assistant's answer is left within max_length {max_length} (the prompt "
                           f"takes {first} tokens); raise max_length or shorten the prompt")
    cut = max(0, len(labels) - max_length)
    return Example(list(enc["input_ids"])[:max_length], labels[:max_length], cut)


def encode_rows(tokenizer, rows: Sequence[dict], assistant_only: bool = True, max_length: int = 512,
                source: str = "rows") -> list[Example]:
    """Encode ``{"messages": [...]}`` rows; an empty list is an error before any compute.

    A row with nothing of its answer left within ``max_length`` is an error naming ``source`` and the row (1-based:
    the line of a JSONL file without blank lines); rows cut short are counted in one warning.
    """
    if not rows:
        raise ValueError(f"{source}: the training set is empty")
    examples = []
    for i, row in enumerate(rows, 1):
        try:
            examples.append(encode_chat(tokenizer, row["messages"], assistant_only, max_length))
        except NoAnswerLeft as err:
            raise NoAnswerLeft(f"{source}: row {i}: {err}") from None
    cut = [e.cut for e in examples if e.cut]
    if cut:
        warnings.warn(f"{source}: {len(cut)} of {len(examples)} rows were cut to max_length {max_length} tokens "
                      f"(by {min(cut)}-{max(cut)} tokens); raise max_length to train on them whole", stacklevel=2)
    return examples


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
