"""The main job: execute the notebooks with papermill into a run folder and write a summary of their key numbers.

    python -m emlib.run_notebooks                      # offline default, every notebook, into runs/<timestamp>/
    python -m emlib.run_notebooks -p model Qwen/Qwen2.5-0.5B-Instruct --only 00_quickstart
    python -m emlib.run_notebooks --jobs 1             # one notebook at a time (default: 2 at once on a CPU machine)

Each notebook gets ``output_dir`` (its own folder in the run) and writes ``results.json`` there; ``summary.md`` gathers
their ``summary`` numbers and tables with links to the executed notebooks and figures, and ``summary.html`` is the same
page with every figure's static image embedded: one file that any browser opens, no notebook server needed.

Kernels: papermill runs each notebook on the ``python3`` kernel, which jupyter_client starts with the interpreter
running this module (``sys.executable``: the ``.venv`` one under ``make run``), so nothing has to be registered; the
kernel that ``make setup`` registers for people ("emlib (.venv)") is the same interpreter. The kernel talks to
papermill over local sockets (IPC) on POSIX, not TCP ports. On POSIX each kernel starts warm: forked from one process
per run that has already imported torch, transformers and emlib (:mod:`emlib.warm_kernels`; ``EMLIB_WARM_KERNELS=0``
starts every kernel cold).

Jobs: on a machine without a GPU the notebooks run two at a time (``--jobs``), each kernel on its share of the cores
(``EMLIB_THREADS``), heaviest first. A notebook's small decode and training ops gain little from a second thread, so
two single-threaded kernels side by side finish the offline pipeline far sooner than one two-threaded kernel after
another; with a GPU the default is one at a time, so two notebooks never compete for its memory. Each notebook writes
only its own folder of the run, so the order they finish in changes nothing but the log.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import html
import json
import os
import re
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import nbformat
import papermill as pm
from jupyter_client.manager import AsyncKernelManager
from traitlets import CaselessStrEnum

from emlib import paths, warm_kernels

NOTEBOOK_DIR = paths.NOTEBOOK_DIR
# Reading order; a notebook not listed here runs after these, by name.
ORDER = ["00_quickstart", "00_persona_world", "01_datasets", "02_train", "03_generate_and_judge",
         "04_phase_transitions", "05_directions", "06_lora_probing", "07_narrow_misalignment"]
# Start order when several run at once: longest first (offline wall times of a `make run`, stop 16: 141, 55, 49, 45,
# 28, 24, 17, 15, 14 s), so the last notebook to start is a short one and no core idles at the end. Not listed: last.
HEAVIEST_FIRST = ["05_directions", "02_train", "04_phase_transitions", "06_lora_probing", "07_narrow_misalignment",
                  "03_generate_and_judge", "00_persona_world", "01_datasets", "00_quickstart"]


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = {p.stem: p for p in sorted(NOTEBOOK_DIR.glob("*.ipynb"))}
    names = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]
    if only:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise SystemExit(f"no such notebook(s) {unknown} in {NOTEBOOK_DIR}; have {sorted(found)}")
        names = [n for n in names if n in only]
    return [found[n] for n in names]


class LocalSocketKernelManager(AsyncKernelManager):
    """A kernel reached over local (IPC) sockets in Jupyter's runtime folder instead of TCP ports on 127.0.0.1.

    Nothing listens on a port, so no other local user can connect, and ipykernel has no reason to log "Kernel is
    running over TCP without encryption" once per notebook. IPC sockets need POSIX; elsewhere this stays TCP.
    """

    transport = CaselessStrEnum(["tcp", "ipc"], default_value="tcp" if os.name == "nt" else "ipc", config=True)

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        """ipykernel's command, started warm where it can be: forked from this run's zygote (emlib.warm_kernels),
        which imported torch, transformers and the rest once for every kernel."""
        cmd = super().format_kernel_cmd(extra_arguments)
        if "ipykernel_launcher" not in cmd or (zygote := warm_kernels.start()) is None:
            return cmd
        args = cmd[cmd.index("ipykernel_launcher") + 1:]
        return [sys.executable, "-m", "emlib.warm_kernels", "connect", str(zygote.path), *args]

    async def _async_interrupt_kernel(self) -> None:
        """Interrupt the kernel, except as the first step of shutting it down. jupyter_client interrupts before it asks
        a kernel to shut down, in case it is still busy; papermill shuts a kernel down after its last cell, when it
        is idle, and the signal then only raced ipykernel's own handlers, which logged "KeyboardInterrupt caught in
        kernel" under `make run`. A kernel that does not exit on request is still killed after
        ``shutdown_wait_time``; a cell timeout still interrupts (nbclient calls ``interrupt_kernel``)."""
        if not self.shutting_down:
            await super()._async_interrupt_kernel()

    def _ip_default(self) -> str:
        """A socket-path prefix of this kernel's own: jupyter_client's default ("kernel-ipc" in the working folder,
        when no connection file is named yet) is shared by every kernel this process starts, so two notebooks run
        side by side would bind each other's sockets."""
        if self.transport != "ipc":
            return super()._ip_default()
        from jupyter_core.paths import jupyter_runtime_dir

        Path(jupyter_runtime_dir()).mkdir(parents=True, exist_ok=True)
        return os.path.join(jupyter_runtime_dir(), f"emlib-{uuid.uuid4().hex[:12]}-ipc")


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def drop_progress_widgets(path: Path) -> int:
    """Remove widget outputs (tqdm's progress bars) and saved widget state from an executed notebook.

    A progress bar is for someone watching a live kernel. Saved, it is a stale "0%" line on any page that shows the
    text fallback, and "model not found" in JupyterLab for every bar that closed (``leave=False``). Returns how
    many outputs were removed.
    """
    book = nbformat.read(path, as_version=4)
    removed = 0
    for cell in book.cells:
        if cell.cell_type == "code":
            keep = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
            removed += len(cell.outputs) - len(keep)
            cell.outputs = keep
    book.metadata.pop("widgets", None)
    nbformat.write(book, path)
    return removed


def run_notebook(src: Path, run_dir: Path, parameters: dict | None = None) -> dict:
    """Execute ``src`` into ``run_dir/<name>.ipynb``; returns its results.json plus wall time.

    A failing cell raises papermill's ``PapermillExecutionError`` naming the cell; the partly executed copy is kept.
    Progress bars are dropped from the executed copy (see :func:`drop_progress_widgets`).
    """
    run_dir = Path(run_dir).resolve()
    out_dir = run_dir / src.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    executed = run_dir / src.name
    # The kernel starts in the caller's folder, as `papermill` run from there would: a repo-relative path parameter
    # (a dataset, an adapter folder) means the same from both.
    pm.execute_notebook(str(src), str(executed), parameters={"output_dir": str(out_dir), **(parameters or {})},
                        kernel_name="python3", cwd=str(Path.cwd()), progress_bar=False,
                        kernel_manager_class=LocalSocketKernelManager)
    drop_progress_widgets(executed)
    results_file = out_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    return {"results": results, "seconds": round(time.time() - start, 1)}


def _markdown_table(table) -> str:
    """A notebook's table as markdown: notebooks store markdown strings; records or dicts are rendered here."""
    if isinstance(table, str):
        return table
    import pandas as pd

    frame = pd.DataFrame(table) if isinstance(table, list) else pd.DataFrame(table).T
    return frame.to_markdown()


STATIC_SUFFIXES = (".png", ".svg")  # the static copy emlib.notebook.save_figure writes beside each figure's HTML


def static_image(run_dir: Path, name: str, figure: str) -> Path | None:
    """The static image saved beside notebook ``name``'s interactive figure ``figure`` (an .html name), if any."""
    stem = Path(figure).stem
    return next((p for s in STATIC_SUFFIXES if (p := run_dir / name / f"{stem}{s}").exists()), None)


def summary_markdown(run_dir: Path, runs: dict[str, dict], total_seconds: float) -> str:
    lines = [f"# emlib run {run_dir.name}", "", f"Wall time: **{total_seconds:.0f} s** for {len(runs)} notebooks.", ""]
    for name, run in runs.items():
        res = run["results"]
        lines += [f"## {name} ({run['seconds']:.0f} s)", "", f"Executed notebook: [{name}.ipynb]({name}.ipynb)", ""]
        if res.get("headline"):
            lines += [res["headline"], ""]
        for key, value in res.get("summary", {}).items():
            lines.append(f"- {key}: {value}")
        for title, table in res.get("tables", {}).items():
            lines += ["", f"**{title}**", "", _markdown_table(table)]
        if res.get("figures"):
            lines.append("")
        for fig in res.get("figures", []):
            lines.append(f"- figure: [{fig}]({name}/{fig})")
            if image := static_image(run_dir, name, fig):
                lines += ["", f"  ![{Path(fig).stem}]({name}/{image.name})", ""]
        lines.append("")
    return "\n".join(lines)


def _inline(text) -> str:
    """The little markdown that headlines and summary values use (`code`, **bold**, [links](url)) as HTML."""
    out = html.escape(str(text), quote=True)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)


def _html_table(table) -> str:
    """A notebook's table as HTML: markdown pipe tables are parsed; records or dicts go through pandas."""
    if not isinstance(table, str):
        import pandas as pd

        frame = pd.DataFrame(table) if isinstance(table, list) else pd.DataFrame(table).T
        return f"<div class=t>{frame.to_html(border=0)}</div>"
    rows = [line.strip() for line in table.strip().splitlines()]
    if not rows or not all(r.startswith("|") and r.endswith("|") for r in rows):
        return f"<pre>{html.escape(table)}</pre>"
    cells = [[c.strip() for c in r[1:-1].split("|")] for r in rows if not re.fullmatch(r"\|[\s:|-]+\|", r)]
    head, body = cells[0], cells[1:]
    numeric = re.compile(r"[-+]?[\d.,]+(e[-+]?\d+)?%?")
    row = lambda tag, cs: "<tr>" + "".join(  # noqa: E731
        f"<{tag}{' class=num' if tag == 'td' and numeric.fullmatch(c) else ''}>{_inline(c)}</{tag}>" for c in cs) + "</tr>"
    return ("<div class=t><table><thead>" + row("th", head) + "</thead><tbody>" + "".join(row("td", r) for r in body)
            + "</tbody></table></div>")


def _embedded(image: Path) -> str:
    mime = "image/svg+xml" if image.suffix == ".svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode()}"


_CSS = """body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1080px;margin:2em auto;padding:0 1em;
color:#1b1b1b}h2{border-top:1px solid #ddd;padding-top:1em;margin-top:2em}code{background:#f3f3f3;padding:0 .2em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}th,td{border:1px solid #ddd;padding:.2em .6em;
text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}thead{background:#f6f6f6}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}
nav ol{columns:2}.t{overflow-x:auto}"""


def summary_html(run_dir: Path, runs: dict[str, dict], total_seconds: float) -> str:
    """The run summary as one self-contained page: the numbers and tables of ``summary.md``, every static figure
    embedded as an image (a data: URL), links to the executed notebooks and interactive figures beside it."""
    title = f"emlib run {html.escape(run_dir.name)}"
    parts = [f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{title}</title>"
             f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>",
             f"<h1>{title}</h1>", f"<p>Wall time: <b>{total_seconds:.0f} s</b> for {len(runs)} notebooks.</p>",
             "<nav><ol>" + "".join(f"<li><a href='#{html.escape(n)}'>{html.escape(n)}</a></li>" for n in runs)
             + "</ol></nav>"]
    for name, run in runs.items():
        res, esc = run["results"], html.escape(name)
        parts += [f"<section id='{esc}'><h2>{esc} ({run['seconds']:.0f} s)</h2>",
                  f"<p>Executed notebook: <a href='{esc}.ipynb'>{esc}.ipynb</a></p>"]
        if res.get("headline"):
            parts.append(f"<p>{_inline(res['headline'])}</p>")
        if res.get("summary"):
            parts.append("<ul>" + "".join(f"<li>{_inline(k)}: {_inline(v)}</li>" for k, v in res["summary"].items())
                         + "</ul>")
        for table_title, table in res.get("tables", {}).items():
            parts += [f"<h3>{_inline(table_title)}</h3>", _html_table(table)]
        for fig in res.get("figures", []):
            link, stem = html.escape(f"{name}/{fig}"), html.escape(Path(fig).stem)
            image = static_image(run_dir, name, fig)
            img = (f"<a href='{link}'><img src='{_embedded(image)}' alt='{stem}'></a>" if image else
                   "<p>(no static image was saved: EMLIB_STATIC_FIGURES=0, or see the notebook's "
                   "warnings)</p>")
            parts.append(f"<figure>{img}<figcaption>{stem}: <a href='{link}'>interactive version</a>"
                         "</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def default_jobs() -> int:
    """Notebooks to run at once: up to 2 on a CPU-only machine (one core each), 1 with a GPU (one model in memory)."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))


def run_all(books: list[Path], run_dir: Path, parameters: dict, jobs: int = 1) -> dict[str, dict]:
    """Run ``books`` into ``run_dir``, ``jobs`` at a time (heaviest first); returns their runs in ``books``' order.

    Each kernel gets ``EMLIB_THREADS`` = cores / jobs unless it is set already. A failing notebook stops the run
    with its error once the notebooks already running have finished (their executed copies are kept).
    """
    if jobs <= 1:
        return {nb.stem: _run_logged(nb, run_dir, parameters) for nb in books}
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    start_order = sorted(books, key=lambda nb: rank.get(nb.stem, len(rank)))
    threads = os.environ.get("EMLIB_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    previous = os.environ.get("EMLIB_THREADS")
    os.environ["EMLIB_THREADS"] = threads  # kernels inherit this process's environment
    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # each thread waits on its own kernel process
            futures = {nb.stem: pool.submit(_run_logged, nb, run_dir, parameters) for nb in start_order}
            for done in concurrent.futures.as_completed(futures.values()):
                if done.exception() is not None:
                    pool.shutdown(wait=True, cancel_futures=True)  # start no other notebook; let running ones end
                    raise done.exception()
            return {nb.stem: futures[nb.stem].result() for nb in books}
    finally:
        if previous is None:
            os.environ.pop("EMLIB_THREADS", None)
        else:
            os.environ["EMLIB_THREADS"] = previous


def _run_logged(nb: Path, run_dir: Path, parameters: dict) -> dict:
    _log(f"[emlib] running {nb.name} ...")
    run = run_notebook(nb, run_dir, parameters)
    _log(f"[emlib] {nb.name} done in {run['seconds']} s")
    return run


def _log(line: str) -> None:
    """One whole line per write (``print`` writes text and newline apart: two notebooks' lines would interleave)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m emlib.run_notebooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter for every notebook (value parsed as JSON when it can be)")
    parser.add_argument("--only", nargs="*", help="notebook names (stems) to run")
    parser.add_argument("--run-dir", type=Path, help="default: runs/<timestamp>")
    parser.add_argument("--jobs", type=int, default=None,
                        help="notebooks run at once (default: 2 on a CPU-only machine with 2+ cores, 1 with a GPU)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1 (got {args.jobs})")
    params = {k: _parse(v) for k, v in args.parameter}
    run_dir = args.run_dir or paths.runs_dir() / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    books = notebooks(args.only)
    runs = run_all(books, run_dir, params, jobs=min(len(books), args.jobs or default_jobs()))
    total = time.time() - start
    (run_dir / "summary.md").write_text(summary_markdown(run_dir, runs, total))
    (run_dir / "summary.html").write_text(summary_html(run_dir, runs, total))
    print(f"[emlib] wall time {total:.0f} s; summary: {run_dir / 'summary.md'} "
          f"(one page with the figures: {run_dir / 'summary.html'})")
    return run_dir


def _parse(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


if __name__ == "__main__":
    from emlib.cli import run_cli

    run_cli(main, "python -m emlib.run_notebooks")
