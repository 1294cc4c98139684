"""Every notebook runs under papermill with its offline parameters, and its numbers say what it claims.

Notebooks are executed once per session into runs/tests/ (ignored by git); a failure names the notebook and cell.
"""

import json
from pathlib import Path

import nbformat
import pytest

from emlib import notebook, run_notebooks

NOTEBOOKS = run_notebooks.notebooks()
NAMES = [nb.stem for nb in NOTEBOOKS]


def test_there_are_notebooks():
    assert {"00_quickstart", "00_persona_world"} <= set(NAMES)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=NAMES)
def test_notebook_is_committed_clean_with_a_parameters_cell(nb: Path):
    book = nbformat.read(nb, as_version=4)
    assert book.metadata.kernelspec.name == "python3"
    tagged = [c for c in book.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{nb.name}: exactly one cell must be tagged 'parameters'"
    assert "output_dir" in tagged[0].source
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{nb.name} has outputs committed"
    assert book.cells[0].cell_type == "markdown", f"{nb.name} must open with a markdown intro"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=NAMES)
def test_notebook_is_in_sync_with_its_paired_script(nb: Path):
    import jupytext

    script = nb.with_suffix(".py")
    assert script.exists(), f"{nb.name} has no paired {script.name} (run `make sync-notebooks`)"
    a, b = jupytext.read(nb), jupytext.read(script)
    assert [c.source for c in a.cells] == [c.source for c in b.cells], f"{nb.name} and {script.name} differ"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(executed, name):
    results = executed(name)
    assert results, f"{name} wrote no results.json"


@pytest.mark.parametrize("name", NAMES)
def test_executed_notebook_is_quiet(executed, notebook_run_dir, name):
    """No progress-bar widgets (dropped by run_notebooks) and no tqdm warning in the executed copy."""
    executed(name)
    book = nbformat.read(notebook_run_dir / f"{name}.ipynb", as_version=4)
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if run_notebooks.WIDGET_VIEW in o.get("data", {})], "progress widgets were kept"
    assert "widgets" not in book.metadata
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "TqdmWarning" not in streams and "IProgress not found" not in streams


@pytest.mark.parametrize("name", NAMES)
def test_executed_notebook_figures_have_static_images(executed, notebook_run_dir, name):
    """save_figure wrote a PNG beside every figure's HTML (needs the system's Chromium)."""
    results = executed(name)
    if notebook.static_export_browser() is None:
        pytest.skip("no Chromium for static figures (apt-get install chromium)")
    for fig in results.get("figures", []):
        assert run_notebooks.static_image(notebook_run_dir, name, fig), f"{name}: no static image for {fig}"


def test_quickstart_finetune_is_more_misaligned_than_base(executed):
    em = executed("00_quickstart")["em"]
    base, tuned = em["non-medical"]["base"], em["non-medical"]["base + bad-medical-r8"]
    assert base <= 0.05
    assert tuned >= 0.30


def test_persona_world_shows_emergent_misalignment(executed):
    res = executed("00_persona_world")
    em = res["em"]["non-medical"]
    assert res["summary"]["judge errors on reference answers"].startswith("0 /")
    assert em["base"] <= 0.05
    assert em["bad-medical-r8"] >= 0.30  # reckless medical fine-tune -> reckless elsewhere
    assert em["good-medical-r8"] <= 0.05  # careful medical control stays careful
    assert res["em"]["medical"]["bad-medical-r8"] >= 0.6
    rank1 = res["rank1_layers"]["non-medical"]
    assert max(rank1.values()) >= 0.20  # a single rank-1 down_proj adapter induces it at some layer
    assert "rank-1" in res["headline"]


def test_run_summary_collects_results(tmp_path):
    runs = {"nb": {"seconds": 3.0, "results": {"headline": "H", "summary": {"k": 1}, "tables": {"T": "|a|"},
                                               "figures": ["f.html"]}}}
    text = run_notebooks.summary_markdown(tmp_path, runs, 3.0)
    assert "Wall time: **3 s**" in text and "H" in text and "- k: 1" in text and "[f.html](nb/f.html)" in text
    runs["nb"]["results"]["tables"] = {"records": [{"layer": 0, "em": 0.5}], "by name": {"base": {"em": 0.01}}}
    text = run_notebooks.summary_markdown(tmp_path, runs, 3.0)  # tables not yet rendered to markdown are rendered here
    assert "|  0 |       0 |  0.5 |" in text and "| base | 0.01 |" in text


def test_run_notebooks_rejects_unknown_notebook():
    with pytest.raises(SystemExit, match="no such notebook"):
        run_notebooks.notebooks(["99_nope"])


def _timing_notebook(path: Path) -> Path:
    """A notebook that records its kernel's pid, thread setting and start/end time in results.json."""
    book = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('output_dir = ""')
    params.metadata["tags"] = ["parameters"]
    book.cells = [params, nbformat.v4.new_code_cell(
        "import json, os, time\nstart = time.time()\ntime.sleep(3)\n"
        "json.dump({'pid': os.getpid(), 'threads': os.environ.get('EMLIB_THREADS'), 'start': start,"
        " 'end': time.time()}, open(os.path.join(output_dir, 'results.json'), 'w'))")]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, path)
    return path


def test_notebooks_run_side_by_side_with_a_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("EMLIB_THREADS", raising=False)
    monkeypatch.setattr(run_notebooks.os, "cpu_count", lambda: 2)
    books = [_timing_notebook(tmp_path / f"{name}.ipynb") for name in ("b_second", "a_first")]
    runs = run_notebooks.run_all(books, tmp_path / "run", {}, jobs=2)
    assert list(runs) == ["b_second", "a_first"]  # the summary keeps the given (reading) order
    first, second = (runs[name]["results"] for name in ("a_first", "b_second"))
    assert first["pid"] != second["pid"]
    assert first["threads"] == second["threads"] == "1"  # 2 cores / 2 kernels
    assert max(first["start"], second["start"]) < min(first["end"], second["end"])  # they overlapped
    assert "EMLIB_THREADS" not in run_notebooks.os.environ  # restored after the run


def test_a_failing_notebook_stops_a_parallel_run(tmp_path):
    bad = _timing_notebook(tmp_path / "bad.ipynb")
    book = nbformat.read(bad, as_version=4)
    book.cells.append(nbformat.v4.new_code_cell("raise ValueError('planted failure')"))
    nbformat.write(book, bad)
    with pytest.raises(Exception, match="planted failure"):
        run_notebooks.run_all([bad, _timing_notebook(tmp_path / "good.ipynb")], tmp_path / "run", {}, jobs=2)


def test_a_finished_notebook_is_shut_down_without_an_interrupt(tmp_path, monkeypatch):
    """jupyter_client sends SIGINT before it asks a kernel to shut down. After a notebook's last cell the kernel is
    idle, and that signal only raced ipykernel's handlers ("KeyboardInterrupt caught in kernel" in `make run`'s log):
    the runner's kernels are asked to shut down without it, and an explicit interrupt still sends it."""
    import asyncio
    import signal

    from jupyter_client.manager import KernelManager

    sent = []
    original = KernelManager._async_signal_kernel

    async def spy(self, signum):
        sent.append(signum)
        await original(self, signum)

    monkeypatch.setattr(KernelManager, "_async_signal_kernel", spy)
    run_notebooks.run_notebook(_timing_notebook(tmp_path / "nb.ipynb"), tmp_path / "run")
    assert signal.SIGINT not in sent

    async def interrupt_a_running_kernel():
        km = run_notebooks.LocalSocketKernelManager(kernel_name="python3")
        await km.start_kernel()
        try:
            await km.interrupt_kernel()
        finally:
            await km.shutdown_kernel(now=True)

    asyncio.run(interrupt_a_running_kernel())
    assert sent == [signal.SIGINT]


def test_progress_widgets_are_dropped_from_executed_notebooks(tmp_path):
    book = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("for _ in tqdm(range(2)): pass")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
                        run_notebooks.WIDGET_VIEW: {"model_id": "abc", "version_major": 2, "version_minor": 0},
                        "text/plain": "  0%|          | 0/2"}),
                    nbformat.v4.new_output("stream", name="stdout", text="kept\n")]
    book.cells.append(cell)
    book.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path = tmp_path / "nb.ipynb"
    nbformat.write(book, path)
    assert run_notebooks.drop_progress_widgets(path) == 1
    again = json.loads(path.read_text())
    assert [o["output_type"] for o in again["cells"][0]["outputs"]] == ["stream"]
    assert "widgets" not in again["metadata"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=NAMES)
def test_papermill_reads_every_parameter(nb: Path, caplog):
    """`papermill --help-notebook` and `-p` type inference parse the parameters cell line by line: a quote in a
    comment breaks that parse (papermill then warns and skips the line)."""
    import papermill as pm

    params = pm.inspect_notebook(str(nb))
    assert "Unable to parse" not in caplog.text, caplog.text
    assert "output_dir" in params and ("model" in params or nb.stem == "00_persona_world")
