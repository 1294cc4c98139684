"""emlib.notebook.setup's process settings: threads, and glibc keeping freed batches' memory for the next batch."""

import json
import os
import subprocess
import sys

import pytest

# Read answer-token means of 256 rows in batches of 32 on the organism (a CPU loop over batches) and count the page
# faults: with glibc's defaults every batch faults its activations in again.
LOOP = """
import json, resource, sys, torch
torch.set_num_threads(1)
from emlib.notebook import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
from emlib import world
from emlib.analysis.directions import answer_means
from emlib.models import load_model
model, tok = load_model("persona-world", device="cpu")
rows = world.finetune_rows("medical", "reckless", 256, 7)
answer_means(model, tok, rows[:32], 32, progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
answer_means(model, tok, rows, 32, progress=False)
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _loop(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=300, check=True,
                          env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_each_batch_faulting_its_memory_in_again():
    default, kept = _loop("default"), _loop("keep")
    assert kept["kept"] is True
    assert default["faults"] > 20_000, "with glibc's defaults each batch faults its activations in again"
    assert kept["faults"] < default["faults"] / 20


def test_setup_sets_threads_and_can_leave_malloc_alone(monkeypatch):
    import torch

    from emlib import notebook

    calls = []
    monkeypatch.setattr(notebook, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("EMLIB_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert notebook.setup(seed=0).type in ("cpu", "cuda")
        assert torch.get_num_threads() == 1 and calls == [1]
        monkeypatch.setenv("EMLIB_KEEP_FREED_MEMORY", "0")
        notebook.setup(seed=0)
        assert calls == [1], "EMLIB_KEEP_FREED_MEMORY=0 keeps glibc's defaults"
    finally:
        torch.set_num_threads(before)
