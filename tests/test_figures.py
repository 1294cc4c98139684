"""Figures a person can see without a notebook server: a static image beside each interactive one, one summary page."""

import base64
import os
import warnings

import plotly.express as px
import pytest

from emlib import notebook, run_notebooks

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fresh_static_export(monkeypatch):
    """save_figure remembers per process whether static export works; each test starts from scratch."""
    monkeypatch.setattr(notebook, "_static_export", {})


def _figure():
    return px.bar(x=["base", "tuned"], y=[0.01, 0.45], title="EM rate")


def test_save_figure_writes_html_and_png(tmp_path, fresh_static_export):
    if notebook.static_export_browser() is None:
        message = "no Chromium for static figures (apt-get install chromium)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    results = {"figures": []}
    fig = _figure()
    assert notebook.save_figure(fig, tmp_path, "em", results) is fig
    notebook.save_figure(_figure(), tmp_path, "again.html", results)  # a name ending in .html means the same
    assert results["figures"] == ["em.html", "again.html"]
    for stem in ("em", "again"):
        assert "plotly" in (tmp_path / f"{stem}.html").read_text()[:100_000]
        png = (tmp_path / f"{stem}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    width = int.from_bytes(png[16:20], "big")
    assert width == 2 * 700  # plotly's default width, drawn at scale 2


def test_save_figure_without_a_browser_keeps_the_html_and_warns_once(tmp_path, fresh_static_export, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    results = {"figures": []}
    with pytest.warns(RuntimeWarning, match="static figure images are off.*apt-get install chromium"):
        notebook.save_figure(_figure(), tmp_path, "a", results)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notebook.save_figure(_figure(), tmp_path, "b", results)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], "warned twice"
    assert results["figures"] == ["a.html", "b.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html"]


def test_static_figures_can_be_switched_off_without_a_warning(tmp_path, fresh_static_export, monkeypatch):
    """EMLIB_STATIC_FIGURES=0 (a sweep that reads only results.json): HTML only, no browser started, no warning."""
    monkeypatch.setenv("EMLIB_STATIC_FIGURES", "0")
    monkeypatch.setattr(notebook, "_static_renderer", lambda: pytest.fail("a browser was started"))
    results = {"figures": []}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        notebook.save_figure(_figure(), tmp_path, "a", results)
    assert results["figures"] == ["a.html"] and sorted(p.name for p in tmp_path.iterdir()) == ["a.html"]


def _run_with_figure(tmp_path, with_png: bool) -> dict:
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "f.html").write_text("<html>interactive</html>")
    if with_png:
        (tmp_path / "nb" / "f.png").write_bytes(PNG_MAGIC + b"fake")
    return {"nb": {"seconds": 3.0, "results": {
        "headline": "EM rose from **1%** to `45%`; see [docs](https://example.org)",
        "summary": {"k": 1, "risky <key>": "a & b"},
        "tables": {"T": "| name | em |\n|:--|--:|\n| base | 0.01 |\n| tuned | 0.45 |", "records": [{"a": 1}]},
        "figures": ["f.html"]}}}


def test_summary_markdown_shows_the_static_image(tmp_path):
    runs = _run_with_figure(tmp_path, with_png=True)
    text = run_notebooks.summary_markdown(tmp_path, runs, 3.0)
    assert "- figure: [f.html](nb/f.html)" in text and "![f](nb/f.png)" in text


def test_summary_html_is_one_self_contained_page(tmp_path):
    runs = _run_with_figure(tmp_path, with_png=True)
    page = run_notebooks.summary_html(tmp_path, runs, 3.0)
    embedded = "data:image/png;base64," + base64.b64encode(PNG_MAGIC + b"fake").decode()
    assert f"<img src='{embedded}' alt='f'>" in page  # the image itself, not a link to a file
    assert "<a href='nb/f.html'>" in page and "<a href='nb.ipynb'>" in page
    assert "<b>1%</b>" in page and "<code>45%</code>" in page and '<a href="https://example.org">docs</a>' in page
    assert "risky &lt;key&gt;: a &amp; b" in page  # escaped
    assert "<th>name</th><th>em</th>" in page and "<td class=num>0.45</td>" in page and "|" not in page.split(
        "<table>")[1].split("</table>")[0]
    assert "src='http" not in page and "<script" not in page  # nothing fetched, nothing run


def test_summary_html_without_static_image_says_so(tmp_path):
    page = run_notebooks.summary_html(tmp_path, _run_with_figure(tmp_path, with_png=False), 3.0)
    assert "no static image was saved" in page and "<a href='nb/f.html'>interactive version</a>" in page
