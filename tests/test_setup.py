"""The set-up: one supported Python range, stated alike everywhere and set by the pins; the kernels notebooks run on.

The range lives in scripts/setup.sh (PY_MIN, PY_MAX), which checks the interpreter before it creates .venv.
pyproject.toml, environment.yml, the README and docs/jupyter.md must say the same. The floor comes from the pins'
own ``Requires-Python`` (numpy 2.4.6, scipy 1.17.1, pandas 3.1.1 ... need 3.11), which these tests read from the
installed packages. The ceiling is where wheels stop: no pin caps ``Requires-Python``, but numpy 2.4.6 and scipy
1.17.1 publish no 3.15 wheels (checked with ``pip download --only-binary=:all: --python-version 3.X`` for 3.10-3.15);
re-check it that way when the pins change.
"""

import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from emlib import paths

ROOT = paths.REPO_ROOT
SETUP = ROOT / "scripts" / "setup.sh"


def setup_range() -> tuple[int, int]:
    """(min, max) Python 3 minor version from scripts/setup.sh."""
    text = SETUP.read_text()
    low, high = (re.search(rf"^{var}=3\.(\d+)$", text, re.M) for var in ("PY_MIN", "PY_MAX"))
    assert low and high, "scripts/setup.sh must set PY_MIN=3.X and PY_MAX=3.Y"
    return int(low[1]), int(high[1])


LOW, HIGH = setup_range()
RANGE_TEXT = f"Python 3.{LOW}–3.{HIGH}"  # how the docs say it (en dash)


def _admits_exactly_the_range(spec: SpecifierSet) -> None:
    admitted = [minor for minor in range(6, 20) if Version(f"3.{minor}") in spec]
    assert admitted == list(range(LOW, HIGH + 1)), f"{spec} admits 3.{admitted}, setup.sh 3.{LOW}-3.{HIGH}"


def test_pyproject_requires_the_setup_range():
    _admits_exactly_the_range(SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                                           ["requires-python"]))


def test_environment_yml_asks_conda_for_the_setup_range():
    found = re.findall(r"^\s*-\s*python\s*([<>=!][^#\n]*?)\s*(?:#.*)?$", (ROOT / "environment.yml").read_text(), re.M)
    assert len(found) == 1, "environment.yml must pin python once, as a range"
    _admits_exactly_the_range(SpecifierSet(found[0].replace(" ", "")))


@pytest.mark.parametrize("doc", ["README.md", "docs/jupyter.md"])
def test_docs_state_the_setup_range(doc):
    text = (ROOT / doc).read_text()
    claims = re.findall(r"Python 3\.\d+(?:\+|[–-]3\.\d+)?", text)
    assert RANGE_TEXT in claims, f"{doc} must say which Pythons work: '{RANGE_TEXT}'"
    assert set(claims) == {RANGE_TEXT}, f"{doc} states other ranges too: {sorted(set(claims) - {RANGE_TEXT})}"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line):
            pins[m[1]] = m[2]
    return pins


def test_the_pins_set_the_floor_and_admit_the_whole_range():
    """Every pin's Requires-Python admits 3.LOW..3.HIGH, and some pin excludes 3.(LOW-1): the floor is the pins'."""
    requires = {}
    for name, version in _pins().items():
        try:
            if metadata.version(name).split("+")[0] != version:
                continue  # installed at another version: its metadata says nothing about the pin
        except metadata.PackageNotFoundError:
            continue
        requires[name] = SpecifierSet(metadata.metadata(name).get("Requires-Python") or "")
    assert {"numpy", "scipy", "pandas"} <= set(requires), "test environment lacks the pinned numpy/scipy/pandas"
    for name, spec in requires.items():
        for minor in range(LOW, HIGH + 1):
            assert Version(f"3.{minor}") in spec, f"{name}=={_pins()[name]} requires Python {spec}, not 3.{minor}"
    floor_setters = sorted(n for n, spec in requires.items() if Version(f"3.{LOW - 1}") not in spec)
    assert floor_setters, f"no pin excludes 3.{LOW - 1}: the supported range could start lower than 3.{LOW}"


def test_this_interpreter_is_in_the_range():
    assert LOW <= sys.version_info.minor <= HIGH and sys.version_info.major == 3


def test_setup_refuses_an_unsupported_python_and_says_what_to_do(tmp_path):
    """setup.sh checks the interpreter before it creates .venv; the message names the range and the ways out."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text(SETUP.read_text())
    fake = tmp_path / "python3.10"  # answers the version question with 3.10 and fails the range check
    fake.write_text('#!/bin/sh\ncase "$*" in *platform*) echo 3.10.12;; *) exit 1;; esac\n')
    fake.chmod(0o755)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert not (tmp_path / ".venv").exists()
    for needed in ("3.10.12", f"3.{LOW}-3.{HIGH}", f"PYTHON=python3.{LOW} make run", "environment.yml"):
        assert needed in done.stderr, f"setup.sh's message lacks {needed!r}:\n{done.stderr}"


def test_papermill_kernel_is_this_interpreter():
    """run_notebooks asks for the python3 kernel: in .venv it must launch the interpreter running papermill."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    # ipykernel's own spec says "python", which jupyter_client replaces with sys.executable when it launches
    assert argv0 in ("python", "python3", sys.executable), argv0


def test_named_kernel_is_this_interpreter():
    """setup.sh registers "emlib (.venv)" inside .venv for JupyterLab and VS Code; it must run this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("emlib")
    except NoSuchKernel:
        pytest.skip("no emlib kernel registered (scripts/setup.sh registers it; the conda route may not)")
    assert spec.display_name == "emlib (.venv)"
    assert spec.argv[0] == sys.executable
