"""Test-wide settings: offline, quiet, deliberate threads; executed notebooks kept under runs/tests/.

`make test` runs the suite on pytest-xdist workers, one per core (`-n auto`): each worker gets its share of
the cores (one each on a 2-core machine: single-threaded processes side by side beat one two-threaded process on these
small models), a test file stays on one worker (its module fixtures are built once), and every test that reads an
executed notebook is grouped with that notebook, so each notebook runs once, on one worker (the real-model file is
split the same way, one unit per notebook it runs). Heaviest groups are
handed out first, so no worker is left with a long one at the end. `pytest` alone (no `-n`) runs the same tests
serially.
"""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # notebook kernels and subprocesses inherit it: one worker's share of the cores
    os.environ.setdefault("EMLIB_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402

from emlib import paths  # noqa: E402  (light: torch and papermill are imported where tests need them)

try:
    import fcntl
except ImportError:  # not POSIX: no cross-worker lock (run without -n there)
    fcntl = None


def pytest_sessionstart(session):
    """Torch threads for the tests of this process; not in the xdist controller, which runs no test (importing torch
    there only delayed the workers' start by seconds)."""
    if getattr(session.config.option, "numprocesses", None) and not hasattr(session.config, "workerinput"):
        return
    import torch

    torch.set_num_threads(int(os.environ.get("EMLIB_THREADS", min(2, os.cpu_count() or 1))))

# Test files that read one notebook's executed copy (test_notebooks.py names its notebook per test).
NOTEBOOK_OF_MODULE = {"test_datasets_notebook": "01_datasets", "test_train_notebook": "02_train",
                      "test_judge_notebook": "03_generate_and_judge", "test_phase_notebook": "04_phase_transitions",
                      "test_directions_notebook": "05_directions", "test_probing_notebook": "06_lora_probing",
                      "test_narrow_notebook": "07_narrow_misalignment"}
# Seconds of the longest work units in one `make test` (two workers, one thread each; warm kernels; stop 22): units
# are handed out longest first, so no worker is left with a long one at the end (simulated on that run: 396 s on each
# worker; the earlier table, from stop 16, left the real-model tests unlisted, last, and one worker 27 s behind).
# Units not listed take under 6 s and go last, in file order.
_REAL = "tests/test_real_model_notebooks.py::"  # its tests that run no notebook are units of their own
UNIT_SECONDS = {"05_directions": 141, "02_train": 59, "test_train_protocols": 58, "06_lora_probing": 44,
                "test_organism": 44, "04_phase_transitions": 36, "test_faults_io": 34, "test_browser": 32,
                "07_narrow_misalignment": 32, "test_accelerate_configs": 25, "test_real_model_notebooks:02_train": 20,
                _REAL + "test_quickstart_on_other_families[qwen2]": 18, "test_notebooks": 18,
                _REAL + "test_quickstart_on_other_families[gemma]": 16, "00_persona_world": 16,
                "test_real_model_notebooks:07_narrow_misalignment": 16, "test_judge": 14, "01_datasets": 13,
                "test_real_model_notebooks:03_generate_and_judge": 13, "00_quickstart": 11, "test_hf_judge": 10,
                "test_server": 10, "test_warm_kernels": 10, "test_judge_faults": 10, "03_generate_and_judge": 9,
                _REAL + "test_world_judge_on_a_real_model_fails_before_any_compute": 9,
                "test_real_model_notebooks:06_lora_probing": 8, "test_llm_datagen": 8, "test_train": 7,
                "test_real_model_notebooks:00_quickstart": 6}
# test_real_model_notebooks runs each notebook once per worker on a tiny real model (session fixtures, cheap to build):
# its tests are split into one unit per notebook, so the file (~3 minutes) spreads over the workers.
REAL_MODEL_FILE = "test_real_model_notebooks"
REAL_NOTEBOOK_OF_TEST = {"test_quickstart_headline_is_the_table": "00_quickstart",
                         "test_generate_and_judge_headline_is_the_table": "03_generate_and_judge",
                         "test_train_resume_demo_resumes_from_a_checkpoint_before_the_last_step": "02_train",
                         "test_directions_skips_what_it_cannot_compute_and_says_why": "05_directions",
                         "test_probing_names_skipped_comparisons": "06_lora_probing"}


# Tests in test_notebooks.py that read one notebook without naming it in their parameters.
NOTEBOOK_OF_TEST = {"test_quickstart_finetune_is_more_misaligned_than_base": "00_quickstart",
                    "test_persona_world_shows_emergent_misalignment": "00_persona_world"}


def _notebook_read(rest: str, by_test: dict[str, str]) -> str | None:
    """The notebook a test reads: its parameter when that names a notebook, else ``by_test`` of its name."""
    name = rest[rest.rfind("[") + 1:-1] if rest.endswith("]") else None
    if name and (paths.NOTEBOOK_DIR / f"{name}.ipynb").exists():
        return name
    return by_test.get(rest.partition("[")[0])


def work_unit(nodeid: str) -> str:
    """The work unit of a test, from its node id alone (the xdist controller sees no more): the notebook it reads,
    else its file, so a file's module fixtures are built once."""
    path, _, rest = nodeid.partition("::")
    module = Path(path).stem
    if module == REAL_MODEL_FILE:
        notebook = _notebook_read(rest, REAL_NOTEBOOK_OF_TEST)
        return f"{module}:{notebook}" if notebook else nodeid
    if module == "test_notebooks":
        return _notebook_read(rest, NOTEBOOK_OF_TEST) or module
    return NOTEBOOK_OF_MODULE.get(module, module)


def pytest_xdist_make_scheduler(config, log):
    """Hand out work units (:func:`work_unit`) whole, in collection order (heaviest first, see below). xdist's own
    ``--dist loadgroup`` would do this from ``xdist_group`` marks, but with pytest 9 it never sees the marks' suffix
    in the node ids it schedules, so units there were split and one worker waited on the other's notebook."""
    from xdist.scheduler import LoadScopeScheduling

    class NotebookScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep our order, not "most tests first"
    return NotebookScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Longest work units first (:data:`UNIT_SECONDS`), so the last ones handed out are short and no worker idles at
    the end."""
    items.sort(key=lambda item: -UNIT_SECONDS.get(work_unit(item.nodeid), 0))  # stable: file order kept among ties


@pytest.fixture(scope="session")
def notebook_run_dir():
    """Executed notebook copies go here (ignored by git) so a failure can be inspected after the run."""
    folder = paths.runs_dir() / "tests"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def executed(notebook_run_dir, testrun_uid):
    """Run each notebook at most once per test run, across xdist workers; remember failures so dependent tests
    report them too. The first worker to need a notebook runs it under a file lock and leaves its results for this
    run (keyed by xdist's ``testrun_uid``); another worker that needs it then waits for the lock and reads them."""
    cache: dict[str, dict] = {}
    locks = notebook_run_dir / ".locks"
    locks.mkdir(exist_ok=True)

    def run(name: str) -> dict:
        if name not in cache:
            with open(locks / f"{name}.lock", "w") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                cache[name] = _run_once(name, notebook_run_dir, testrun_uid)
        if "error" in cache[name]:
            pytest.fail(cache[name]["error"], pytrace=False)
        return cache[name]["results"]

    return run


def _run_once(name: str, run_dir, run_id: str) -> dict:
    """This test run's execution of notebook ``name``: read back if another worker ran it, else run it now."""
    marker = run_dir / name / f".test-run-{run_id}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from emlib import run_notebooks

    src = paths.NOTEBOOK_DIR / f"{name}.ipynb"
    try:
        done = run_notebooks.run_notebook(src, run_dir)
    except Exception as err:  # papermill's error names the failing cell and its exception
        done = {"error": f"{name}.ipynb failed: {err}"}
    for old in marker.parent.glob(".test-run-*.json"):  # earlier test runs' markers
        old.unlink()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(done))
    return done
