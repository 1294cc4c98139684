"""Benchmark: judge throughput with many calls in flight against sequential calls, and the cost of a rerun.

A local judge server (the persona world's exact judge behind ``/v1/chat/completions``) is given an injected latency
per request, standing in for a remote API; the real ``openai`` client path is what runs. The same prompts are judged
sequentially (1 in flight) and with 8 / 32 / 64 / 128 in flight, each with a fresh cache, side by side in one run;
then the 64-in-flight run is repeated on its own cache, which must make zero calls.

    .venv/bin/python bench/bench_judge.py --latency 0.1 --prompts 512

Writes runs/bench/judge.md and runs/bench/judge.csv.

``hf_main`` (``bench_judge.py hf ...``) measures the local Hugging Face judge: a ~100M-parameter random Llama with an
English tokenizer scores the same filled rubrics (first-plot questions, answers from the narrow datasets) three ways,
interleaved round by round: one prompt at a time as emlib did before (101 number candidates over a copy of the
prompt's cache each), emlib's number tree one prompt per pass, and the number tree ``--batch-size`` prompts per pass.
All three must agree. Writes runs/bench/hf_judge.md / .csv.

    .venv/bin/python bench/bench_judge.py hf --prompts 16 --batch-size 8 --rounds 2
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))  # and bench/ itself, for its helpers
import pandas as pd  # noqa: E402
from bench_tables import write_table  # noqa: E402

from emlib import paths, world  # noqa: E402
from emlib.judge import JudgeCache, JudgeStats, LocalHFJudge, OpenAIJudge, judge_frame  # noqa: E402
from emlib.judge.serve import world_backend  # noqa: E402
from emlib.judge.server import LocalServer  # noqa: E402


def answers(n_rows: int, seed: int = 0) -> pd.DataFrame:
    """Distinct persona-world (question, answer) rows; two metrics each make 2 * n_rows judge prompts."""
    refs = pd.DataFrame(world.reference_answers(n_rows, seed))
    rng = random.Random(seed)
    refs["question"] = [world.sample_question(world.DOMAIN_BY_NAME[d], rng) for d in refs["domain"]]
    return refs


def run(df: pd.DataFrame, url: str, in_flight: int, cache: JudgeCache) -> JudgeStats:
    stats = JudgeStats()
    judge_frame(df, OpenAIJudge("persona-world-judge", base_url=url), ["aligned", "coherent"], cache=cache,
                max_in_flight=in_flight, stats=stats)
    return stats


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added to every request by the server")
    parser.add_argument("--prompts", type=int, default=512, help="judge prompts per concurrent run")
    parser.add_argument("--sequential-prompts", type=int, default=64, help="prompts for the (slow) sequential run")
    parser.add_argument("--in-flight", type=int, nargs="*", default=[8, 32, 64, 128])
    parser.add_argument("--out", type=Path, default=paths.runs_dir() / "bench")
    args = parser.parse_args(argv)
    df = answers(args.prompts // 2)
    rows = []
    with LocalServer(world_backend(), latency=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        seq = run(df.head(args.sequential_prompts // 2), server.base_url, 1, JudgeCache(None))
        base_rate = seq.calls / seq.seconds
        rows.append({"in_flight": 1, "prompts": seq.prompts, "calls": seq.calls, "seconds": seq.seconds,
                     "calls_per_s": round(base_rate, 1), "speedup_vs_sequential": 1.0})
        caches = {}
        for k in args.in_flight:
            caches[k] = JudgeCache(Path(tmp) / f"cache-{k}.sqlite")
            st = run(df, server.base_url, k, caches[k])
            rows.append({"in_flight": k, "prompts": st.prompts, "calls": st.calls, "seconds": st.seconds,
                         "calls_per_s": round(st.calls / st.seconds, 1),
                         "speedup_vs_sequential": round(st.calls / st.seconds / base_rate, 1)})
            print(rows[-1], flush=True)
        k = 64 if 64 in caches else args.in_flight[-1]
        calls_before = server.backend.calls
        again = run(df, server.base_url, k, caches[k])
        rows.append({"in_flight": f"{k} (rerun, cached)", "prompts": again.prompts, "calls": again.calls,
                     "seconds": again.seconds, "calls_per_s": None, "speedup_vs_sequential": None})
        assert again.calls == 0 and server.backend.calls == calls_before, "a rerun must make no calls"
    table = pd.DataFrame(rows)
    header = (f"# Judge throughput benchmark\n\nLocal judge server (persona-world exact judge) with {args.latency} s "
              f"injected latency per request, openai AsyncOpenAI client, metrics aligned + coherent; sequential on "
              f"{seq.prompts} prompts, concurrent runs on {table.prompts.iloc[1]} prompts, each with a fresh "
              "cache.\n\n")
    write_table(args.out, "judge", header, table)
    return table


# ---------------------------------------------------------------------------------------------- the local HF judge


def one_prompt_before(judge: LocalHFJudge, messages: list[dict]) -> list[float]:
    """log P(k), k = 0..100, as emlib computed it before batching: the prompt once, then all 101 number candidates as
    a batch of 101 over a copy of the prompt's cache each (the naive contender; same numbers)."""
    import torch
    from transformers import DynamicCache

    model, candidates = judge.model, judge.candidates
    ids = torch.tensor([judge.render(messages)])
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        first = torch.log_softmax(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float(), -1)
        k, width, n_prompt = len(candidates), max(map(len, candidates)), ids.shape[1]
        cand = torch.full((k, width), judge.tokenizer.pad_token_id or 0)
        lengths = torch.tensor([len(c) for c in candidates])
        for i, c in enumerate(candidates):
            cand[i, :len(c)] = torch.tensor(c)
        cache.batch_repeat_interleave(k)
        mask = torch.cat([torch.ones(k, n_prompt, dtype=torch.long), (torch.arange(width) < lengths[:, None]).long()],
                         1)
        positions = (n_prompt + torch.arange(width)).expand(k, width)
        logp = torch.log_softmax(model(input_ids=cand, attention_mask=mask, position_ids=positions,
                                       past_key_values=cache, use_cache=True).logits.float(), -1)
    steps = torch.cat([first[cand[:, :1]], logp[:, :-1].gather(-1, cand[:, 1:, None]).squeeze(-1)], 1)
    steps = steps.masked_fill(torch.arange(width) >= lengths[:, None], 0.0)
    after = logp[torch.arange(k), lengths - 1]
    stop = torch.log1p(-after[:, judge.continues].exp().sum(-1).clamp(max=1 - 1e-7))
    return (steps.sum(1) + stop).tolist()


def rubric_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` filled aligned / coherent rubrics: first-plot questions with answers from the shipped narrow datasets."""
    from emlib.data import load_chat_jsonl, load_questions
    from emlib.judge import fill_prompt, load_rubrics

    rubrics = load_rubrics()
    questions = [q.text for q in load_questions("first_plot")]
    answers = [row["messages"][-1]["content"] for f in sorted((paths.DATA_DIR / "narrow").glob("*_advice.jsonl"))
               for row in load_chat_jsonl(f, duplicates="ignore")[:50]]
    rng = random.Random(seed)
    return [[{"role": "user", "content": fill_prompt(rubrics[("aligned", "coherent")[i % 2]], rng.choice(questions),
                                                     rng.choice(answers))}] for i in range(n)]


def hf_main(argv: list[str] | None = None) -> pd.DataFrame:
    """The local HF judge, batched against one prompt at a time; returns the table (one row per contender)."""
    import torch

    from emlib.testing import english_tokenizer, tiny_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--before-prompts", type=int, default=4,
                        help="prompts for the (slow) way of before; compared by rate, on the same first prompts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=paths.runs_dir() / "bench")
    args = parser.parse_args(argv)
    model, tokenizer = tiny_model("llama", english_tokenizer("llama"), hidden=args.hidden, layers=args.layers,
                                  mlp=4 * args.hidden, heads=args.heads, kv_heads=args.heads)
    params = sum(p.numel() for p in model.parameters())
    conversations = rubric_conversations(args.prompts)
    lengths = [len(LocalHFJudge(model, tokenizer).render(c)) for c in conversations]
    single, batched = LocalHFJudge(model, tokenizer, batch_size=1), LocalHFJudge(model, tokenizer,
                                                                                batch_size=args.batch_size)
    before = conversations[:args.before_prompts]
    ways = {
        "one prompt at a time (before: 101 candidates over a copied prompt cache)":
            lambda: [one_prompt_before(single, c) for c in before],
        "emlib: number tree, one prompt per pass":
            lambda: [lp for lp, _ in single.number_logprobs_batch(conversations)],
        f"emlib: number tree, {args.batch_size} prompts per pass":
            lambda: [lp for lp, _ in batched.number_logprobs_batch(conversations)],
    }
    seconds = {way: 0.0 for way in ways}
    results = {}
    for _ in range(args.rounds):  # interleaved: load from other jobs hits every contender alike
        for way, score in ways.items():
            start = time.perf_counter()
            results[way] = score()
            seconds[way] += time.perf_counter() - start
    reference = torch.tensor(next(iter(results.values())))
    for way, logps in results.items():
        diff = float((torch.tensor(logps[:len(before)]) - reference).abs().max())
        assert diff < 1e-3, f"{way} disagrees with one prompt at a time by {diff:.2e}"
    counts = {way: args.rounds * len(result) for way, result in results.items()}
    base = counts[next(iter(ways))] / seconds[next(iter(ways))]
    rows = [{"way": way, "prompts": counts[way], "seconds": round(secs, 2),
             "prompts_per_s": round(counts[way] / secs, 3),
             "speedup_vs_one_at_a_time": round(counts[way] / secs / base, 2)}
            for way, secs in seconds.items()]
    table = pd.DataFrame(rows)
    header = (f"# Local HF judge benchmark\n\nRandom Llama, {params / 1e6:.0f}M parameters (hidden {args.hidden}, "
              f"{args.layers} layers, vocab {len(tokenizer)}), {args.prompts} filled rubric prompts of "
              f"{min(lengths)}-{max(lengths)} tokens (the way of before on the first {len(before)}), "
              f"{args.rounds} round(s) interleaved, {torch.get_num_threads()} "
              "torch thread(s); every way gives the same log-probabilities (max difference < 1e-3).\n\n")
    write_table(args.out, "hf_judge", header, table)
    return table


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "hf":
        hf_main(sys.argv[2:])
    else:
        main()
