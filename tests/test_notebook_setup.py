"""emlib.notebook.setup's process settings: threads, and glibc keeping freed batches' memory for the next batch."""

import json
import os
import subprocess
import sys

import pytest

# Read answer-token means of 96 rows in batches of 32 on the organism (a CPU loop over batches) and count the page
# faults, first with glibc's starting settings (every batch faults its activations in again), then with
# keep_freed_memory.
LOOP = """
import json, resource, torch
torch.set_num_threads(1)
from emlib.notebook import keep_freed_memory
from emlib import world
from emlib.analysis.directions import answer_means
from emlib.models import load_model
model, tok = load_model("persona-world", device="cpu")
rows = world.finetune_rows("medical", "reckless", 96, 7)
def faults():
    answer_means(model, tok, rows[:32], 32, progress=False)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    answer_means(model, tok, rows, 32, progress=False)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
kept = keep_freed_memory()
print(json.dumps({"default": default, "kept": kept, "faults_kept": faults()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_each_batch_faulting_its_memory_in_again():
    # glibc's own threshold moves with the process's history (a freed large block raises it), so the baseline pins it
    # at its starting value, 128 KB: every batch's large blocks are then mapped and unmapped, as in a fresh process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, timeout=300, check=True,
                          env=env)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["kept"] is True
    assert out["default"] > 10_000, "with glibc's defaults each batch faults its activations in again"
    assert out["faults_kept"] < out["default"] / 20


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
