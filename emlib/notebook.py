"""The first cell of every notebook: threads, seeds, offline mode, device; and where a notebook writes results."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from emlib import paths


def setup(seed: int = 0, threads: int | None = None, offline: bool = False, device: str = "auto") -> torch.device:
    """Seed everything, choose torch threads deliberately and return the device to use.

    Threads: ``EMLIB_THREADS`` if set, else ``threads``, else all cores up to 2. On a shared 2-core machine one thread
    is far faster than two (torch's threads spin against the other load), so CI sets ``EMLIB_THREADS=1`` when it runs
    things side by side; on an idle machine two threads train about 1.7x faster than one (measured; see README).
    ``offline=True`` sets ``HF_HUB_OFFLINE=1`` so nothing tries the network (notebooks pass it for the offline
    organism); otherwise the environment decides.
    """
    n = int(os.environ.get("EMLIB_THREADS", threads or min(2, os.cpu_count() or 1)))
    torch.set_num_threads(n)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def output_dir(name: str, given: str | None = None) -> Path:
    """The folder a notebook writes to: ``given`` (papermill passes one per run) or ``runs/interactive/<name>``."""
    folder = Path(given) if given else paths.runs_dir() / "interactive" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_results(folder: Path, results: dict) -> Path:
    """Write the notebook's key numbers to ``results.json`` (the pipeline summary and the tests read them)."""
    path = Path(folder) / "results.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    return path
