"""Warm kernels (emlib.warm_kernels): forked from a zygote that imported the stack once, yet the same kernel a cold
start gives: same environment, folder, progress bars, plotly renderer and pandas display; cold when they could differ."""

import os
import signal
import subprocess
import sys
import time

import nbformat
import pytest

from emlib import run_notebooks, warm_kernels

pytestmark = pytest.mark.skipif(os.name != "posix", reason="warm kernels fork: POSIX only")

# What a kernel looks like from inside: the first line is read before anything is imported.
PROBE = """
import sys
preloaded = all(m in sys.modules for m in ("torch", "nbformat", "plotly.express", "kaleido"))  # a figure's imports too
import json, os
import pandas as pd
import plotly.io as pio
import tqdm.auto
import tqdm.notebook
from ipykernel.kernelapp import IPKernelApp
seen = {"preloaded": preloaded, "ppid": os.getppid(), "cwd": os.getcwd(),
        "marker": os.environ.get("EMLIB_STATIC_FIGURES"),
        "threads": os.environ.get("EMLIB_THREADS"), "notebook_bars": issubclass(tqdm.auto.tqdm, tqdm.notebook.tqdm),
        "renderer": pio.renderers.default, "max_columns": pd.get_option("display.max_columns"),
        "parent_handle_is_jupyter": IPKernelApp.instance().parent_handle == int(os.environ["JPY_PARENT_PID"]),
        "main": sys.modules["__main__"].__name__}
os.makedirs(output_dir, exist_ok=True)
json.dump({"summary": seen}, open(os.path.join(output_dir, "results.json"), "w"))
left_open = open(os.path.join(output_dir, "left-open.txt"), "w")  # never closed or flushed by the notebook
left_open.write("written before the kernel ended")
"""


@pytest.fixture()
def probe(tmp_path):
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell("output_dir = None", metadata={"tags": ["parameters"]}),
                  nbformat.v4.new_code_cell(PROBE)]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "probe.ipynb"
    nbformat.write(book, path)

    def run(name: str) -> dict:
        seen = run_notebooks.run_notebook(path, tmp_path / name)["results"]["summary"]
        seen["left_open"] = (tmp_path / name / "probe" / "left-open.txt").read_text()  # flushed as the kernel ended
        return seen

    return run


def test_a_warm_kernel_is_forked_from_the_zygote_and_looks_like_a_cold_one(probe, monkeypatch):
    zygote = warm_kernels.start()
    assert zygote is not None
    monkeypatch.setenv("EMLIB_STATIC_FIGURES", "set after the zygote started")  # per-kernel variables pass through
    warm = probe("warm")
    assert warm.pop("preloaded") and warm.pop("ppid") == zygote.process.pid
    monkeypatch.setenv("EMLIB_WARM_KERNELS", "0")
    cold = probe("cold")
    assert not cold.pop("preloaded") and cold.pop("ppid") != zygote.process.pid
    assert warm == cold
    assert warm["marker"] == "set after the zygote started" and warm["cwd"] == os.getcwd()
    assert warm["notebook_bars"] and warm["parent_handle_is_jupyter"]
    assert warm["left_open"] == "written before the kernel ended"


def test_a_kernel_whose_environment_could_change_an_import_starts_cold(probe, monkeypatch):
    zygote = warm_kernels.start()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1")
    seen = probe("cold")
    assert not seen["preloaded"] and seen["ppid"] != zygote.process.pid


def test_environment_conflicts_ignore_per_kernel_variables_and_what_imports_set():
    before = {"PATH": "/bin", "HF_HOME": "/a"}
    after = {**before, "TORCHINDUCTOR_CACHE_DIR": "/tmp/x"}  # set by an import in the zygote
    same = {**before, "JPY_PARENT_PID": "7", "EMLIB_THREADS": "1", "OPENAI_API_KEY": "k"}
    assert warm_kernels.env_conflicts(before, after, same) == []
    assert warm_kernels.env_conflicts(before, after, {**same, "TORCHINDUCTOR_CACHE_DIR": "/tmp/x"}) == []
    assert warm_kernels.env_conflicts(before, after, {**same, "HF_HOME": "/b", "PLOTLY_RENDERER": "png"}) == [
        "HF_HOME", "PLOTLY_RENDERER"]
    assert warm_kernels.env_conflicts(before, after, {"PATH": "/bin"}) == ["HF_HOME"]  # removed counts too
    # an emlib variable read when emlib.world is imported is no per-kernel variable
    assert warm_kernels.env_conflicts(before, after, {**same, "EMLIB_PW_LANGUAGE": "v2.yaml"}) == ["EMLIB_PW_LANGUAGE"]


def test_killing_a_warm_kernel_process_ends_the_forked_kernel(tmp_path):
    zygote = warm_kernels.start()
    connection = tmp_path / "kernel.json"
    client = subprocess.Popen([sys.executable, "-m", "emlib.warm_kernels", "connect", str(zygote.path), "-f",
                               str(connection)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               env=dict(os.environ))  # as jupyter_client passes it
    try:
        kernel = _child_of(zygote.process.pid)
    finally:
        client.send_signal(signal.SIGKILL)  # what jupyter_client does to a kernel that will not shut down
        client.wait(timeout=10)
    deadline = time.time() + 15
    while time.time() < deadline and _alive(kernel):
        time.sleep(0.1)
    assert not _alive(kernel)


def _child_of(parent: int, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split()]
        if pids:
            return pids[-1]
        time.sleep(0.05)
    raise AssertionError(f"the zygote {parent} forked no kernel within {timeout} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")  # a zombie has ended (its parent reaps it)
