"""Test-wide settings: offline, quiet, deliberate threads; executed notebooks kept under runs/tests/."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from emlib import paths, run_notebooks  # noqa: E402

torch.set_num_threads(int(os.environ.get("EMLIB_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def notebook_run_dir():
    """Executed notebook copies go here (ignored by git) so a failure can be inspected after the run."""
    folder = paths.runs_dir() / "tests"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def executed(notebook_run_dir):
    """Run each notebook at most once per session; remember failures so dependent tests report them too."""
    cache: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in cache:
            src = run_notebooks.NOTEBOOK_DIR / f"{name}.ipynb"
            try:
                cache[name] = run_notebooks.run_notebook(src, notebook_run_dir)
            except Exception as err:  # papermill's error names the failing cell and its exception
                cache[name] = {"error": f"{name}.ipynb failed: {err}"}
        if "error" in cache[name]:
            pytest.fail(cache[name]["error"], pytrace=False)
        return cache[name]["results"]

    return run
