"""Benchmark: activation collection (mean residual stream over answer tokens, every layer) - speed and peak memory.

emlib's :func:`emlib.analysis.directions.answer_means` keeps running sums, so its memory should stay flat as rows grow. The
naive way keeps every answer token's hidden states of every row and averages at the end, so its memory grows with
the rows. Both read the decoder layers' outputs with plain forward hooks (each its fastest way: an nnsight trace per
batch made emlib 0.90x the naive way before) on the same batches, with the default token pooling, and must give the
same means.

Each (way, rows) is measured in two fresh subprocesses. Speed: tokens/s of the non-padding tokens run through the
model. Memory: the resident-set high-water mark (Linux VmHWM) reset just before collection (``/proc/self/clear_refs``)
minus the resident set then, so it counts torch's CPU tensors (which tracemalloc does not see) and excludes model
loading. The memory pass runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then returns every freed tensor to the OS
at once, so the resident set follows live memory (with its default adaptive threshold, freed batches linger in the
heap and one run's peak varied 10-80 MB between identical runs, measured); that setting halves speed, hence the
separate speed pass with default malloc. In a fresh process glibc can return each batch's freed activations to the
OS and fault them in again (emlib frees every batch; the naive way's heap only grows): measured, 15-25% of emlib's
time at 1,024 rows, and with glibc told to keep freed memory (mallopt) emlib was 1.24-1.35x the naive way. That
setting was not adopted: it made LoRA training 10-35% slower (tried and measured), so both ways run with the
defaults here, as users do.

    .venv/bin/python bench/bench_activations.py                      # 256, 1024, 4096 rows
    .venv/bin/python bench/bench_activations.py --rows 256 1024 --batch-size 32

Writes runs/bench/activations.md and runs/bench/activations.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))  # and bench/ itself, for its helpers
import pandas as pd  # noqa: E402
from bench_tables import write_table  # noqa: E402

from emlib import paths  # noqa: E402

WAYS = ("emlib", "naive")


def _status_kb(field: str) -> int | None:
    """A memory field of /proc/self/status in kB (Linux only; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def naive_means(model, tokenizer, rows, batch_size: int = 32, system=None, pooling: str = "token"):
    """Keep every row's answer-token hidden states [n_layers, tokens, d_model], average at the end (grows with rows).

    Its own best way to read the layers: plain forward hooks that copy each layer's answer tokens out as the layer
    runs (an nnsight trace per batch costs more than the model here; ``output_hidden_states`` gives the last layer
    after the final norm, not the layer's output), and ``logits_to_keep=1`` so the vocabulary projection is not run
    for every position. ``pooling`` as :func:`emlib.analysis.directions.answer_means`: ``"token"`` averages all kept
    tokens, ``"answer"`` each row's first.
    """
    import torch

    from emlib.analysis.directions import answer_batches
    from emlib.interventions import layer_hidden
    from emlib.models import decoder_layers

    kept, current, mask = [], [], None  # kept: per row [n_layers, tokens, d_model]; current: this batch's layers

    def keep(module, args, output):
        hidden = layer_hidden(output)
        current.append([hidden[i][mask[i]].clone() for i in range(mask.shape[0])])

    handles = [block.register_forward_hook(keep) for block in decoder_layers(model)]
    try:
        for batch in answer_batches(tokenizer, rows, batch_size, system):
            mask, current = batch["answer_mask"], []
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                      use_cache=False)
            kept += [torch.stack([layer[i] for layer in current]) for i in range(mask.shape[0])]
    finally:
        for handle in handles:
            handle.remove()
    if pooling == "answer":
        return torch.stack([row.double().mean(1) for row in kept]).mean(0).float()
    return torch.cat(kept, dim=1).double().mean(1).float()


def worker(way: str, n_rows: int, batch_size: int, model_name: str) -> dict:
    """One measurement in this (fresh) process: load, warm up, reset the peak, collect, report."""
    import torch

    from emlib import world
    from emlib.analysis.directions import answer_batches, answer_means
    from emlib.models import load_model

    torch.set_num_threads(int(os.environ.get("EMLIB_THREADS", "1")))
    model, tok = load_model(model_name, device="cpu")
    rows = world.finetune_rows("medical", "reckless", n_rows, 7)
    tokens = sum(int(b["attention_mask"].sum()) for b in answer_batches(tok, rows, batch_size))
    fn = answer_means if way == "emlib" else naive_means
    kwargs = {"progress": False} if way == "emlib" else {}
    fn(model, tok, rows[:batch_size], batch_size, **kwargs)  # warm-up: allocator, kernels
    rss_before = _status_kb("VmRSS")
    exact = reset_peak()
    start = time.perf_counter()
    means = fn(model, tok, rows, batch_size, **kwargs)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {"way": way, "rows": n_rows, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds), "peak_extra_mb": round(max(0, peak - rss_before) / 1024, 1)
            if exact and peak and rss_before else None, "checksum": float(means.double().abs().sum())}


MEMORY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the resident set at once (see above)


def measure(way: str, n_rows: int, batch_size: int, model_name: str, memory: bool = False) -> dict:
    """Run :func:`worker` in a fresh interpreter, so one measurement's memory cannot leak into the next."""
    cmd = [sys.executable, __file__, "--worker", way, "--rows", str(n_rows), "--batch-size", str(batch_size),
           "--model", model_name]
    env = {**os.environ, "EMLIB_THREADS": os.environ.get("EMLIB_THREADS", "1"), "OMP_NUM_THREADS": "1",
           **(MEMORY_MALLOC if memory else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"bench_activations worker ({way}, {n_rows} rows) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=paths.OFFLINE_MODEL)
    parser.add_argument("--rows", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=paths.runs_dir() / "bench")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows[0], args.batch_size, args.model)), flush=True)
        return pd.DataFrame()
    records = []
    for i, n in enumerate(args.rows):
        for way in (WAYS if i % 2 == 0 else WAYS[::-1]):  # alternate the order, so drifting load hits both
            speed = measure(way, n, args.batch_size, args.model)
            memory = measure(way, n, args.batch_size, args.model, memory=True)
            records.append({**speed, "peak_extra_mb": memory["peak_extra_mb"]})
            print(records[-1], flush=True)
    table = pd.DataFrame(records)
    for n, group in table.groupby("rows"):
        sums = group["checksum"].tolist()
        if abs(sums[0] - sums[1]) > 1e-4 * max(1.0, abs(sums[0])):
            raise AssertionError(f"emlib and naive means differ at {n} rows: checksums {sums}")
    table = table.sort_values(["rows", "way"]).reset_index(drop=True)
    header = (f"# Activation collection benchmark\n\n{args.model}, mean residual stream after every decoder layer over "
              f"answer tokens, batch size {args.batch_size}, {os.environ.get('EMLIB_THREADS', '1')} torch thread(s); "
              "each (way, rows) in fresh processes; peak_extra_mb = resident-set high-water mark during collection "
              "above the resident set before it (model and rows already loaded), measured in a separate run with "
              "MALLOC_MMAP_THRESHOLD_=65536; tokens_per_s from a run with default malloc.\n\n")
    write_table(args.out, "activations", header, table)
    return table


if __name__ == "__main__":
    main()
