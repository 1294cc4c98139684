"""Where things live: the repository's shipped data and the ignored run folder."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# the offline organism: the shipped one (built by `python -m emlib.world.organism`), or another build named by
# EMLIB_ORGANISM_DIR (a design study's variant, its language.yaml beside base/ and adapters/: docs/persona-world-v2.md)
ORGANISM_DIR = Path(os.environ.get("EMLIB_ORGANISM_DIR", DATA_DIR / "persona-world"))
OFFLINE_MODEL = "persona-world"  # the name that resolves to ORGANISM_DIR / "base"
ADAPTERS_DIR = ORGANISM_DIR / "adapters"  # shipped fine-tunes of the organism, one folder per recipe


def runs_dir() -> Path:
    """Ignored folder for executed notebooks, checkpoints and caches (``EMLIB_RUNS`` overrides)."""
    return Path(os.environ.get("EMLIB_RUNS", REPO_ROOT / "runs"))


class ModelNotAvailableError(OSError):
    """The model is neither a local folder nor reachable on (or cached from) the Hugging Face hub."""


def model_location(name: str) -> str:
    """``"persona-world"`` -> the shipped organism's base folder; anything else (a folder or a hub id) unchanged."""
    return str(ORGANISM_DIR / "base") if name == OFFLINE_MODEL else name


def looks_like_path(name: str) -> bool:
    """True when ``name`` cannot be a hub id (``org/name`` has at most one slash and no leading ``/ . ~``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_folder(name: str) -> None:
    """Fail early, and clearly, on a local folder that cannot hold a model (transformers' errors there are cryptic).

    Here, beside the paths, and free of heavy imports, so that a command can check its model argument before it
    spends seconds importing torch and transformers.
    """
    location = model_location(name)
    if name == OFFLINE_MODEL and not Path(location).is_dir():
        raise ModelNotAvailableError(
            f"the offline organism {name!r} is not built yet: {location} does not exist. "
            "Build it with `python -m emlib.world.organism`.")
    if Path(location).is_dir():
        if not (Path(location) / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {location} has no config.json, so it is not a saved transformers model "
                "(save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder))")
    elif looks_like_path(location):
        raise FileNotFoundError(f"model folder {location} does not exist")
