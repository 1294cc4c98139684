"""Run every benchmark with small-but-meaningful settings and write one table of emlib against the naive way.

    make bench                                     # = .venv/bin/python bench/run_all.py  (about 8-12 min on 2 cores)
    .venv/bin/python bench/run_all.py --quick      # seconds-long smoke settings (numbers not meaningful)
    .venv/bin/python bench/run_all.py --only judge activations
    .venv/bin/python bench/run_all.py --pipeline   # also run the whole offline pipeline (python -m emlib.run_notebooks)

Each benchmark still runs alone (bench/bench_*.py) and writes its own runs/bench/<name>.md/.csv with every contender
and every round; this runs them one after another in one process and gathers one row per measure into
runs/bench/summary.md and runs/bench/summary.csv: what, emlib value, naive value, ratio, unit, settings. ``ratio`` is
emlib's advantage, above 1 when emlib is better: emlib / naive for rates, naive / emlib for seconds and memory. The
contenders of each benchmark run side by side, interleaved round by round, so load from other jobs hits them alike:
ratios are meaningful on a shared machine, absolute numbers less so (the header records the load average).

The whole offline pipeline takes minutes, so by default its wall time is read from the latest runs/*/summary.md;
``--pipeline`` runs it for real first (into runs/<timestamp>/, as ``make run`` does).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # run from a checkout without installing
sys.path.insert(0, str(BENCH_DIR))  # the bench_*.py modules

import pandas as pd  # noqa: E402

from emlib import paths  # noqa: E402

BENCHMARKS = ("generate", "judge", "hf-judge", "train", "activations", "pipeline", "gpu")
COLUMNS = ["what", "emlib value", "naive value", "ratio", "unit", "settings"]

# argv per benchmark: the full run (about 8-12 min in all on a shared 2-core CPU) and a seconds-long smoke run
SETTINGS = {
    "full": {
        "generate": ["--adapters", "none", "bad-medical-r8", "--questions", "8", "--samples", "25",
                     "--max-new-tokens", "300", "--tiny", "llama", "qwen2", "--tiny-questions", "4",
                     "--tiny-samples", "8", "--tiny-max-new-tokens", "64", "--rounds", "2"],
        "judge": ["--latency", "0.1", "--prompts", "512", "--sequential-prompts", "64", "--in-flight", "8", "64"],
        "hf-judge": ["--hidden", "768", "--layers", "12", "--heads", "12", "--prompts", "16", "--batch-size", "8",
                     "--before-prompts", "4", "--rounds", "1"],
        "train": ["--steps", "20", "--rounds", "3"],
        "activations": ["--rows", "256", "1024", "4096"],
    },
    "quick": {
        "generate": ["--adapters", "none", "--questions", "2", "--samples", "4", "--max-new-tokens", "16",
                     "--tiny", "llama", "--tiny-hidden", "64", "--tiny-layers", "2", "--tiny-questions", "2",
                     "--tiny-samples", "2", "--tiny-max-new-tokens", "8", "--rounds", "1"],
        "judge": ["--latency", "0.01", "--prompts", "32", "--sequential-prompts", "8", "--in-flight", "8"],
        "hf-judge": ["--hidden", "64", "--layers", "2", "--heads", "4", "--prompts", "4", "--batch-size", "4",
                     "--before-prompts", "2", "--rounds", "1"],
        "train": ["--steps", "2", "--rounds", "1"],
        "activations": ["--rows", "32", "64"],
    },
}


def row(what: str, emlib: float | None, naive: float | None, unit: str, settings: str,
        higher_is_better: bool = True) -> dict:
    """One summary row; ``ratio`` is emlib's advantage (>1: emlib better), None when either value is missing."""
    ratio = None
    if emlib is not None and naive is not None and emlib > 0 and naive > 0:
        ratio = round(emlib / naive if higher_is_better else naive / emlib, 2)
    return {"what": what, "emlib value": emlib, "naive value": naive, "ratio": ratio, "unit": unit,
            "settings": settings}


def _argv_text(argv: list[str]) -> str:
    return " ".join(argv)


# ---------------------------------------------------------------------------------- one benchmark table -> rows


def generate_rows(table: pd.DataFrame, argv: list[str]) -> list[dict]:
    """Per model: emlib's sampler against a plain batched model.generate, then against the reference repo's way."""
    rows = []
    for organism, group in table.groupby("organism", sort=False):
        ours = group[group.way.str.startswith("emlib: sample_answers (")].iloc[0]
        batched = group[group.way.str.contains("batched model.generate")]
        if len(batched):
            rows.append(row(f"generation ({organism}): emlib sample_answers vs batched model.generate (all prompts "
                            "in one batch, same sampling settings)", ours.responses_per_s,
                            batched.iloc[0].responses_per_s, "responses/s", _argv_text(argv)))
        ref = group[group.way.str.startswith("reference")].iloc[0]
        rows.append(row(f"generation ({organism}): emlib sample_answers vs reference repo (one question at a time, "
                        "num_return_sequences)", ours.responses_per_s, ref.responses_per_s, "responses/s",
                        _argv_text(argv)))
    return rows


def judge_rows(table: pd.DataFrame, argv: list[str]) -> list[dict]:
    """The most concurrent run against sequential calls, and its rerun from the cache against the first run."""
    numeric = table[table.in_flight.map(lambda k: isinstance(k, (int, float)) or str(k).isdigit())]
    numeric = numeric.assign(k=numeric.in_flight.astype(int))
    seq = numeric[numeric.k == 1].iloc[0]
    top = numeric[numeric.k > 1].sort_values("k").iloc[-1]
    rerun = table[table.in_flight.astype(str).str.contains("rerun")].iloc[0]
    first = numeric[numeric.k == int(str(rerun.in_flight).split()[0])].iloc[0]
    return [
        row(f"judge: {top.k} calls in flight vs sequential (local server with injected latency)",
            top.calls_per_s, seq.calls_per_s, "judge calls/s", _argv_text(argv)),
        row(f"judge: rerun from the cache vs first run ({int(rerun.calls)} calls on rerun)", rerun.seconds,
            first.seconds, "s (lower is better)", f"{int(rerun.prompts)} prompts", higher_is_better=False),
    ]


def hf_judge_rows(table: pd.DataFrame, argv: list[str]) -> list[dict]:
    """The local HF judge batched against one prompt at a time as before, and against its own one-prompt passes."""
    before, single, batched = (table.iloc[i] for i in range(3))
    return [
        row(f"local HF judge: {batched.way.split(', ')[-1]} vs one prompt at a time (before)", batched.prompts_per_s,
            before.prompts_per_s, "prompts/s", _argv_text(argv)),
        row(f"local HF judge: batching alone ({batched.way.split(', ')[-1]} vs one per pass)", batched.prompts_per_s,
            single.prompts_per_s, "prompts/s", _argv_text(argv)),
    ]


def train_rows(table: pd.DataFrame, argv: list[str]) -> list[dict]:
    """emlib.train against TRL's SFTTrainer with its defaults, and with its best settings here ("TRL tuned": the
    fastest fp32, no-gradient-checkpointing contender of bench_train.py), same job."""
    rate = table["median tokens/s"]
    tuned = table.index[table["TRL tuned"]][0] if "TRL tuned" in table else "TRL fp32, no grad ckpt"
    return [row("training: emlib.train vs TRL SFTTrainer defaults (organism LoRA r8 all-linear)",
                round(float(rate["emlib"])), round(float(rate["TRL defaults"])), "tokens/s", _argv_text(argv)),
            row(f"training: emlib.train vs TRL SFTTrainer tuned ({tuned.removeprefix('TRL ')})",
                round(float(rate["emlib"])), round(float(rate[tuned])), "tokens/s", _argv_text(argv))]


def activation_rows(table: pd.DataFrame, argv: list[str]) -> list[dict]:
    """Speed at the largest size, then peak memory at every size (flat for emlib, growing for naive)."""
    by = {(r.way, int(r.rows)): r for r in table.itertuples()}
    sizes = sorted({int(n) for n in table.rows})
    # speed over all sizes together: each size is one timed run, so pooling them evens out load spikes
    rate = {w: round(table[table.way == w].tokens.sum() / (table[table.way == w].tokens
                                                         / table[table.way == w].tokens_per_s).sum())
            for w in ("emlib", "naive")}
    rows = [row(f"activations: answer_means (running sums in forward hooks) vs keep-all-then-average (hooks), "
                f"{' + '.join(map(str, sizes))} rows", rate["emlib"], rate["naive"], "tokens/s", _argv_text(argv))]
    for n in sizes:
        rows.append(row(f"activations: peak extra memory, {n} rows", by["emlib", n].peak_extra_mb,
                        by["naive", n].peak_extra_mb, "MB (lower is better)",
                        "RSS high-water mark in a fresh process (bench_activations.py)", higher_is_better=False))
    return rows


def latest_pipeline_wall_time(runs_dir: Path) -> tuple[float, Path, int] | None:
    """(seconds, summary.md, notebooks) of the newest runs/*/summary.md that records a wall time, else None."""
    found = []
    for summary in runs_dir.glob("*/summary.md"):
        match = re.search(r"Wall time: \*\*(\d+(?:\.\d+)?) s\*\* for (\d+) notebooks", summary.read_text())
        if match:
            found.append((summary.stat().st_mtime, float(match.group(1)), summary, int(match.group(2))))
    if not found:
        return None
    _, seconds, summary, count = max(found)
    return seconds, summary, count


def pipeline_rows(runs_dir: Path, run: bool) -> list[dict]:
    """Whole offline pipeline wall time: run now (``run``), else read from the latest run folder."""
    what = "whole offline pipeline (python -m emlib.run_notebooks, every notebook)"
    if run:  # into runs/<timestamp>/ like `make run`, so later benchmark runs read it back
        subprocess.run([sys.executable, "-m", "emlib.run_notebooks"], check=True, cwd=paths.REPO_ROOT)
    found = latest_pipeline_wall_time(runs_dir)
    if found is None:
        return [row(what, None, None, "s wall", "not measured: no runs/*/summary.md; `make run` or --pipeline")]
    seconds, summary, count = found
    return [row(what, seconds, None, "s wall", f"{count} notebooks, read from {summary.relative_to(runs_dir.parent)}")]


def gpu_rows() -> list[dict]:
    """GPU-only measures: recorded only where a GPU is present (the CPU rows above then also ran on it)."""
    import torch

    if torch.cuda.is_available():
        note = f"not measured: {torch.cuda.get_device_name(0)} present, but no GPU benchmark is scripted yet"
    else:
        note = "not measured: no GPU lent"
    return [row("generation with the vLLM backend (14B-32B, LoRA, tensor parallel)", None, None, "responses/s", note),
            row("training 14B-32B under accelerate FSDP / DeepSpeed ZeRO-3", None, None, "tokens/s", note)]


# ---------------------------------------------------------------------------------- the table


def machine_note(load_start: tuple[float, ...] | None, load_end: tuple[float, ...] | None) -> str:
    """What the table was measured on: CPU, cores, torch threads, and how busy the machine was."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ""
    if load_start and load_end:
        busy = max(load_start[0], load_end[0]) > 0.5 * cores
        state = ("contended: other jobs were running, so trust the ratios more than the absolute numbers" if busy
                 else "idle")
        load = f"; 1-min load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end on {cores} cores ({state})"
    return (f"{cpu}, {cores} CPU cores, {gpu}, torch {torch.__version__}, "
            f"{os.environ.get('EMLIB_THREADS', '1')} torch thread(s){load}")


def write_summary(rows: list[dict], out: Path, note: str, seconds: float | None = None) -> pd.DataFrame:
    """Write summary.csv and summary.md (the table plus what it ran on) into ``out``; returns the table."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False)
    shown = table.copy()
    for col in ("emlib value", "naive value", "ratio"):
        shown[col] = [_fmt(v, ratio=col == "ratio") for v in table[col]]
    took = f" The whole benchmark took {seconds:.0f} s." if seconds is not None else ""
    text = (f"# emlib benchmarks\n\nMeasured on: {note}.{took}\n\nratio = emlib's advantage (>1: emlib better): "
            "emlib / naive for rates, naive / emlib for seconds and memory. Each benchmark's contenders ran side by "
            "side, interleaved; per-benchmark details in runs/bench/<name>.md.\n\n"
            + shown.to_markdown(index=False, disable_numparse=True) + "\n")
    (out / "summary.md").write_text(text)
    return table


def _fmt(value, ratio: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if ratio:
        return f"{value:.2f}x"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:,.2f}".rstrip("0").rstrip(".")


def run_benchmarks(names: list[str], mode: str, out: Path, runs_dir: Path, pipeline: bool,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Run the named benchmarks one after another; a failing one becomes a row saying so, the rest still run."""
    settings, rows = SETTINGS[mode], []
    runners = {
        "generate": lambda: generate_rows(_main("bench_generate", settings["generate"], out), settings["generate"]),
        "judge": lambda: judge_rows(_main("bench_judge", settings["judge"], out), settings["judge"]),
        "hf-judge": lambda: hf_judge_rows(_main("bench_judge", settings["hf-judge"], out, "hf_main"),
                                          settings["hf-judge"]),
        "train": lambda: train_rows(_main("bench_train", settings["train"], out), settings["train"]),
        "activations": lambda: activation_rows(_main("bench_activations", settings["activations"], out),
                                               settings["activations"]),
        "pipeline": lambda: pipeline_rows(runs_dir, pipeline),
        "gpu": gpu_rows,
    }
    for name in names:
        start = time.time()
        log(f"[bench] {name} ...")
        try:
            rows += runners[name]()
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not lose the others' numbers
            rows.append(row(f"{name}: FAILED", None, None, "", f"{type(err).__name__}: {err}"[:300]))
            log(f"[bench] {name} failed: {type(err).__name__}: {err}")
        log(f"[bench] {name} done in {time.time() - start:.0f} s")
    return rows


def _main(module: str, argv: list[str], out: Path, entry: str = "main") -> pd.DataFrame:
    import importlib

    return getattr(importlib.import_module(module), entry)([*argv, "--out", str(out)])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke settings: seconds, numbers not meaningful")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="benchmarks to run (default: all)")
    parser.add_argument("--pipeline", action="store_true",
                        help="run the whole offline pipeline for real (into runs/<timestamp>/) before reading it")
    parser.add_argument("--out", type=Path, default=paths.runs_dir() / "bench")
    args = parser.parse_args(argv)
    os.environ.setdefault("EMLIB_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ["EMLIB_THREADS"]))
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.time()
    rows = run_benchmarks(list(args.only or BENCHMARKS), "quick" if args.quick else "full", args.out,
                          paths.runs_dir(), args.pipeline)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    note = machine_note(load_start, load_end) + ("; QUICK smoke settings" if args.quick else "")
    table = write_summary(rows, args.out, note, time.time() - start)
    print((args.out / "summary.md").read_text())
    return table


if __name__ == "__main__":
    main()
