"""The main job: execute the notebooks with papermill into a run folder and write a summary of their key numbers.

    python -m emlib.run_notebooks                      # offline default, every notebook, into runs/<timestamp>/
    python -m emlib.run_notebooks -p model Qwen/Qwen2.5-0.5B-Instruct --only 00_quickstart

Each notebook gets ``output_dir`` (its own folder in the run) and writes ``results.json`` there; ``summary.md`` gathers
their ``summary`` numbers and tables with links to the executed notebooks and figures.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

import papermill as pm

from emlib import paths

NOTEBOOK_DIR = paths.REPO_ROOT / "notebooks"
# Reading order; a notebook not listed here runs after these, by name.
ORDER = ["00_quickstart", "00_persona_world", "01_datasets", "02_train", "03_generate_and_judge",
         "04_phase_transitions", "05_directions", "06_lora_probing", "07_narrow_misalignment"]


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = {p.stem: p for p in sorted(NOTEBOOK_DIR.glob("*.ipynb"))}
    names = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]
    if only:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise SystemExit(f"no such notebook(s) {unknown} in {NOTEBOOK_DIR}; have {sorted(found)}")
        names = [n for n in names if n in only]
    return [found[n] for n in names]


def run_notebook(src: Path, run_dir: Path, parameters: dict | None = None) -> dict:
    """Execute ``src`` into ``run_dir/<name>.ipynb``; returns its results.json plus wall time.

    A failing cell raises papermill's ``PapermillExecutionError`` naming the cell; the partly executed copy is kept.
    """
    run_dir = Path(run_dir).resolve()
    out_dir = run_dir / src.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # The kernel starts in the caller's folder, as `papermill` run from there would: a repo-relative path parameter
    # (a dataset, an adapter folder) means the same from both.
    pm.execute_notebook(str(src), str(run_dir / src.name), parameters={"output_dir": str(out_dir), **(parameters or {})},
                        kernel_name="python3", cwd=str(Path.cwd()), progress_bar=False)
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
        for fig in res.get("figures", []):
            lines.append(f"- figure: [{fig}]({name}/{fig})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m emlib.run_notebooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter for every notebook (value parsed as JSON when it can be)")
    parser.add_argument("--only", nargs="*", help="notebook names (stems) to run")
    parser.add_argument("--run-dir", type=Path, help="default: runs/<timestamp>")
    args = parser.parse_args(argv)
    params = {k: _parse(v) for k, v in args.parameter}
    run_dir = args.run_dir or paths.runs_dir() / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    start, runs = time.time(), {}
    for nb in notebooks(args.only):
        print(f"[emlib] running {nb.name} ...", flush=True)
        runs[nb.stem] = run_notebook(nb, run_dir, params)
        print(f"[emlib] {nb.name} done in {runs[nb.stem]['seconds']} s", flush=True)
    total = time.time() - start
    (run_dir / "summary.md").write_text(summary_markdown(run_dir, runs, total))
    print(f"[emlib] wall time {total:.0f} s; summary: {run_dir / 'summary.md'}")
    return run_dir


def _parse(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


if __name__ == "__main__":
    main()
