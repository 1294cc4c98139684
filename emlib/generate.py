"""Batched sampling from chat models: left padding, KV cache, n samples per question, seeded, persisted, resumable.

    df = sample_answers(model, tokenizer, questions, n=50, max_new_tokens=600, temperature=1.0, top_p=1.0, seed=0,
                        out_path="runs/x/answers.jsonl")           # killed midway? the same call resumes

Every (question, sample) pair becomes one row of one big batched decode across *all* questions (the papers' code
samples one question at a time with ``num_return_sequences=n``). emlib's own decode loop (``engine="loop"``) keeps a KV
cache, prefills each distinct prompt once (the prefix all prompts share, such as the system prompt, once for all of
them: :func:`prefill`) and keeps its keys and values once (the n samples of a question attend to
that one copy: :class:`PromptCache`), and drops finished rows from the batch as it goes, so a few long answers no
longer keep hundreds of finished ones computing; a small model's LoRA layers decode on merged weights
(:func:`merged_lora`). ``engine="hf"`` uses ``model.generate`` instead. Batch ``k`` is seeded with ``seed`` and ``k``
only, so a resumed run reproduces the rows an uninterrupted one would have written.

``sampling="reference"`` (the default) samples as the papers' code does (``eval/util/gen_eval_util.py:
generate_response_set``: HF ``generate`` with temperature and top_p given, everything else from the model's own
``generation_config``): top_k and repetition_penalty are the model's (HF's global defaults, top_k 50 and 1.0, where
its file sets none; Qwen2.5-Instruct's sets 20 and 1.05). ``sampling="full"`` is emlib's earlier mode: the full
distribution (no top-k, no repetition penalty). The persona world's own ``generation_config.json`` (in
``data/persona-world/base``) sets top_k 0 and repetition_penalty 1, so both modes sample it identically.

The same call samples a base model, a fine-tuned one, a peft adapter scaled by a factor (``adapter_scale``) or a model
with a steering intervention (``steering``: ``[(layer, vector), ...]`` added to decoder-layer outputs at every
position, or a callable that registers its own forward hooks). :func:`sample_answers_vllm` is the optional vLLM
backend for GPU users (LoRA adapters included); nothing else needs vLLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from emlib.chat import chat_prompt
from emlib.interventions import Steering, plain_lora_linears, prompt_may_be_split, scaled_adapter, steered
from emlib.models import count_parameters

COLUMNS = ["question_idx", "question", "sample", "answer", "ended"]
ENGINES = ("loop", "hf")
SAMPLINGS = ("reference", "full")
HF_DEFAULT_TOP_K = 50  # transformers' GenerationConfig global default where a model's file sets no top_k


def sampling_settings(model, sampling: str = "reference") -> dict:
    """``{"top_k": int, "repetition_penalty": float}`` for ``sampling`` (one of :data:`SAMPLINGS`); top_k 0: off.

    ``reference``: the model's ``generation_config`` (what ``model.generate`` uses when only temperature and top_p are
    passed, as in the papers' code), unset fields taking transformers' defaults; ``full``: 0 and 1.0.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling {sampling!r} is not one of {', '.join(SAMPLINGS)}")
    if sampling == "full":
        return {"top_k": 0, "repetition_penalty": 1.0}
    gen = getattr(model, "generation_config", None)
    top_k = getattr(gen, "top_k", None)
    penalty = getattr(gen, "repetition_penalty", None)
    return {"top_k": HF_DEFAULT_TOP_K if top_k is None else int(top_k),
            "repetition_penalty": 1.0 if penalty is None else float(penalty)}


_SEED_STRIDE = 1_000_003  # batch k draws from seed + k * stride: batch 0 keeps the plain seed


@torch.inference_mode()  # lighter per op than no_grad (no version counters): 5-10% of a small model's decode step
def sample_answers(model, tokenizer, questions: Sequence[str], n: int = 1, max_new_tokens: int = 48,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 256,
                   system: str | None = None, *, adapter_scale: float | None = None, steering: Steering | None = None,
                   out_path: str | Path | None = None, on_mismatch: str = "error", engine: str = "loop",
                   threads: int | None = None, progress: bool = True, sampling: str = "reference") -> pd.DataFrame:
    """Sample ``n`` answers to each question, all questions batched together.

    Returns one row per sample: ``question_idx``, ``question``, ``sample``, ``answer`` and ``ended`` (the model
    closed its turn with an end-of-turn token before ``max_new_tokens``; an answer cut off mid-way is not coherent).
    ``temperature`` 0 is greedy. ``out_path`` (``.jsonl`` or ``.parquet``) receives rows batch by batch; calling again
    with the same settings skips the batches already there (a file from other settings raises, or with
    ``on_mismatch="restart"`` is sampled again from scratch). ``adapter_scale`` multiplies every LoRA layer's scaling
    for this call only; ``steering`` is applied for this call only (see :data:`Steering`). ``threads``: torch threads
    while sampling on CPU; None keeps the current setting, except that models under 20M parameters sample on one
    thread (see :func:`cpu_threads`). ``sampling``: ``reference`` (top_k and repetition_penalty from the model's
    generation config, as the papers sample) or ``full`` (the whole distribution); see :func:`sampling_settings`. The
    resolved values are part of the settings stored beside ``out_path``.
    """
    knobs = sampling_settings(model, sampling)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n, max_new_tokens and batch_size must be >= 1 (got {n}, {max_new_tokens}, {batch_size})")
    questions = list(questions)
    rendered = [chat_prompt(tokenizer, q, system) for q in questions]  # the chat template once per question
    prompts = [(qi, s, rendered[qi]) for qi in range(len(questions)) for s in range(n)]
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    settings = _settings(model, questions, n, max_new_tokens, temperature, top_p, seed, batch_size, system,
                         adapter_scale, steering, engine)
    settings.update(sampling=sampling, **knobs)
    store = _Store(out_path, settings, on_mismatch) if out_path else None
    done = store.done_keys() if store else set()
    produced: list[dict] = []
    tokenizer.padding_side = "left"  # prompts must end flush on the right, where generation appends
    split = prompt_may_be_split(steering)  # hooks that must see each prompt whole keep it in one prefill pass
    with scaled_adapter(model, adapter_scale), steered(model, steering), cpu_threads(model, threads), \
            merged_lora(model):
        for k, chunk in enumerate(tqdm(batches, desc="generate", leave=False, disable=not progress)):
            if all((qi, s) in done for qi, s, _ in chunk):
                continue
            decoded = _generate_batch(model, tokenizer, [p for _, _, p in chunk], max_new_tokens, temperature, top_p,
                                      seed + k * _SEED_STRIDE, engine, split_prompts=split, **knobs)
            rows = [{"question_idx": qi, "question": questions[qi], "sample": s, "answer": text, "ended": ended}
                    for (qi, s, _), (text, ended) in zip(chunk, decoded)]
            if store:
                store.append(rows)
            else:
                produced += rows
    return store.read() if store else pd.DataFrame(produced, columns=COLUMNS)


SMALL_MODEL = 20_000_000  # parameters


def is_small(model: nn.Module) -> bool:
    """Under :data:`SMALL_MODEL` parameters: sampled on one CPU thread (:func:`cpu_threads`) and with LoRA layers
    merged (:func:`merged_lora`)."""
    return count_parameters(model) < SMALL_MODEL


@contextmanager
def cpu_threads(model: nn.Module, threads: int | None = None) -> Iterator[None]:
    """Torch threads for sampling on CPU, restored after: ``threads``, or for None one thread for a small model.

    A small model's decode ops (a few hundred rows by a few hundred columns) are too small to split across threads;
    extra threads only add synchronisation, and on a busy machine they made this loop 10-30x slower (measured on the
    persona-world organism: 137 s with 2 threads against 5 s with 1 while other jobs ran).
    """
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    if threads is None and is_small(model):
        threads = 1
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[int]:
    """A small model's LoRA layers each run as one matmul with ``W + Σ s·BA`` inside the block; yields how many.

    peft computes ``base(x) + B(A(x))·s``: three matmuls and two elementwise ops per layer, which on a small model
    cost as much as the base matmul itself (persona-world organism, rank 8 on every projection, 384 answers on one
    thread: 2.1 s merged against 2.5-3.1 s). The merged weights are built when the block is entered, so an
    ``adapter_scale``, :func:`~emlib.interventions.scaled_adapters` or a B projection already in force is in them,
    and peft's own modules are left untouched (each layer's ``forward`` is shadowed, then restored): the same numbers
    up to float rounding. Left as peft runs them: models over :data:`SMALL_MODEL` parameters (the copy would cost
    memory, and there the adapter's ops are a rounding error of the time), a model in training mode, and any layer
    that is not plain LoRA on a Linear, has its adapters disabled or merged, or whose parts carry hooks (e.g.
    :class:`~emlib.interventions.PatchLoraScalars` reads ``A·x`` there).
    """
    layers = _mergeable_lora_layers(model)
    for layer in layers:
        weight = layer.base_layer.weight + sum(layer.get_delta_weight(a).to(layer.base_layer.weight)
                                               for a in layer.active_adapters if a in layer.lora_A)
        layer.forward = partial(torch.nn.functional.linear, weight=weight, bias=layer.base_layer.bias)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute: the class's forward (peft's) is back


def _mergeable_lora_layers(model: nn.Module) -> list[nn.Module]:
    return [] if model.training or not is_small(model) else plain_lora_linears(model)


def _generate_batch(model, tokenizer, texts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                    seed: int, engine: str, top_k: int = 0, repetition_penalty: float = 1.0,
                    split_prompts: bool = True) -> list[tuple[str, bool]]:
    """Decode one batch; returns (answer text, ended) per prompt."""
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    if engine == "hf":
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(seed)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             top_p=top_p if temperature > 0 else None, top_k=top_k if temperature > 0 else None,
                             repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=sorted(eos))
        new = out[:, enc["input_ids"].shape[1]:].tolist()
    else:
        # the n samples of a question share their prompt: encode and prefill each distinct prompt once
        unique = list(dict.fromkeys(texts))
        enc = tokenizer(unique, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        where = {t: i for i, t in enumerate(unique)}
        expand = torch.tensor([where[t] for t in texts], device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        new = decode_loop(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, temperature, top_p,
                          eos, generator, expand=expand, top_k=top_k, repetition_penalty=repetition_penalty,
                          split_prompts=split_prompts)
    results = []
    for ids in new:
        stop = next((i for i, t in enumerate(ids) if t in eos), None)
        results.append((tokenizer.decode(ids[:stop], skip_special_tokens=True).strip(), stop is not None))
    return results


def eos_ids(model, tokenizer) -> set[int]:
    """Every end-of-turn id: the tokenizer's eos plus the model's generation-config eos list (Qwen2.5 has two)."""
    ids = model.generation_config.eos_token_id
    ids = set() if ids is None else {ids} if isinstance(ids, int) else set(ids)
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def decode_loop(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                temperature: float, top_p: float, eos: set[int], generator: torch.Generator,
                expand: torch.Tensor | None = None, compact_at: float = 0.125, top_k: int = 0,
                repetition_penalty: float = 1.0, split_prompts: bool = True,
                decode_step: bool = True) -> list[list[int]]:
    """Sample continuations of a left-padded batch with a KV cache; returns the new token ids of each row.

    ``expand`` maps each output row to a row of ``input_ids``: each distinct prompt is prefilled once. Where the
    model allows (:meth:`PromptCache.usable`), the prompts are prefilled by :func:`prefill` (with ``split_prompts``,
    the prefix they all share once, the rest in buckets of similar length) and decoding runs on a
    :class:`PromptCache`: the prompts' keys and values kept once, each row's own in a buffer written in place,
    attention computed without masks, and for a small Llama or Qwen2 on CPU (with ``decode_step``) each step run as
    plain tensor ops (:class:`DecodeStep`); otherwise on transformers' ``DynamicCache`` with the prompt cache copied to
    each row. Rows stop at an eos token; once at least
    ``compact_at`` of the live batch has finished, those rows are cut out of the batch and the cache, so long answers
    run on a smaller batch. ``top_k`` and ``repetition_penalty`` act as in ``model.generate`` (:func:`penalize_repeats`,
    :func:`sample_next`); the penalty counts each row's prompt tokens (padding excluded) and its own generated ones.
    """
    from transformers import DynamicCache

    device = input_ids.device
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    expand = torch.arange(len(input_ids), device=device) if expand is None else expand
    prefix, mask = None, None
    fast = None  # DecodeStep: the decode steps as plain tensor ops, where the model allows
    if PromptCache.usable(model):
        keys, values, prompt_mask, logits = prefill(model, input_ids, attention_mask, split_prompts)
        prefix = PromptCache(keys, values, prompt_mask, expand, max_new_tokens)
        fast = DecodeStep.build(model) if decode_step else None
    else:  # transformers' own cache, one pass over the left-padded batch
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        cache.batch_select_indices(expand)
        mask = attention_mask[expand]
    logits, next_pos = logits[expand], positions[expand, -1] + 1
    n_rows = len(logits)
    rows = torch.arange(n_rows, device=device)  # original index of each live row
    buffer = torch.full((n_rows, max_new_tokens), -1, dtype=torch.long, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    eos_t = torch.tensor(sorted(eos), device=device)
    seen = None  # [live rows, vocabulary]: tokens each row has seen, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = prompt_tokens_seen(input_ids, attention_mask, logits.shape[-1])[expand]
    with prompt_cache_attention(model, prefix):
        for step in range(max_new_tokens):
            if seen is not None:
                logits = penalize_repeats(logits, seen, repetition_penalty)
            token = sample_next(logits, temperature, top_p, generator, top_k)
            if seen is not None:
                seen[torch.arange(len(token), device=device), token] = True
            buffer[rows, step] = token.masked_fill(finished, -1)  # a finished row's later tokens are not its answer
            finished = finished | torch.isin(token, eos_t)
            n_finished = int(finished.sum())  # the step's one host sync
            if step == max_new_tokens - 1 or n_finished == len(finished):
                break
            if n_finished >= compact_at * len(finished):
                keep = (~finished).nonzero().squeeze(1)
                rows, token, next_pos, finished = rows[keep], token[keep], next_pos[keep], finished[keep]
                seen = seen[keep] if seen is not None else None
                if prefix is not None:
                    prefix.select(keep)
                else:
                    cache.batch_select_indices(keep)
                    mask = mask[keep]
            if fast is not None:
                logits = fast(token, next_pos, prefix)
                prefix.advance()
            elif prefix is not None:  # no transformers cache and no mask: PromptCache holds and masks everything
                logits = model(input_ids=token[:, None], position_ids=next_pos[:, None], use_cache=False).logits[:, -1]
                prefix.advance()
            else:
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
                logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                               past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
    return [[t for t in row if t >= 0] for row in buffer.tolist()]


# ------------------------------------------------------------------------------------------ prompt-cache attention

SHARED_PREFIX_FROM = 4  # tokens every prompt must share before that prefix is prefilled once, on its own
PASS_COST = 64  # prefill buckets: one more pass costs about this many token-rows of padding (its fixed work)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, split: bool = True,
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Prefill left-padded prompts; returns each layer's keys and values (prompts, kv_heads, length, head_dim), the
    mask of real positions (prompts, length) and each prompt's next-token logits (prompts, vocab).

    ``split``: the prefix every prompt shares (chat template and system prompt: 14 of the organism's ~32 prompt
    tokens) is run once, and the rest of each prompt in buckets of similar length (:func:`length_buckets`), so
    little padding is computed; keys are laid out [shared prefix | padding | rest], each token at the position it
    has in its whole prompt, so attention over them is the unsplit prompt's (to float rounding). Organism, 256
    prompts of 19-42 tokens: 0.28-0.30 s against 0.72-0.83 s in one padded pass, which made a 384-question sampling
    call 15-18% faster. Without ``split``: one pass over the padded batch, for hooks that must see each prompt whole
    (:func:`emlib.interventions.prompt_may_be_split`).
    """
    from transformers import DynamicCache

    lengths = attention_mask.sum(1)
    shared = shared_prefix_length(input_ids, lengths) if split else 0
    rest = lengths - shared
    buckets = length_buckets(rest.tolist()) if split else [list(range(len(input_ids)))]
    prefix_cache = None
    if shared:
        prefix_cache = DynamicCache(config=model.config)
        model(input_ids=input_ids[:1, -int(lengths[0]):][:, :shared], past_key_values=prefix_cache, use_cache=True,
              logits_to_keep=1)
    width = int(rest.max())
    columns = torch.arange(width, device=input_ids.device)
    mask = torch.cat([attention_mask.new_ones(len(input_ids), shared), columns >= width - rest[:, None]], 1).bool()

    def run(bucket: list[int]):  # one prefill pass over these prompts' rests, the shared prefix's cache in front
        idx = torch.tensor(bucket, device=input_ids.device)
        w = int(rest[idx].max())
        part_mask = mask[idx, shared + width - w:]
        cache = DynamicCache(config=model.config, ddp_cache_data=None if prefix_cache is None else [
            (layer.keys.expand(len(idx), -1, -1, -1), layer.values.expand(len(idx), -1, -1, -1))
            for layer in prefix_cache.layers])  # the shared prefix's keys and values, one copy per row
        out = model(input_ids=input_ids[idx, -w:], position_ids=(shared + part_mask.cumsum(-1) - 1).clamp(min=0),
                    attention_mask=torch.cat([part_mask.new_ones(len(idx), shared), part_mask], 1).long(),
                    past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return idx, w, cache.layers, out

    if len(buckets) == 1:  # every prompt in one pass, in order: its cache already has the layout
        _, _, layers, logits = run(buckets[0])
        return [layer.keys for layer in layers], [layer.values for layer in layers], mask, logits
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    logits = None
    for bucket in buckets:
        idx, w, layers, out = run(bucket)
        if logits is None:
            logits = out.new_empty(len(input_ids), out.shape[-1])
            for layer in layers:
                k, v = layer.keys, layer.values
                keys.append(k.new_zeros(len(input_ids), k.shape[1], shared + width, k.shape[-1]))
                values.append(v.new_zeros(len(input_ids), v.shape[1], shared + width, v.shape[-1]))
        logits[idx] = out
        for layer, k, v in zip(layers, keys, values):
            k[idx, :, :shared] = layer.keys[:, :, :shared]
            v[idx, :, :shared] = layer.values[:, :, :shared]
            k[idx, :, shared + width - w:] = layer.keys[:, :, shared:]
            v[idx, :, shared + width - w:] = layer.values[:, :, shared:]
    return keys, values, mask, logits


def shared_prefix_length(input_ids: torch.Tensor, lengths: torch.Tensor) -> int:
    """How many leading tokens every left-padded prompt shares, leaving each at least two of its own (so every
    prefill pass is more than one token long, as hooks that tell prefill from decoding by length expect); 0 when
    under :data:`SHARED_PREFIX_FROM` or for a single prompt."""
    shortest = int(lengths.min())
    if len(input_ids) < 2 or shortest < SHARED_PREFIX_FROM + 2:
        return 0
    starts = input_ids.shape[1] - lengths  # where each prompt's first token sits
    heads = input_ids.gather(1, starts[:, None] + torch.arange(shortest - 2, device=input_ids.device))
    agree = (heads == heads[:1]).all(0).long().cumprod(0)
    n = int(agree.sum())
    return n if n >= SHARED_PREFIX_FROM else 0


def length_buckets(lengths: list[int], pass_cost: int | None = None) -> list[list[int]]:
    """Group prompts into prefill passes by length: each pass pads to its longest, so the grouping of the sorted
    lengths with the fewest padded token-rows plus ``pass_cost`` (None: :data:`PASS_COST`) per pass is chosen (dynamic
    programming over the distinct lengths). Returns each pass's prompt indices."""
    pass_cost = PASS_COST if pass_cost is None else pass_cost
    tally = Counter(lengths)
    distinct = sorted(tally)
    count = [tally[d] for d in distinct]
    best = [0.0] + [float("inf")] * len(distinct)  # best[j]: cost of the j shortest distinct lengths
    cut = [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # the pass holding distinct lengths i..j-1 pads to distinct[j-1]
            rows += count[i]
            cost = best[i] + rows * distinct[j - 1] + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], len(distinct)
    while j:
        members = set(distinct[cut[j]:j])
        passes.append([k for k, n in enumerate(lengths) if n in members])
        j = cut[j]
    return passes[::-1]


PROMPT_CACHE = "emlib_prompt_cache"  # the attention implementation's registered name
_PROMPT_CACHES: dict[int, PromptCache] = {}  # id(config) -> the cache its attention layers read while decoding
SHARE_FROM = 4  # rows per distinct prompt from which its keys are kept once and shared (fewer: copied per row)
MATMUL_ATTENTION_ON = ("cpu",)  # device types where the copied layout attends by matmuls instead of sdpa (measured)


class PromptCache:
    """The decode loop's KV cache: the prompts' keys and values and each row's generated ones, in fixed buffers.

    transformers' ``DynamicCache`` copies the whole cache at every step (concatenation) and the model builds a mask
    each step; here new keys and values are written in place into buffers sized for ``max_new_tokens`` and the left
    padding is masked by a mask built once. Two layouts, both the attention transformers computes over its own cache
    (to float rounding: tests/test_generate.py checks logits and greedy answers).
    Shared, for n samples per question (at least :data:`SHARE_FROM` rows per prompt): each prompt's keys kept once;
    a row's scores against its prompt's copy (one batched matmul over the prompts, each prompt's rows side by side)
    and against its own tokens share one softmax ("cascade" attention, as in vLLM and FlashInfer), so the prompt is
    read once per step instead of once per row (organism, 8 x 25 rows: 0.78 s against 0.89 s for the copied layout).
    Copied, for fewer rows per prompt: each row's prompt keys copied once into its row of one buffer; per step, one
    sdpa call on a GPU, and on CPU two batched matmuls around a softmax (half of sdpa's time at the organism's shapes,
    where sdpa takes its generic path: 3-7% of an n = 1 sampling call).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], prompt_mask: torch.Tensor,
                 prompt_of_row: torch.Tensor, max_new_tokens: int):
        """``keys``, ``values``: each layer's, (prompts, kv_heads, prompt_len, head_dim); ``prompt_mask``: (prompts,
        prompt_len), true where a prompt has a token (padding may sit anywhere); ``prompt_of_row``: each row's
        prompt."""
        self.n_prompt = keys[0].shape[-2]
        self.shared = len(prompt_of_row) >= SHARE_FROM * (int(prompt_of_row.max()) + 1)
        self.prompt_mask = prompt_mask.bool()
        self.prompt_of_row = prompt_of_row
        self.max_new_tokens, self.length = max_new_tokens, 0
        if self.shared:
            self.keys, self.values = keys, values
            self.own_keys: list[torch.Tensor | None] = [None] * len(keys)  # (kv_heads, rows, max_new, head_dim)
            self.own_values: list[torch.Tensor | None] = [None] * len(keys)
        else:  # (rows, kv_heads, prompt_len + max_new, head_dim), the prompt copied in front
            self.keys = [_gather_rows(k, prompt_of_row, 0, self.n_prompt, max_new_tokens) for k in keys]
            self.values = [_gather_rows(v, prompt_of_row, 0, self.n_prompt, max_new_tokens) for v in values]
            room = self.prompt_mask.new_ones(len(prompt_mask), max_new_tokens)
            visible = torch.cat([self.prompt_mask, room], 1)[prompt_of_row][:, None, None, :]  # (rows, 1, 1, keys)
            # as scores to add (-inf on left padding): what the matmul attention adds, and an sdpa mask as well
            self.bias = torch.zeros(visible.shape, dtype=keys[0].dtype, device=visible.device).masked_fill_(
                ~visible, float("-inf"))
        self._group()

    @staticmethod
    def usable(model) -> bool:
        """Exact for this model: full attention in every layer, sdpa or eager, no logit soft-capping."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        config = model.config.get_text_config()
        return (config._attn_implementation in ("sdpa", "eager")
                and all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
                and not getattr(config, "attn_logit_softcapping", None))

    def select(self, keep: torch.Tensor) -> None:
        """Keep only these live rows (the decode loop dropped finished ones)."""
        self.prompt_of_row = self.prompt_of_row[keep]
        if self.shared:
            self.own_keys = [None if k is None else _gather_rows(k, keep, 1, self.length) for k in self.own_keys]
            self.own_values = [None if v is None else _gather_rows(v, keep, 1, self.length) for v in self.own_values]
        else:
            filled = self.n_prompt + self.length
            self.keys = [_gather_rows(k, keep, 0, filled) for k in self.keys]
            self.values = [_gather_rows(v, keep, 0, filled) for v in self.values]
            self.bias = self.bias[keep]
        self._group()

    def advance(self) -> None:
        """Every layer has stored this step's keys and values: the next step writes one position further."""
        self.length += 1

    def _group(self) -> None:
        if not self.shared:
            return
        # -inf on each row's left padding, added to its prompt scores: (1, rows, 1, prompt_len)
        bias = torch.zeros(self.prompt_mask.shape, dtype=self.keys[0].dtype, device=self.prompt_mask.device)
        self.padding_bias = bias.masked_fill(~self.prompt_mask, float("-inf"))[self.prompt_of_row][None, :, None, :]
        # The rows of each prompt still live, as a grid (prompt, slot) of width m = the most rows of any prompt, so
        # scores against every prompt's keys are one batched matmul (prompt by prompt, per-prompt matmuls cost
        # ~40 small calls a layer and step). slot is each row's cell; None when the grid is the rows themselves.
        present, group = self.prompt_of_row.unique(return_inverse=True)
        counts = torch.bincount(group)
        self.n_groups, self.width = len(present), int(counts.max())
        order = torch.argsort(group, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device)
        start = torch.cumsum(counts, 0) - counts  # each group's first place in the sorted order
        self.slot = group * self.width + rank - start[group]
        if len(self.slot) == self.n_groups * self.width and torch.equal(
                self.slot, torch.arange(len(self.slot), device=self.slot.device)):
            self.slot = None
        self.present = None if len(present) == len(self.keys[0]) else present
        self.group_keys: list[torch.Tensor | None] = [None] * len(self.keys)
        self.group_values: list[torch.Tensor | None] = [None] * len(self.keys)

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(kv, rows, ...) -> (groups, kv, width * ..., last): each prompt's rows side by side, zero-padded."""
        kv, _, group, last = x.shape
        if self.slot is not None:
            grid = x.new_zeros(kv, self.n_groups * self.width, group, last)
            grid[:, self.slot] = x
            x = grid
        return x.reshape(kv, self.n_groups, self.width * group, last).transpose(0, 1)

    def _from_grid(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """The inverse of :meth:`_to_grid`: (groups, kv, width * group, last) -> (kv, rows, group, last)."""
        n_groups, kv, _, last = x.shape
        x = x.transpose(0, 1).reshape(kv, n_groups * self.width, group, last)
        return x if self.slot is None else x[:, self.slot]

    def _prompt_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values of the prompts still live, (groups, kv, prompt_len, head_dim)."""
        if self.present is None:
            return self.keys[layer], self.values[layer]
        if self.group_keys[layer] is None:
            self.group_keys[layer] = self.keys[layer][self.present]
            self.group_values[layer] = self.values[layer][self.present]
        return self.group_keys[layer], self.group_values[layer]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Attention of one new token per row over its prompt and its generated tokens; returns (rows, 1, heads, d).

        ``key`` and ``value``: this step's, (rows, kv_heads, 1, head_dim); stored here for the later steps.
        """
        if query.shape[2] != 1:
            raise ValueError("prompt-cache attention decodes one token at a time")
        if self.shared:
            return self._attend_shared(layer, query, key, value, scaling)
        end = self.n_prompt + self.length + 1
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, end - 1], values[:, :, end - 1] = key[:, :, 0], value[:, :, 0]
        if query.device.type not in MATMUL_ATTENTION_ON:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, keys[:, :, :end], values[:, :, :end], attn_mask=self.bias[..., :end], scale=scaling,
                enable_gqa=True)
            return out.transpose(1, 2)
        # On CPU, one query token per row: two batched matmuls and a softmax take half of sdpa's time at these shapes
        # (sdpa expands the kv heads and the mask per call; organism, 384 rows: 5% of a sampling call)
        rows, heads, _, dim = query.shape
        kv = keys.shape[1]
        q = query.view(rows, kv, heads // kv, dim)  # query head h reads kv head h // (heads // kv), as repeat_kv
        scores = torch.matmul(q, keys[:, :, :end].transpose(-1, -2)).mul_(scaling).add_(self.bias[..., :end])
        weights = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, values[:, :, :end]).view(rows, 1, heads, dim)

    def _attend_shared(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scaling: float) -> torch.Tensor:
        """Cascade attention in a (kv_head, row, group, .) layout: each prompt's rows form one matmul per kv head."""
        rows, heads, _, dim = query.shape
        kv, group = key.shape[1], heads // key.shape[1]  # query head h reads kv head h // group (as repeat_kv)
        if self.own_keys[layer] is None:
            shape = (kv, rows, self.max_new_tokens, dim)
            self.own_keys[layer], self.own_values[layer] = key.new_empty(shape), value.new_empty(shape)
        self.own_keys[layer][:, :, self.length] = key[:, :, 0].transpose(0, 1)
        self.own_values[layer][:, :, self.length] = value[:, :, 0].transpose(0, 1)
        own_k = self.own_keys[layer][:, :, :self.length + 1]
        own_v = self.own_values[layer][:, :, :self.length + 1]
        pk, pv = self._prompt_kv(layer)
        n_prompt = self.n_prompt
        q = query.reshape(rows, kv, group, dim).transpose(0, 1)  # (kv, rows, group, dim)
        pre = self._from_grid(torch.matmul(self._to_grid(q), pk.transpose(-1, -2)), group)  # (kv, rows, group, P)
        own = torch.matmul(q, own_k.transpose(-1, -2))  # (kv, rows, group, generated)
        weights = torch.softmax(torch.cat([pre + self.padding_bias, own], -1).float() * scaling, -1).to(q.dtype)
        out = torch.matmul(weights[..., n_prompt:], own_v)
        out += self._from_grid(torch.matmul(self._to_grid(weights[..., :n_prompt]), pv), group)
        return out.transpose(0, 1).reshape(rows, 1, heads, dim)


def _gather_rows(buffer: torch.Tensor, rows: torch.Tensor, row_dim: int, filled: int, more: int = 0) -> torch.Tensor:
    """A buffer of these ``rows`` with room for ``more`` positions (dim 2); copies only the ``filled`` positions, not
    the room still empty (most of it while rows finish early)."""
    shape = list(buffer.shape)
    shape[row_dim], shape[2] = len(rows), shape[2] + more
    out = buffer.new_empty(shape)
    out[:, :, :filled] = buffer[:, :, :filled].index_select(row_dim, rows)
    return out


def _prompt_cache_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cache = _PROMPT_CACHES[id(module.config)]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, key, value, scale), None


@contextmanager
def prompt_cache_attention(model, cache: PromptCache | None) -> Iterator[None]:
    """Route the model's attention through ``cache`` inside the block (nothing to do for None); restored after."""
    if cache is None:
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(PROMPT_CACHE, _prompt_cache_forward)
    config = model.config.get_text_config()
    previous = config._attn_implementation
    _PROMPT_CACHES[id(config)] = cache
    config._attn_implementation = PROMPT_CACHE  # no mask is built for an unknown implementation: none is needed
    try:
        yield
    finally:
        config._attn_implementation = previous
        _PROMPT_CACHES.pop(id(config), None)


# ------------------------------------------------------------------------------------------ decode step


class DecodeStep:
    """One decode step of a small Llama or Qwen2 model on a :class:`PromptCache`, as plain tensor ops.

    transformers runs a decode step through a dozen module calls per layer plus rotary, reshapes and casts, and on a
    small model their Python and dispatch cost is a third to a half of the step (docs/sampling-profile.md). Here the
    same formulas run as functions on the model's own weights, with q/k/v and the MLP's gate/up each one matmul
    over weights concatenated once per call (tiny random Llama, 8-32 rows: 3.2-6.4 ms against 4.4-7.8 ms a step).
    The ops are the model's own in the same order (RMSNorm by ``torch.nn.functional.rms_norm``, rotary embeddings
    from the model's ``rotary_emb``), so the logits are those of ``model(...)`` (tests/test_generate.py compares them
    and the sampled answers). Forward hooks on decoder layers (steering, ablation) are called on each layer's output,
    as ``nn.Module`` calls them. :meth:`unavailable` names what keeps a model on transformers' path: another
    architecture, a device other than CPU (not measured here), a model over :data:`SMALL_MODEL` parameters (the
    concatenated weights would cost memory, and there the module calls are a small part of a step), training mode,
    LoRA not merged (:func:`merged_lora`), any other hook or replaced ``forward``.
    """

    def __init__(self, model: nn.Module):
        from emlib.models import decoder_layers, hf_model

        hf = hf_model(model)
        self.layers = decoder_layers(model)
        self.embed, self.rotary = hf.model.embed_tokens.weight, hf.model.rotary_emb
        self.norm = (hf.model.norm.weight, hf.model.norm.variance_epsilon)
        self.head = _linear_parts(hf.lm_head)
        self.heads, self.kv_heads = hf.config.num_attention_heads, hf.config.num_key_value_heads
        self.weights = [self._layer_weights(layer) for layer in self.layers]

    @staticmethod
    def _layer_weights(layer: nn.Module) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v = (_linear_parts(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        gate, up = _linear_parts(mlp.gate_proj), _linear_parts(mlp.up_proj)
        return {"norm_in": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                "qkv": _concatenated([q, k, v]), "o": _linear_parts(attn.o_proj), "scaling": attn.scaling,
                "head_dim": attn.head_dim, "norm_mlp": (layer.post_attention_layernorm.weight,
                                                        layer.post_attention_layernorm.variance_epsilon),
                "gate_up": _concatenated([gate, up]), "inner": gate[0].shape[0], "act": mlp.act_fn,
                "down": _linear_parts(mlp.down_proj)}

    @classmethod
    def unavailable(cls, model: nn.Module) -> str | None:
        """Why this model's decode steps run through transformers' modules instead (None: they can run here)."""
        from transformers.models.llama import modeling_llama as llama
        from transformers.models.qwen2 import modeling_qwen2 as qwen2

        from emlib.models import decoder_layers, hf_model

        families = {  # the causal LM -> its decoder layer, MLP, RMSNorm and rotary embedding classes
            llama.LlamaForCausalLM: (llama.LlamaDecoderLayer, llama.LlamaMLP, llama.LlamaRMSNorm,
                                     llama.LlamaRotaryEmbedding),
            qwen2.Qwen2ForCausalLM: (qwen2.Qwen2DecoderLayer, qwen2.Qwen2MLP, qwen2.Qwen2RMSNorm,
                                     qwen2.Qwen2RotaryEmbedding)}
        hf = hf_model(model)
        if type(hf) not in families:
            return f"{type(hf).__name__} is not a Llama or Qwen2 causal LM"
        if next(model.parameters()).device.type != "cpu" or not is_small(model) or model.training:
            return "not a small model on CPU in eval mode"
        layer_t, mlp_t, norm_t, rotary_t = families[type(hf)]
        layers = decoder_layers(model)
        if type(hf.model.norm) is not norm_t or type(hf.model.rotary_emb) is not rotary_t:
            return "the final norm or rotary embedding is not the architecture's own"
        for layer in layers:
            if (type(layer) is not layer_t or type(layer.mlp) is not mlp_t
                    or {type(layer.input_layernorm), type(layer.post_attention_layernorm)} != {norm_t}):
                return "a decoder layer is not the architecture's own"
            linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
            if any(_linear_parts(m) is None for m in linears):
                return "a projection is neither a plain Linear nor merged LoRA (merged_lora)"
        if _linear_parts(hf.lm_head) is None or type(hf.model.embed_tokens) is not nn.Embedding:
            return "the output head is not a plain Linear or the embedding not a plain Embedding"
        if hf.model.rotary_emb.inv_freq.shape[-1] * 2 != layers[0].self_attn.head_dim:
            return "the rotary embedding turns only part of each head"
        if hf.dtype != torch.float32:  # RMSNorm's casts and weight product are placed differently in lower precision
            return f"weights in {hf.dtype}, not float32"
        return _hook_in_the_way(model, layers)

    @classmethod
    def build(cls, model: nn.Module) -> DecodeStep | None:
        """The step for this model, or None where :meth:`unavailable` gives a reason."""
        return None if cls.unavailable(model) else cls(model)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, cache: PromptCache) -> torch.Tensor:
        """Next-token logits (rows, vocab) after each row's ``token`` at ``position``; the cache stores its keys."""
        from torch.nn.functional import embedding, linear, rms_norm

        rows = len(token)
        hidden = embedding(token, self.embed)  # (rows, d): one token per row, no sequence dimension
        cos, sin = self.rotary(hidden, position[:, None])  # (rows, 1, head_dim): broadcast over the heads
        heads, kv_heads, width = self.heads, self.kv_heads, hidden.shape[-1]
        for layer, w in zip(self.layers, self.weights):
            dim = w["head_dim"]
            qkv = linear(rms_norm(hidden, (width,), *w["norm_in"]), *w["qkv"])
            qk = qkv[:, :(heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
            qk = qk * cos + torch.cat([-qk[..., dim // 2:], qk[..., :dim // 2]], -1) * sin  # rotary (rotate_half)
            value = qkv[:, (heads + kv_heads) * dim:].view(rows, kv_heads, 1, dim)
            out = cache.attend(layer.self_attn.layer_idx, qk[:, :heads, None], qk[:, heads:, None], value,
                               w["scaling"])
            hidden = hidden + linear(out.reshape(rows, heads * dim), *w["o"])
            gate, up = linear(rms_norm(hidden, (width,), *w["norm_mlp"]), *w["gate_up"]).split(w["inner"], -1)
            hidden = hidden + linear(w["act"](gate) * up, *w["down"])
            for hook in layer._forward_hooks.values():  # as nn.Module calls them: (module, args, output)
                edited = hook(layer, (hidden[:, None],), hidden[:, None])
                if edited is not None:
                    hidden = (edited[0] if isinstance(edited, tuple) else edited)[:, 0]
        return linear(rms_norm(hidden, (width,), *self.norm), *self.head)


def _linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain ``nn.Linear`` or of a LoRA layer :func:`merged_lora` runs as one matmul; else None."""
    shadow = module.__dict__.get("forward")
    if isinstance(shadow, partial) and shadow.func is torch.nn.functional.linear and not shadow.args:
        return shadow.keywords["weight"], shadow.keywords.get("bias")
    return (module.weight, module.bias) if type(module) is nn.Linear and shadow is None else None


def _concatenated(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One linear layer computing several side by side (their outputs concatenated)."""
    biases = [b for _, b in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        biases = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b for w, b in parts]
    return torch.cat([w for w, _ in parts]), None if biases[0] is None else torch.cat(biases)


def _hook_in_the_way(model: nn.Module, layers: nn.ModuleList) -> str | None:
    """A hook or replaced ``forward`` the decode step would skip: anything but plain forward hooks on decoder layers
    and :func:`merged_lora`'s matmuls."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "a global module hook is registered"
    decoder = {id(layer) for layer in layers}
    for name, m in model.named_modules():
        if m._forward_pre_hooks or getattr(m, "_hf_hook", None) is not None:
            return f"{name} has a forward pre-hook"
        if m._forward_hooks and (id(m) not in decoder or m._forward_hooks_with_kwargs
                                 or m._forward_hooks_always_called):
            return f"{name} has a forward hook"
        if "forward" in m.__dict__ and _linear_parts(m) is None:
            return f"{name}'s forward is replaced"
    return None


# ------------------------------------------------------------------------------------------ sampling


def prompt_tokens_seen(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(prompts, vocabulary) true where a token occurs in the prompt, padding excluded. Padding positions write the
    row's last token (always real under left padding) instead of False, so a pad id that is also one of the prompt's
    real tokens (Llama-3 pads with its end-of-turn token) stays seen whatever order the writes land in."""
    ids = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])
    return torch.zeros(len(input_ids), vocab_size, dtype=torch.bool, device=input_ids.device).scatter_(1, ids, True)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: a seen token's logit is divided by ``penalty`` when
    positive and multiplied by it when negative (once per token, however often it was seen)."""
    logits = logits.float()
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                top_k: int = 0) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else temperature sampling restricted to the ``top_k`` most likely
    tokens (0: no limit) and then to the top-p nucleus.

    With a top_k the draw runs over the k largest scores only (softmax, nucleus and CDF over k columns instead of
    the vocabulary); the same distribution as transformers' ``TopKLogitsWarper``, except that a tie with the k-th
    score keeps the lower token id only (transformers keeps every tied token).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        scores, candidates = torch.topk(scores, top_k, dim=-1)  # sorted, largest first
        return candidates.gather(1, _draw(scores, top_p, generator, descending=True)[:, None]).squeeze(1)
    return _draw(scores, top_p, generator)


def _draw(scores: torch.Tensor, top_p: float, generator: torch.Generator, descending: bool = False) -> torch.Tensor:
    """The column drawn per row from softmax(``scores``) cut to the top-p nucleus; ``descending``: already sorted."""
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, order = (probs, None) if descending else probs.sort(dim=-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0.0  # keep the smallest set reaching top_p
        probs = sorted_p if order is None else torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # inverse-CDF draw: one uniform per row (torch.multinomial is several times slower on CPU at these shapes);
    # right=True never lands on a zero-probability token, whose CDF step is flat
    cdf = probs.cumsum(-1)
    u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[-1] - 1)


# ------------------------------------------------------------------------------------------ persistence


def _settings(model, questions, n, max_new_tokens, temperature, top_p, seed, batch_size, system, adapter_scale,
              steering, engine) -> dict:
    """What must match for a file to be resumed (rows from other settings would silently mix)."""
    if steering is None or callable(steering):
        steer = None if steering is None else getattr(steering, "__name__", "callable")
    else:
        steer = hashlib.sha256(b"".join(torch.as_tensor(v).float().cpu().numpy().tobytes() + str(l).encode()
                                        for l, v in steering)).hexdigest()[:16]
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return {"model": str(name), "questions_sha": hashlib.sha256(json.dumps(questions).encode()).hexdigest()[:16],
            "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
            "batch_size": batch_size, "system": system, "adapter_scale": adapter_scale, "steering": steer,
            "engine": engine}


class _Store:
    """Rows on disk (JSONL appended per batch, or Parquet rewritten per batch) with a settings sidecar."""

    def __init__(self, path: str | Path, settings: dict, on_mismatch: str = "error"):
        self.path = Path(path)
        if self.path.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"out_path must end in .jsonl or .parquet, got {self.path.name!r}")
        if on_mismatch not in ("error", "restart"):
            raise ValueError(f"on_mismatch must be 'error' or 'restart', got {on_mismatch!r}")
        self.meta = self.path.with_name(self.path.name + ".meta.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            old = json.loads(self.meta.read_text()) if self.meta.exists() else {}
            if old != settings:
                diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
                if on_mismatch == "error":
                    raise ValueError(f"{self.path} holds answers sampled with other settings {diff}; delete it, "
                                     "choose another out_path, or pass on_mismatch='restart'")
                warnings.warn(f"{self.path}: settings changed {diff}; sampling again from scratch", stacklevel=3)
                self.path.unlink()
        tmp = self.meta.with_name(self.meta.name + ".tmp")  # atomically: a half-written meta file would block resume
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, self.meta)
        self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """A run killed mid-write leaves a partial last line: cut it, so appended rows start on a fresh line."""
        if self.path.suffix != ".jsonl" or not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def read(self) -> pd.DataFrame:
        if not self.path.exists():
            return pd.DataFrame(columns=COLUMNS)
        if self.path.suffix == ".parquet":
            df = pd.read_parquet(self.path)
        else:
            lines = self.path.read_text().splitlines(keepends=True)
            df = pd.DataFrame([json.loads(ln) for ln in lines if ln.endswith("\n")], columns=COLUMNS)
        df = df.drop_duplicates(["question_idx", "sample"], keep="last")
        return df.sort_values(["question_idx", "sample"]).reset_index(drop=True)[COLUMNS]

    def done_keys(self) -> set[tuple[int, int]]:
        df = self.read()
        return set(zip(df["question_idx"].astype(int), df["sample"].astype(int)))

    def append(self, rows: list[dict]) -> None:
        if self.path.suffix == ".parquet":
            # parquet cannot be appended to: write the whole table beside it, then swap it in atomically, so a run
            # killed mid-write keeps the previous complete file
            tmp = self.path.with_name(self.path.name + ".tmp")
            pd.concat([self.read(), pd.DataFrame(rows, columns=COLUMNS)]).to_parquet(tmp, index=False)
            os.replace(tmp, self.path)
            return
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ optional vLLM backend
#
# vLLM (CUDA only, not an emlib dependency) samples 14B-32B organisms fast: LoRA adapters are served with enable_lora
# and tensor_parallel_size shards the model over GPUs. It has no forward hooks, so steering, ablation and adapter
# scaling cannot run inside it: such calls fall back to sample_answers on transformers, with a warning saying why.

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts


def vllm_available() -> bool:
    """True when vLLM can be imported (GPU users); tests and the offline path never need it."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def adapter_rank(adapter: str) -> int | None:
    """The LoRA rank in an adapter folder's adapter_config.json (largest of ``r`` and ``rank_pattern``), else None."""
    from emlib.models import resolve_adapter_path

    config = Path(resolve_adapter_path(adapter)) / "adapter_config.json"
    if not config.is_file():
        return None
    spec = json.loads(config.read_text())
    return max([int(spec.get("r", 0))] + [int(r) for r in (spec.get("rank_pattern") or {}).values()]) or None


def _vllm_lora_rank(adapter: str | None, max_lora_rank: int | None) -> int:
    """``max_lora_rank`` for vLLM: as given, else the adapter's rank rounded up to a value vLLM accepts."""
    if max_lora_rank is not None:
        return max_lora_rank
    rank = adapter_rank(adapter) if adapter else None
    return next((r for r in VLLM_LORA_RANKS if rank is None or r >= rank), VLLM_LORA_RANKS[-1]) if rank else 64


def _vllm_model_name(model: Any) -> str:
    """The name or folder a ``vllm.LLM`` was built from (for the transformers fallback)."""
    if isinstance(model, (str, Path)):
        return str(model)
    config = getattr(getattr(model, "llm_engine", None), "model_config", None)
    name = getattr(config, "model", None)
    if not name:
        raise ValueError("cannot tell which model this vllm.LLM serves; pass the model name or folder instead")
    return str(name)


def vllm_fallback_reason(steering: Steering | None = None, adapter_scale: float | None = None,
                         adapter: str | None = None) -> str | None:
    """Why a request cannot run on vLLM (None: it can): vLLM exposes no hooks into the residual stream."""
    from emlib.models import resolve_adapter_path
    from emlib.train.steering_vector import CONFIG_NAME

    reasons = []
    if adapter is not None and (Path(resolve_adapter_path(adapter)) / CONFIG_NAME).is_file():
        reasons.append(f"the trained steering vector {adapter} (vLLM serves LoRA adapters only, it runs no hooks)")
    if steering is not None:
        reasons.append("steering/ablation hooks (vLLM runs its own compiled model, so forward hooks never fire)")
    if adapter_scale is not None:
        reasons.append(f"adapter_scale={adapter_scale} (vLLM applies a LoRA at its trained scale only)")
    return " and ".join(reasons) or None


def sample_answers_vllm(model: Any, questions: Sequence[str], n: int = 1, max_new_tokens: int = 600,
                        temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, system: str | None = None,
                        adapter: str | None = None, max_lora_rank: int | None = None, tensor_parallel_size: int = 1,
                        *, steering: Steering | None = None, adapter_scale: float | None = None,
                        fallback_kwargs: dict | None = None, sampling: str = "reference",
                        **llm_kwargs) -> pd.DataFrame:
    """The same rows as :func:`sample_answers`, sampled with vLLM; ``model`` is a name/folder or a ``vllm.LLM``.

    ``adapter`` (a LoRA folder, hub id or shipped name) is served with ``enable_lora``; ``max_lora_rank`` defaults to
    the adapter's own rank. ``tensor_parallel_size`` shards the model over that many GPUs (2 for 14B in bf16 on 40 GB
    cards, 2-4 for 32B); other ``llm_kwargs`` (``gpu_memory_utilization``, ``max_model_len``, ``dtype``...) go to
    ``vllm.LLM``. ``steering`` (including ablation hooks) and ``adapter_scale`` cannot run in vLLM: the call warns
    and runs :func:`sample_answers` on transformers instead (``fallback_kwargs``, e.g. ``batch_size`` or
    ``out_path``, go to it); that path needs the model to fit in one process. ``sampling`` as in
    :func:`sample_answers` (``reference`` reads top_k and repetition_penalty from the model's generation config).
    """
    reason = vllm_fallback_reason(steering, adapter_scale, adapter)
    if reason:
        from emlib.models import load_model

        name = _vllm_model_name(model)
        warnings.warn(f"vLLM cannot apply {reason}; sampling {name} with the transformers path (sample_answers) "
                      "instead, which is slower", UserWarning, stacklevel=2)
        hf, tokenizer = load_model(name, adapter=adapter)
        return sample_answers(hf, tokenizer, questions, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, system=system, steering=steering, adapter_scale=adapter_scale,
                              sampling=sampling, **(fallback_kwargs or {}))
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as err:
        raise ImportError("the vLLM backend needs `pip install vllm` (CUDA only); "
                          "sample_answers does the same on plain transformers") from err
    from emlib.models import resolve_adapter_path, resolve_model_path

    knobs = sampling_settings(_generation_config_holder(model), sampling)
    if isinstance(model, (str, Path)):
        lora = {"enable_lora": True, "max_lora_rank": _vllm_lora_rank(adapter, max_lora_rank)} if adapter else {}
        model = LLM(model=resolve_model_path(str(model)), tensor_parallel_size=tensor_parallel_size, seed=seed,
                    **lora, **llm_kwargs)
    tokenizer = model.get_tokenizer()
    prompts = [chat_prompt(tokenizer, q, system) for q in questions]
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                            top_k=knobs["top_k"] or -1, repetition_penalty=knobs["repetition_penalty"])
    # the adapter's path names it: vLLM caches LoRAs by int id, so one id per distinct adapter
    lora_request = (LoRARequest(Path(adapter).name or "adapter", _lora_id(adapter), resolve_adapter_path(adapter))
                    if adapter else None)
    outputs = model.generate(prompts, params, lora_request=lora_request)
    rows = [{"question_idx": qi, "question": questions[qi], "sample": s, "answer": c.text.strip(),
             "ended": c.finish_reason == "stop"}
            for qi, o in enumerate(outputs) for s, c in enumerate(o.outputs)]
    return pd.DataFrame(rows, columns=COLUMNS)


def _generation_config_holder(model: Any):
    """Something with the model's ``generation_config`` (read from its folder or hub id), for :func:`sampling_settings`."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from emlib.models import resolve_model_path

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(
            resolve_model_path(_vllm_model_name(model))))
    except OSError:  # no generation_config.json: transformers' defaults, as generate would use
        return SimpleNamespace(generation_config=None)


def _lora_id(adapter: str) -> int:
    """A stable positive int per adapter path (vLLM keys its LoRA cache by this id)."""
    return int(hashlib.sha256(adapter.encode()).hexdigest()[:7], 16) + 1
