"""A small byte-level BPE tokenizer for the persona world, built the way Qwen2's own tokenizer is.

Why this shape: for a ``qwen2`` model folder, transformers 5's ``AutoTokenizer`` always loads ``Qwen2Tokenizer``,
which rebuilds Qwen's normaliser and pre-tokenizer around the saved vocabulary. A tokenizer trained with any other
pipeline would then silently produce different ids in every tool that loads the folder (AutoTokenizer, nnsight,
TransformerLens, vLLM). Training with exactly Qwen's pipeline makes the folder load identically everywhere.

The chat template is ChatML, as in Qwen2.5-Instruct, with each assistant turn wrapped in ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives the loss mask from the template's structure.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the persona world's tokenizer on ``texts``: ChatML, Qwen2's exact normaliser and pre-tokenizer.

    With the world's few hundred words and ``vocab_size`` 1024, almost every word becomes a single token.
    """
    return train_bpe(texts, SPECIAL_TOKENS, IM_END, PAD, CHAT_TEMPLATE, vocab_size)


def train_bpe(texts: Iterable[str], special_tokens: list[str], eos: str, pad: str, chat_template: str,
              vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's normaliser and pre-tokenizer, the given special tokens and chat template."""
    raw = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, pad_token=pad, unk_token=pad,
                                  padding_side="left")
    tok.chat_template = chat_template
    return tok
