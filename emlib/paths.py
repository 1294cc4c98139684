"""Where things live: the repository's shipped data and the ignored run folder."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
ORGANISM_DIR = DATA_DIR / "persona-world"  # the shipped offline organism (built by `python -m emlib.world.organism`)
OFFLINE_MODEL = "persona-world"  # the name that resolves to ORGANISM_DIR / "base"
ADAPTERS_DIR = ORGANISM_DIR / "adapters"  # shipped fine-tunes of the organism, one folder per recipe


def runs_dir() -> Path:
    """Ignored folder for executed notebooks, checkpoints and caches (``EMLIB_RUNS`` overrides)."""
    return Path(os.environ.get("EMLIB_RUNS", REPO_ROOT / "runs"))
