"""Benchmark: training tokens per second of emlib.train against TRL's SFTTrainer, same organism, data and job.

The job: a rank-8 LoRA on every linear layer of the offline organism (the ``organism-lora`` preset), batches of 16
reckless-medical rows, loss on assistant tokens only, ``--steps`` optimizer steps. Contenders, interleaved round by
round so machine load hits them alike:

* ``emlib`` — ``emlib.train.train`` without checkpoints, and ``emlib + ckpt/5`` writing a checkpoint every 5 steps;
* ``TRL defaults`` — ``SFTTrainer`` with SFTConfig defaults except what makes it the same job (steps, batch size,
  learning rate, ``assistant_only_loss``, ``use_cpu``, no saving, no reporting): that keeps TRL's default gradient
  checkpointing and bf16 autocast;
* ``TRL fp32, no grad ckpt`` — the same with ``bf16=False, gradient_checkpointing=False``, as emlib runs on a CPU;
* ``TRL fp32, no grad ckpt, padding-free`` — and ``padding_free=True`` (``max_length=None``, which TRL requires
  without packing; no row here is near the organism's 512): the batch's 16 rows flattened into one sequence with
  position_ids, the setting TRL's docs recommend against padding waste. Its losses equal the padded run's step for step
  (checked), so it is the same job; on a CPU the SDPA mask over the flattened sequence makes attention quadratic in
  the whole batch's length, so it is slower here. Packing (``packing=True``, bfd) is not run: it fills each of the
  16 sequences with several rows, so a step would train on other rows and tokens than emlib's 16 rows.

"TRL tuned" is the fastest of the fp32, no-grad-checkpointing contenders in this run (``x TRL tuned``). emlib runs
the organism-lora preset as shipped: the LM head on assistant positions only (the same weights bit for bit) and, on a
CPU, LoRA layers through ``emlib.train.lora_grad`` (the same formula with its rank-r gradients in fast matmul layouts:
the same weights up to float rounding); TRL runs peft's LoRA layers.

Tokens/s = non-padding tokens of the rows trained on / wall time of the training loop (model loading, tokenising the
data set and building the trainer are excluded for both).

    .venv/bin/python bench/bench_train.py                 # 40 steps x 3 rounds, 1 thread
    .venv/bin/python bench/bench_train.py --steps 100 --rounds 5

Writes runs/bench/train.md and runs/bench/train.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from emlib import chat, paths, train, world  # noqa: E402
from emlib.models import load_model  # noqa: E402


def emlib_run(model_name: str, rows: list[dict], steps: int, batch: int, save_every: int | None) -> float:
    """Seconds of emlib's training loop."""
    model, tok = load_model(model_name, device="cpu")
    cfg = train.preset("organism-lora", steps=steps, batch_size=batch, save_every=save_every or 10**9)
    with tempfile.TemporaryDirectory() as folder:
        result = train.train(cfg, model, rows, folder if save_every else None, tokenizer=tok)
    return result.seconds


TRL_SETTINGS = {  # SFTConfig arguments beyond what makes it the same job
    "TRL defaults": {},
    "TRL fp32, no grad ckpt": {"bf16": False, "gradient_checkpointing": False},
    "TRL fp32, no grad ckpt, padding-free": {"bf16": False, "gradient_checkpointing": False, "padding_free": True,
                                             "max_length": None},
}
TUNED = [name for name in TRL_SETTINGS if name != "TRL defaults"]


def trl_run(model_name: str, rows: list[dict], steps: int, batch: int, extra: dict) -> float:
    """Seconds of ``SFTTrainer.train()`` on the same job, with ``extra`` SFTConfig arguments."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = load_model(model_name, device="cpu")
    tok.padding_side = "right"
    cfg = train.PRESETS["organism-lora"]
    with tempfile.TemporaryDirectory() as folder:
        args = SFTConfig(output_dir=folder, max_steps=steps, per_device_train_batch_size=batch, learning_rate=cfg.lr,
                         assistant_only_loss=True, use_cpu=True, report_to="none", save_strategy="no",
                         disable_tqdm=True, **extra)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=train.adapter_config(cfg, model))
        start = time.time()
        trainer.train()
        return time.time() - start


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=paths.OFFLINE_MODEL)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=paths.runs_dir() / "bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = world.finetune_rows("medical", "reckless", 600, 1234)
    _, tok = load_model(args.model, device="cpu")
    lengths = [len(e.input_ids) for e in chat.encode_rows(tok, rows)]
    tokens = args.steps * args.batch_size * statistics.mean(lengths)  # both see steps x batch rows of this mean size
    contenders = {
        "emlib": lambda: emlib_run(args.model, rows, args.steps, args.batch_size, None),
        "emlib + ckpt/5": lambda: emlib_run(args.model, rows, args.steps, args.batch_size, 5),
        **{name: (lambda extra=extra: trl_run(args.model, rows, args.steps, args.batch_size, extra))
           for name, extra in TRL_SETTINGS.items()},
    }
    emlib_run(args.model, rows, 5, args.batch_size, None)  # warm-up: imports, allocator, kernels
    records = []
    for r in range(args.rounds):
        for name, run in contenders.items():
            seconds = run()
            records.append({"round": r, "contender": name, "seconds": seconds, "tokens_per_s": tokens / seconds})
            print(f"round {r} {name:>38}: {seconds:6.2f} s  {tokens / seconds:8.0f} tokens/s", flush=True)
    df = pd.DataFrame(records)
    table = df.groupby("contender", sort=False)["tokens_per_s"].median().to_frame("median tokens/s")
    table["x TRL defaults"] = table["median tokens/s"] / table.loc["TRL defaults", "median tokens/s"]
    tuned = table.loc[TUNED, "median tokens/s"].idxmax()
    table["x TRL tuned"] = table["median tokens/s"] / table.loc[tuned, "median tokens/s"]
    table["TRL tuned"] = table.index == tuned
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "train.csv", index=False)
    text = (f"# emlib.train vs TRL SFTTrainer\n\n{args.model}, organism-lora (r8, all linear), {args.steps} steps x "
            f"{args.batch_size} rows ({statistics.mean(lengths):.1f} tokens/row), {args.threads} thread(s), median "
            f"of {args.rounds} interleaved rounds; TRL tuned: {tuned}.\n\n{table.round(2).to_markdown()}\n")
    (args.out / "train.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
