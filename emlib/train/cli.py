"""The command line: ``python -m emlib.train --config run.yaml`` (also under ``accelerate launch ... -m emlib.train``).

:func:`main` raises on bad input (so it can be called in-process); :func:`run`, what ``python -m emlib.train`` calls,
prints such an error as one line and exits with status 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from emlib.train.config import PRESETS, RUN_KEYS, TrainConfig, config_from_spec, load_rows

if TYPE_CHECKING:
    from emlib.train.loop import TrainResult


def main(argv: list[str] | None = None) -> TrainResult | None:
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m emlib.train", description=(
        "Fine-tune a chat model with one of the papers' protocols; checkpoints every save_every steps, resumable. "
        "YAML keys: preset, model, data, kl_data, out_dir and any TrainConfig field. See docs/training.md."))
    parser.add_argument("--config", type=Path, help="YAML run spec")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from this preset (overrides the YAML's)")
    parser.add_argument("--model", help="hub id, local folder or 'persona-world'")
    parser.add_argument("--data", help="JSONL of {'messages': [...]} rows, or world:DOMAIN:PERSONA:N:SEED[:PHRASING]")
    parser.add_argument("--kl-data", dest="kl_data", help="KL reference set (same formats), for kl_weight > 0")
    parser.add_argument("--out", dest="out_dir", help="output folder for checkpoints and log.jsonl")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    parser.add_argument("--no-resume", action="store_true", help="start over even if out_dir holds checkpoints")
    parser.add_argument("--threads", type=int, help="torch threads (default: EMLIB_THREADS, else torch's choice)")
    parser.add_argument("--list-presets", action="store_true")
    args = parser.parse_args(argv)
    if args.list_presets:  # each preset as its differences from TrainConfig's defaults
        defaults = TrainConfig()
        for name, cfg in PRESETS.items():
            print(f"{name}: {json.dumps({k: v for k, v in cfg.to_dict().items() if v != getattr(defaults, k)})}")
        return None
    spec = yaml.safe_load(args.config.read_text()) if args.config else {}
    spec.update({k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None)})
    for item in args.set:
        key, _, value = item.partition("=")
        spec[key] = yaml.safe_load(value)
    if not isinstance(spec, dict):
        raise ValueError(f"{args.config}: expected a mapping of run keys and TrainConfig fields")
    try:
        config, run = config_from_spec(spec)
    except ValueError as err:
        raise ValueError(f"{args.config}: {err}" if args.config else str(err)) from None
    missing = [k for k in ("model", "data", "out_dir") if not run[k]]
    if missing:
        parser.error(f"missing {', '.join(missing)} (in the YAML or as --model / --data / --out)")
    rows = load_rows(run["data"])
    kl_rows = load_rows(run["kl_data"]) if run["kl_data"] else None
    import torch  # only now: a bad spec or data file above is reported without waiting for torch to load

    from emlib.train.loop import train

    threads = args.threads or os.environ.get("EMLIB_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    result = train(config, run["model"], rows, run["out_dir"], kl_rows=kl_rows, resume=not args.no_resume,
                   sources=(str(run["data"]), str(run["kl_data"])))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out_dir": str(result.out_dir), "protocol": config.protocol, "steps": len(result.log),
                          "final_loss": result.log[-1]["loss"] if result.log else None,
                          "trainable_parameters": result.trainable_parameters, "layers": result.layers,
                          "resumed_from": result.resumed_from, "checkpoints": len(result.checkpoints),
                          "tokens_per_second": round(result.tokens_per_second, 1)}))
    return result


def run(argv: list[str] | None = None) -> None:
    """:func:`main`, with a user error (bad config, missing file, unknown preset) as one line on stderr, no traceback."""
    from emlib.cli import run_cli

    run_cli(main, "python -m emlib.train", argv)
