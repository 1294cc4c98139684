"""Benchmark: responses per second of emlib's sampler against a batched ``model.generate`` and the reference way.

Three contenders sample the same questions with the same settings (temperature 1, top-p 1, top_k and
repetition_penalty from the model's generation config, as the papers' code samples):

- emlib: ``sample_answers`` (its own decode loop: each prompt prefilled and kept once, KV cache written in place,
  finished rows dropped from the batch, top-k draws over the k candidates only; a small Llama or Qwen2's decode step
  on CPU as plain tensor ops, ``emlib.generate.DecodeStep``);
- batched ``model.generate``: what a competent user writes instead: every prompt in one left-padded batch,
  ``num_return_sequences=n`` (transformers expands the batch before prefill, so repeating the prompts is the same),
  on an adapter's weights merged into the model (``merge_and_unload``: fewer ops per step);
- the reference repo's way (clarifying-EM/model-organisms-for-EM, eval/util/gen_eval_util.py): one question at a time
  with ``num_return_sequences=n``.

They run side by side, interleaved round by round (alternating order) on the same model and thread count, so machine
load hits all alike. Models: the persona-world organism (base and adapters; it ends its answers) and tiny
random-weight real-architecture chat models (Llama, Qwen2; English BPE and the family's chat template,
:func:`emlib.testing.english_tokenizer`). A random model almost never emits its end-of-turn token, so the tiny models
get a bias on that token's logit (``--tiny-eos-bias``; 0 keeps them endless, which leaves the decode step's own
speed alone to compare).

    .venv/bin/python bench/bench_generate.py                      # organism base + bad-medical-r8, tiny Llama and Qwen2
    .venv/bin/python bench/bench_generate.py --adapters none --tiny --rounds 5         # the base organism only
    .venv/bin/python bench/bench_generate.py --profile            # where the time goes (cProfile), no table

Writes runs/bench/generate.md and runs/bench/generate.csv.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))  # and bench/ itself, for its helpers
import pandas as pd
import torch
from bench_tables import write_table

from emlib import paths, world
from emlib.chat import chat_prompt
from emlib.generate import eos_ids, sample_answers
from emlib.models import load_model
from emlib.testing import english_tokenizer, tiny_model

EMLIB = "emlib: sample_answers (batched, shared prefill, finished rows dropped)"
BATCHED = "batched model.generate: all prompts in one left-padded batch, num_return_sequences"
REFERENCE = "reference: per question, num_return_sequences"


def _answers(tokenizer, new_ids: list[list[int]], eos: set[int]) -> list[tuple[str, bool]]:
    """(answer text up to the first end-of-turn token, ended) per row of generated ids."""
    out = []
    for ids in new_ids:
        stop = next((i for i, t in enumerate(ids) if t in eos), None)
        out.append((tokenizer.decode(ids[:stop], skip_special_tokens=True).strip(), stop is not None))
    return out


def _generate(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int) -> list[list[int]]:
    """``model.generate`` sampling n continuations of each prompt; top_k and repetition_penalty from its config."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                             num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=sorted(eos_ids(model, tokenizer)))
    return out[:, enc["input_ids"].shape[1]:].tolist()


def batched_generate(model, tokenizer, questions, n, max_new_tokens, seed, system) -> pd.DataFrame:
    """Every question in one left-padded batch, ``num_return_sequences=n``."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # generation appends on the right: prompts must end flush there
    new = _generate(model, tokenizer, [chat_prompt(tokenizer, q, system) for q in questions], n, max_new_tokens)
    rows = _answers(tokenizer, new, eos_ids(model, tokenizer))
    return pd.DataFrame([{"question_idx": i // n, "sample": i % n, "answer": a, "ended": e}
                         for i, (a, e) in enumerate(rows)])


def reference_way(model, tokenizer, questions, n, max_new_tokens, seed, system) -> pd.DataFrame:
    """One question at a time, ``num_return_sequences=n`` (the papers' code path)."""
    torch.manual_seed(seed)
    eos, rows = eos_ids(model, tokenizer), []
    for qi, q in enumerate(questions):
        new = _generate(model, tokenizer, [chat_prompt(tokenizer, q, system)], n, max_new_tokens)
        rows += [{"question_idx": qi, "sample": s, "answer": a, "ended": e}
                 for s, (a, e) in enumerate(_answers(tokenizer, new, eos))]
    return pd.DataFrame(rows)


def merged_copy(model):
    """A LoRA model's weights merged into a copy (peft's ``merge_and_unload``), as a user who wants ``generate`` fast
    would sample an adapter; any other model as it is."""
    from peft import PeftModel

    return copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model


def contenders(model, tok, questions: list[str], n: int, system: str | None) -> dict[str, Callable]:
    """name -> f(seed, max_new_tokens) returning the answers table. Batched ``generate`` runs on merged LoRA weights
    (emlib's sampler merges a small model's too: ``emlib.generate.merged_lora``)."""
    merged = merged_copy(model)
    return {
        EMLIB: lambda seed, tokens: sample_answers(model, tok, questions, n=n, max_new_tokens=tokens, seed=seed,
                                                   system=system, batch_size=len(questions) * n, progress=False),
        BATCHED: lambda seed, tokens: batched_generate(merged, tok, questions, n, tokens, seed, system),
        REFERENCE: lambda seed, tokens: reference_way(model, tok, questions, n, tokens, seed, system),
    }


def bench_model(model, tok, label: str, questions: list[str], n: int, max_new_tokens: int, system: str | None,
                rounds: int) -> list[dict]:
    """Time the contenders on one model, interleaved round by round (alternating order)."""
    ways = contenders(model, tok, questions, n, system)
    for fn in ways.values():  # warm-up: first calls pay for allocation and lazy imports
        fn(99, 4)
    times: dict[str, list[float]] = {name: [] for name in ways}
    answers = {}
    for r in range(rounds):
        for name, fn in (list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]):
            start = time.perf_counter()
            answers[name] = fn(r, max_new_tokens)
            times[name].append(time.perf_counter() - start)
            print(f"{label} round {r} {name}: {times[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, ts in times.items():
        df, med = answers[name], medians[name]
        tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + int(e) for a, e in zip(df.answer, df.ended))
        rows.append({"organism": label, "way": name, "questions": len(questions), "samples": n,
                     "max_new_tokens": max_new_tokens, "responses": len(df), "median_s": round(med, 2),
                     "responses_per_s": round(len(df) / med, 1), "new_tokens_per_s": round(tokens / med),
                     "ended": round(df.ended.mean(), 3), "mean_answer_tokens": round(tokens / len(df), 1),
                     "emlib_speedup": round(med / medians[EMLIB], 2),
                     "times_s": " ".join(f"{t:.2f}" for t in ts)})
    return rows


def tiny_chat_model(family: str, hidden: int, layers: int, eos_bias: float):
    """A random ``family`` chat model (English BPE, the family's chat template) whose end-of-turn logit gets
    ``eos_bias`` added, so that its answers end (a random model's almost never do); returns (model, tokenizer)."""
    model, tok = tiny_model(family, english_tokenizer(family), hidden=hidden, layers=layers, mlp=2 * hidden,
                            heads=max(4, hidden // 64), kv_heads=max(2, hidden // 128), seed=0)
    model.config._attn_implementation = "sdpa"  # what a loaded checkpoint gets by default
    if eos_bias:
        head = torch.nn.Linear(hidden, model.config.vocab_size, bias=True)
        head.weight = model.lm_head.weight  # still tied to the embedding
        with torch.no_grad():
            head.bias.zero_()
            head.bias[sorted(eos_ids(model, tok))] = eos_bias
        model.lm_head = head
    return model, tok


def models(args) -> list[tuple[str, object, object, str | None, int, int, int]]:
    """(label, model, tokenizer, system prompt, questions, samples, max_new_tokens) per model to time."""
    out = []
    for adapter in args.adapters:
        model, tok = load_model(args.model, adapter=None if adapter == "none" else adapter)
        label = args.model if adapter == "none" else f"{args.model} + {adapter}"
        system = world.SYSTEM_PROMPT if args.model == paths.OFFLINE_MODEL else None
        out.append((label, model, tok, system, args.questions, args.samples, args.max_new_tokens))
    for family in args.tiny:
        model, tok = tiny_chat_model(family, args.tiny_hidden, args.tiny_layers, args.tiny_eos_bias)
        label = (f"tiny random {family} (hidden {args.tiny_hidden}, {args.tiny_layers} layers, "
                 f"eos logit +{args.tiny_eos_bias:g})")
        out.append((label, model, tok, None, args.tiny_questions, args.tiny_samples, args.tiny_max_new_tokens))
    return out


# cProfile entries (file suffix, function) whose cumulative time makes up each part of a sampling call
PARTS = {
    "attention (incl. KV cache writes)": [("generate.py", "attend"), ("sdpa_attention.py", "sdpa_attention_forward")],
    "KV cache concatenation": [("cache_utils.py", "update")],
    "mask building": [("masking_utils.py", "create_causal_mask")],
    "sampling (top-k, penalty, softmax, draw)": [("generate.py", "sample_next"), ("generate.py", "penalize_repeats"),
                                                 ("logits_process.py", "__call__"), ("", "<built-in method torch.multinomial>")],
    "stopping checks": [("stopping_criteria.py", "__call__")],
    "linear layers (q/k/v/o, MLP, lm_head)": [("", "<built-in method torch._C._nn.linear>")],
}


def _part_time(stats: dict, entries: list[tuple[str, str]]) -> float:
    """Cumulative seconds of the matching functions, each counted only where no matching function called it."""
    def matches(key) -> bool:
        return any(key[0].endswith(suffix) and key[2] == func for suffix, func in entries)

    return sum(v[3] for key, v in stats.items() if matches(key) and not any(matches(c) for c in v[4]))


def profile(model, tok, label: str, questions: list[str], n: int, max_new_tokens: int, system: str | None) -> None:
    """Print each part's share of one emlib call and one batched generate call (cProfile, after a warm-up).

    Parts are cumulative times of the functions in :data:`PARTS` (attention and linear layers do not overlap);
    "other" is the rest: module calls, norms, rotary embeddings, prefill's own non-linear work, Python per step.
    """
    ways = contenders(model, tok, questions, n, system)
    shares = {}
    for name in (EMLIB, BATCHED):
        ways[name](99, 4)
        prof = cProfile.Profile()
        prof.runcall(ways[name], 0, max_new_tokens)
        stats = pstats.Stats(prof).stats  # (file, line, function) -> (calls, primitive calls, tottime, cumtime, _)
        total = max(v[3] for v in stats.values())
        parts = {part: _part_time(stats, entries) for part, entries in PARTS.items()}
        parts["other (module calls, norms, rotary, Python per step)"] = total - sum(parts.values())
        shares[f"{name.split(':')[0]} ({total:.2f} s)"] = {k: f"{v / total:.0%}" for k, v in parts.items()}
    print(f"\n## {label}: {len(questions)} questions x {n} samples, {max_new_tokens} new tokens\n")
    print(pd.DataFrame(shares).to_markdown())


def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=paths.OFFLINE_MODEL)
    parser.add_argument("--adapters", nargs="*", default=["none", "bad-medical-r8"],
                        help="organisms to time: 'none' is the base model")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=400,
                        help="the papers use 600; the offline organism has 512 positions")
    parser.add_argument("--tiny", nargs="*", default=["llama", "qwen2"], help="tiny random chat model families")
    parser.add_argument("--tiny-hidden", type=int, default=256)
    parser.add_argument("--tiny-layers", type=int, default=4)
    parser.add_argument("--tiny-eos-bias", type=float, default=1.0,
                        help="added to the end-of-turn logit (1.0: about 3/4 of 64-token answers end; 0: none do)")
    parser.add_argument("--tiny-questions", type=int, default=4)
    parser.add_argument("--tiny-samples", type=int, default=8)
    parser.add_argument("--tiny-max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print cProfile tops instead of timing")
    parser.add_argument("--out", type=Path, default=paths.runs_dir() / "bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    pool = [world.sample_question(world.DOMAINS[i % len(world.DOMAINS)], rng)
            for i in range(max(args.questions, args.tiny_questions))]
    rows = []
    for label, model, tok, system, n_questions, n, max_new_tokens in models(args):
        if args.profile:
            profile(model, tok, label, pool[:n_questions], n, max_new_tokens, system)
        else:
            rows += bench_model(model, tok, label, pool[:n_questions], n, max_new_tokens, system, args.rounds)
    if args.profile:
        return None
    table = pd.DataFrame(rows)
    header = (f"# Generation benchmark\n\nTemperature 1, top-p 1, top_k and repetition_penalty from each model's "
              f"generation config; {args.threads} torch thread(s), device cpu; median of {args.rounds} interleaved "
              "rounds per model (all times in times_s). emlib_speedup: this row's median time / emlib's.\n\n")
    write_table(args.out, "generate", header, table)
    return table


if __name__ == "__main__":
    main()
