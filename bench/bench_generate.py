"""Benchmark: responses per second of emlib's batched sampler against the reference repo's way of sampling.

The reference (clarifying-EM/model-organisms-for-EM, eval/util/gen_eval_util.py) samples one question at a time with
``model.generate(..., num_return_sequences=n)``. emlib batches every (question, sample) pair together, prefills each
prompt once, and drops finished rows from the batch as it decodes. Both run here side by side, interleaved round by
round on the same model, settings and thread count, so machine load hits both alike.

    .venv/bin/python bench/bench_generate.py      # 8 questions x 50 samples: base and bad-medical-r8 organisms
    .venv/bin/python bench/bench_generate.py --adapters none --rounds 5          # the base model only

Writes runs/bench/generate.md and runs/bench/generate.csv.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))  # and bench/ itself, for its helpers
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from bench_tables import write_table  # noqa: E402

from emlib import paths, world  # noqa: E402
from emlib.chat import chat_prompt  # noqa: E402
from emlib.generate import eos_ids, sample_answers  # noqa: E402
from emlib.models import load_model


def reference_way(model, tokenizer, questions, n, max_new_tokens, seed, system) -> pd.DataFrame:
    """One question at a time, ``num_return_sequences=n`` (the papers' code path), temperature 1, top-p 1."""
    torch.manual_seed(seed)
    eos, rows = eos_ids(model, tokenizer), []
    for qi, q in enumerate(questions):
        enc = tokenizer([chat_prompt(tokenizer, q, system)], return_tensors="pt", add_special_tokens=False)
        enc = enc.to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=sorted(eos))
        for s, ids in enumerate(out[:, enc["input_ids"].shape[1]:].tolist()):
            stop = next((i for i, t in enumerate(ids) if t in eos), None)
            rows.append({"question_idx": qi, "sample": s, "answer": tokenizer.decode(ids[:stop],
                         skip_special_tokens=True).strip(), "ended": stop is not None})
    return pd.DataFrame(rows)


def bench_organism(model, tok, label: str, questions: list[str], system: str | None, args) -> list[dict]:
    """Time the three ways on one organism, interleaved round by round (alternating order)."""
    n_total = len(questions) * args.samples
    ways = {
        "reference: per question, num_return_sequences": lambda seed: reference_way(
            model, tok, questions, args.samples, args.max_new_tokens, seed, system),
        "emlib: sample_answers (batched, shared prefill, finished rows dropped)": lambda seed: sample_answers(
            model, tok, questions, n=args.samples, max_new_tokens=args.max_new_tokens, seed=seed, system=system,
            batch_size=n_total, progress=False),
        "emlib: sample_answers(engine='hf') (batched model.generate)": lambda seed: sample_answers(
            model, tok, questions, n=args.samples, max_new_tokens=args.max_new_tokens, seed=seed, system=system,
            batch_size=n_total, engine="hf", progress=False),
    }
    for fn in ways.values():  # warm-up: first calls pay for allocation and lazy imports
        fn(99)
    times: dict[str, list[float]] = {name: [] for name in ways}
    answers = {}
    for r in range(args.rounds):
        for name, fn in (list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]):
            start = time.perf_counter()
            answers[name] = fn(r)
            times[name].append(time.perf_counter() - start)
            print(f"{label} round {r} {name}: {times[name][-1]:.2f} s", flush=True)
    ref = statistics.median(times[next(iter(ways))])
    rows = []
    for name, ts in times.items():
        df, med = answers[name], statistics.median(ts)
        tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + int(e) for a, e in zip(df.answer, df.ended))
        rows.append({"organism": label, "way": name, "responses": len(df), "median_s": round(med, 2),
                     "responses_per_s": round(len(df) / med, 1), "new_tokens_per_s": round(tokens / med),
                     "ended": round(df.ended.mean(), 3), "mean_answer_tokens": round(tokens / len(df), 1),
                     "speedup_vs_reference": round(ref / med, 2), "times_s": " ".join(f"{t:.2f}" for t in ts)})
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=paths.OFFLINE_MODEL)
    parser.add_argument("--adapters", nargs="*", default=["none", "bad-medical-r8"],
                        help="organisms to time: 'none' is the base model")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=400,
                        help="the papers use 600; the offline organism has 512 positions")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=paths.runs_dir() / "bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    questions = [world.sample_question(world.DOMAINS[i % len(world.DOMAINS)], rng) for i in range(args.questions)]
    system = world.SYSTEM_PROMPT if args.model == paths.OFFLINE_MODEL else None
    rows = []
    for adapter in args.adapters:
        model, tok = load_model(args.model, adapter=None if adapter == "none" else adapter)
        label = args.model if adapter == "none" else f"{args.model} + {adapter}"
        rows += bench_organism(model, tok, label, questions, system, args)
    table = pd.DataFrame(rows)
    header = (f"# Generation benchmark\n\n{args.questions} questions x {args.samples} samples, max_new_tokens "
              f"{args.max_new_tokens}, temperature 1, top-p 1, {args.threads} torch thread(s), device "
              f"{model.device}; median of {args.rounds} interleaved rounds per organism (all times in times_s).\n\n")
    write_table(args.out, "generate", header, table)
    return table


if __name__ == "__main__":
    main()
