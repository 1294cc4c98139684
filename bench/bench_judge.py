"""Benchmark: judge throughput with many calls in flight against sequential calls, and the cost of a rerun.

A local judge server (the persona world's exact judge behind ``/v1/chat/completions``) is given an injected latency
per request, standing in for a remote API; the real ``openai`` client path is what runs. The same prompts are judged
sequentially (1 in flight) and with 8 / 32 / 64 / 128 in flight, each with a fresh cache, side by side in one run;
then the 64-in-flight run is repeated on its own cache, which must make zero calls.

    .venv/bin/python bench/bench_judge.py --latency 0.1 --prompts 512

Writes runs/bench/judge.md and runs/bench/judge.csv.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))  # and bench/ itself, for its helpers
import pandas as pd  # noqa: E402
from bench_tables import write_table  # noqa: E402

from emlib import paths, world  # noqa: E402
from emlib.judge import JudgeCache, JudgeStats, OpenAIJudge, judge_frame  # noqa: E402
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


if __name__ == "__main__":
    main()
