"""A real browser runs 00_quickstart in JupyterLab and sees what a person would.

Headless Chromium, driven by Selenium through chromedriver, opens ``00_quickstart.ipynb`` in a JupyterLab started on
127.0.0.1 with a token, runs every cell, and checks that the plotly figure is drawn (an SVG in the output area), that
no cell shows an error, and that the progress bar rendered as a widget. The notebook copy, the server log and a
screenshot stay in ``runs/tests/browser/``.

It needs the system's browser and its driver (Debian: ``apt-get install chromium chromium-driver``; ``CHROMIUM`` and
``CHROMEDRIVER`` override the paths) and selenium (requirements.txt); nothing is downloaded. Without them the test is
skipped, except under CI (``CI=true``), where it fails and says what is missing. ``pytest -m "not browser"`` leaves it
out.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from emlib import run_notebooks

pytestmark = pytest.mark.browser

NOTEBOOK = "00_quickstart"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def browser_tools() -> tuple[str, str]:
    """(chromium, chromedriver) paths; skip (fail under CI) with what is missing."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [what for what, found in (("chromium", chromium), ("chromedriver", driver)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = (f"the browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver "
                   "(Debian) and pip install -r requirements.txt")
        if IN_CI:
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return chromium, driver


def _server_url(runtime: Path, server: subprocess.Popen) -> str | None:
    """The URL JupyterLab listens on, from the server file it writes once it is up (None while it is not). It binds a
    port the system picks (``--port=0``), so no other test's server can take that port between choosing and binding."""
    info = runtime / f"jpserver-{server.pid}.json"
    try:
        return f"http://127.0.0.1:{json.loads(info.read_text())['port']}"
    except (OSError, ValueError, KeyError):  # not written yet, or half written
        return None


@pytest.fixture(scope="module")
def lab(notebook_run_dir, browser_tools):
    """JupyterLab on 127.0.0.1 with a fresh token, serving a copy of the notebook in runs/tests/browser/.

    The copy gets papermill's injected ``output_dir`` (so its files land beside it), and JupyterLab gets its own
    settings folder there: no news or update check, nothing written to the user's ~/.jupyter.
    """
    folder = notebook_run_dir / "browser"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    book = load_notebook_node(str(run_notebooks.NOTEBOOK_DIR / f"{NOTEBOOK}.ipynb"))
    book = parameterize_notebook(book, {"output_dir": str(folder / NOTEBOOK)})
    nbformat.write(book, folder / f"{NOTEBOOK}.ipynb")
    config = folder / ".jupyter"
    settings = config / "lab" / "user-settings"
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"recordTiming": True}))  # per-cell times in the cells' metadata
    token = secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(config / "lab" / "workspaces"), "HF_HUB_OFFLINE": "1",
           "JUPYTER_RUNTIME_DIR": str(config / "runtime")}
    log = (folder / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
         "--LabApp.expose_app_in_browser=True", "--KernelManager.transport=ipc",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],  # CI containers run as root
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    url = None
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                url = url or _server_url(config / "runtime", server)
                if url is None:
                    raise ConnectionRefusedError("JupyterLab has not written its server file yet")
                request = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(request, timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; see {folder / 'jupyterlab.log'}", pytrace=False)
                time.sleep(0.5)
        yield {"url": url, "token": token, "folder": folder}
    finally:
        server.terminate()  # SIGTERM: JupyterLab shuts its kernels down and exits
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# The notebook panel JupyterLab shows, with its kernel: ready once the kernel is idle.
_READY = """
const app = window.jupyterapp, panel = app && app.shell.currentWidget;
const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
return kernel && panel.context.isReady && kernel.status === 'idle' ? kernel.name : null;
"""
_RUN_ALL = """
const done = arguments[arguments.length - 1];
window.jupyterapp.commands.execute('notebook:run-all-cells').then(ok => done({ok}), err => done({error: String(err)}));
"""
# Per code cell: execution count and the errors in its outputs (from the notebook model, as JupyterLab holds it).
_CELLS = """
const panel = window.jupyterapp.shell.currentWidget;
return panel.content.widgets.filter(c => c.model.type === 'code').map(c => ({
  count: c.model.executionCount, timing: c.model.getMetadata('execution') || {},
  errors: c.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)}));
"""


def _seconds(timing: dict) -> float | None:
    """A cell's run time from JupyterLab's recorded timing (ISO timestamps), if recorded."""
    from datetime import datetime

    begin, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(begin)).total_seconds() if begin and end else None


def test_quickstart_runs_in_jupyterlab(lab, browser_tools):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = browser_tools
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    start = time.monotonic()
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    timings = {}
    try:
        driver.set_script_timeout(300)
        driver.get(f"{lab['url']}/lab/tree/{NOTEBOOK}.ipynb?token={lab['token']}")
        kernel = WebDriverWait(driver, 120, poll_frequency=0.5).until(lambda d: d.execute_script(_READY))
        timings["open"] = time.monotonic() - start
        assert kernel == "python3"
        ran = driver.execute_async_script(_RUN_ALL)
        timings["run all"] = time.monotonic() - start - timings["open"]
        cells = driver.execute_script(_CELLS)
        timings |= {f"cell {i}": _seconds(c["timing"]) for i, c in enumerate(cells)}
        figures = WebDriverWait(driver, 60).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output svg.main-svg"))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", figures[0])
        time.sleep(0.5)
        driver.save_screenshot(str(lab["folder"] / f"{NOTEBOOK}.png"))
        errors = [e for c in cells for e in c["errors"]]
        assert not errors, f"cells show errors: {errors}"
        assert ran == {"ok": True}, ran
        assert all(c["count"] for c in cells), f"not every cell ran: {[c['count'] for c in cells]}"
        bars = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-hprogress")
        assert bars, "no progress bar rendered as a widget"
        labels = [" ".join(b.find_element(By.XPATH, "..").text.split()) for b in bars]  # tqdm pads with U+2007
        assert any(t.startswith("sample and judge: 100%") and "2/2" in t for t in labels), labels
        assert "Error displaying widget" not in driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
    finally:
        driver.quit()
        timings["total"] = time.monotonic() - start
        (lab["folder"] / "timings.json").write_text(
            json.dumps({k: v if v is None else round(v, 1) for k, v in timings.items()}, indent=1))
    assert (lab["folder"] / NOTEBOOK / "em_base_vs_finetuned.png").exists(), "save_figure wrote no static image"
