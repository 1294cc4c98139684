"""emlib.notebook.setup: threads chosen deliberately (EMLIB_THREADS first), seeds, the device."""

import torch

from emlib import notebook


def test_setup_takes_threads_from_emlib_threads_and_seeds_torch(monkeypatch):
    monkeypatch.setenv("EMLIB_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert notebook.setup(seed=3, threads=2).type in ("cpu", "cuda")
        assert torch.get_num_threads() == 1, "EMLIB_THREADS wins over the threads argument"
        first = torch.rand(3)
        notebook.setup(seed=3)
        assert torch.equal(first, torch.rand(3))
    finally:
        torch.set_num_threads(before)
