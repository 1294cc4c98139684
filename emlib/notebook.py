"""The first cell of every notebook: threads, seeds, offline mode, device; and where a notebook writes results."""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from emlib import paths


def setup(seed: int = 0, threads: int | None = None, offline: bool = False, device: str = "auto") -> torch.device:
    """Seed everything, choose torch threads deliberately and return the device to use.

    Threads: ``EMLIB_THREADS`` if set, else ``threads``, else all cores up to 2. On a shared 2-core machine one thread
    is far faster than two (torch's threads spin against the other load), so CI sets ``EMLIB_THREADS=1`` when it runs
    things side by side; on an idle machine two threads train about 1.7x faster than one (measured; see README).
    ``offline=True`` sets ``HF_HUB_OFFLINE=1`` so nothing tries the network (notebooks pass it for the offline
    organism); otherwise the environment decides.
    """
    n = int(os.environ.get("EMLIB_THREADS", threads or min(2, os.cpu_count() or 1)))
    torch.set_num_threads(n)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def output_dir(name: str, given: str | None = None) -> Path:
    """The folder a notebook writes to: ``given`` (papermill passes one per run) or ``runs/interactive/<name>``."""
    folder = Path(given) if given else paths.runs_dir() / "interactive" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_results(folder: Path, results: dict) -> Path:
    """Write the notebook's key numbers to ``results.json`` (the pipeline summary and the tests read them)."""
    path = Path(folder) / "results.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    return path


STATIC_FORMAT = "png"  # the static copy of every figure: PNG shows everywhere (markdown viewers, summary.html, repos)
_static_export: dict = {}  # per process: the "renderer" once started, or the "error" that turned static images off


def static_export_browser() -> str | None:
    """The installed Chromium-family browser kaleido draws static figures with, or None.

    ``BROWSER_PATH`` if set, else the first system browser on PATH or in its usual place (chromium, chrome, edge,
    brave). A browser that kaleido or plotly downloaded is never used: the static export runs on the system's own
    package (Debian: ``apt-get install chromium``), which gets its security updates.
    """
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:  # kaleido (which brings choreographer) is not installed
        return None
    path = Chromium.find_browser(skip_local=True)
    return path if path and os.access(path, os.X_OK) else None


class _StaticRenderer:
    """One headless browser (kaleido on the system's Chromium) that draws every figure of this process.

    It runs kaleido's asyncio API on an event loop of its own thread, so it works the same inside a Jupyter kernel
    (which has a running loop) and in a plain script; every call waits with a timeout and re-raises what went wrong
    (kaleido's own sync server hangs instead when its browser cannot start). Closed when the process exits.
    """

    def __init__(self, browser: str, timeout: float = 120):
        import asyncio
        import atexit
        import threading

        import kaleido

        self.timeout, self.loop = timeout, asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="emlib-static-figures").start()
        # mathjax=False: no figure uses LaTeX, and kaleido would otherwise fetch MathJax from a CDN
        self.kaleido = kaleido.Kaleido(path=browser, mathjax=False)
        try:
            self._wait(self.kaleido.open())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        atexit.register(self.close)

    def _wait(self, coroutine, timeout: float | None = None):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout or self.timeout)

    def render(self, fig, fmt: str, scale: float) -> bytes:
        import plotly.io as pio

        opts = {"format": fmt, "scale": scale, "width": fig.layout.width or pio.defaults.default_width,
                "height": fig.layout.height or pio.defaults.default_height}
        return self._wait(self.kaleido.calc_fig(fig.to_dict(), opts=opts))

    def close(self) -> None:
        try:
            self._wait(self.kaleido.close(), timeout=10)
        except Exception:  # at exit, a browser that is already gone is fine
            pass
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def _static_renderer() -> _StaticRenderer:
    if "renderer" not in _static_export:
        browser = static_export_browser()
        if browser is None:
            raise FileNotFoundError("no Chromium or Chrome found (install the system package, e.g. "
                                    "`apt-get install chromium`, or set BROWSER_PATH)")
        _static_export["renderer"] = _StaticRenderer(browser)
    return _static_export["renderer"]


def save_figure(fig, folder: Path, name: str, results: dict | None = None):
    """Save a plotly figure as ``<name>.html`` (interactive) and ``<name>.png`` (static) in ``folder``.

    The HTML is the figure to explore; the PNG is the one a person sees without a notebook server: in ``summary.md``
    on a repository page, in the self-contained ``summary.html``, in any image viewer. ``name`` may end in ``.html``.
    The HTML file's name goes into ``results["figures"]`` (the run summary finds the PNG beside it). Without a
    working Chromium-family browser the PNG is skipped, with one warning per process; ``EMLIB_STATIC_FIGURES=0``
    skips it on purpose (a sweep of many runs that reads only results.json saves a browser start, ~2.5 s of CPU,
    per run). Returns ``fig``, so a cell can go on with ``.show()``.
    """
    folder = Path(folder)
    stem = name[: -len(".html")] if name.endswith(".html") else name
    fig.write_html(folder / f"{stem}.html")
    if results is not None:
        results.setdefault("figures", []).append(f"{stem}.html")
    if "error" not in _static_export and os.environ.get("EMLIB_STATIC_FIGURES", "1") != "0":
        try:
            (folder / f"{stem}.{STATIC_FORMAT}").write_bytes(_static_renderer().render(fig, STATIC_FORMAT, scale=2))
        except Exception as err:  # no browser, or it would not start or draw: keep the notebook going, say so once
            detail = (err.args[0] if err.args and isinstance(err.args[0], str) else str(err)) or "no detail"
            _static_export["error"] = f"{type(err).__name__}: {detail}"
            warnings.warn(f"static figure images are off ({_static_export['error']}); figures are saved as "
                          "interactive HTML only", RuntimeWarning, stacklevel=2)
    return fig
