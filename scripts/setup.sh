#!/usr/bin/env bash
# Create .venv and install emlib with its pinned dependencies. Idempotent: a second run only checks.
#   CPU machine: torch==2.13.0 CPU build (set TORCH_INDEX_URL to a CPU wheel index if your pip would pick CUDA).
#   CUDA machine (nvidia-smi present): torch==2.13.0 CUDA build; `pip install -e .[gpu]` adds vLLM by hand.
#   Python: 3.11-3.14 (the pinned set has wheels for no other; see requirements.txt). PYTHON=python3.12 picks one.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Python versions the pinned set supports; pyproject.toml, environment.yml and the README say the same
# (tests/test_setup.py keeps them in agreement).
PY_MIN=3.11
PY_MAX=3.14
py_ok() { "$1" -c "import sys; sys.exit(not (${PY_MIN/./, }) <= sys.version_info[:2] <= (${PY_MAX/./, }))" 2>/dev/null; }
py_version() { "$1" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo "not found"; }
if [ -x .venv/bin/python ]; then
  if ! py_ok .venv/bin/python; then
    echo "setup: .venv has Python $(py_version .venv/bin/python); the pinned set needs Python $PY_MIN-$PY_MAX." >&2
    echo "setup: remove it (rm -rf .venv) and rerun with a supported one, e.g. PYTHON=python$PY_MIN make run" >&2
    exit 1
  fi
else
  if [ -z "${PYTHON:-}" ] && ! py_ok python3; then  # no choice made: take a supported python3.X from PATH
    for v in $(seq "${PY_MIN#3.}" "${PY_MAX#3.}"); do
      if command -v "python3.$v" >/dev/null && py_ok "python3.$v"; then
        echo "setup: python3 is $(py_version python3); using python3.$v"; PYTHON=python3.$v; break
      fi
    done
  fi
  PYTHON=${PYTHON:-python3}
  if ! py_ok "$PYTHON"; then
    cat >&2 <<EOF
setup: $PYTHON is Python $(py_version "$PYTHON"), but the pinned set (requirements.txt: numpy, scipy, pandas, torch
       builds) has wheels only for Python $PY_MIN-$PY_MAX. Use one of those:
  - an interpreter you have:  PYTHON=python$PY_MIN make run      (any of python$PY_MIN ... python$PY_MAX)
  - install one: uv python install $PY_MIN, pyenv install $PY_MIN, or your OS package (e.g. apt-get install python$PY_MIN)
  - or conda (environment.yml):  conda env create -f environment.yml && conda activate emlib && make run
EOF
    exit 1
  fi
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
stamp=.venv/.emlib-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"; exit 0
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: CUDA found, installing torch==2.13.0 (CUDA build)"
    "${PIP[@]}" torch==2.13.0
  else
    echo "setup: no CUDA, installing torch==2.13.0 (CPU build)"
    "${PIP[@]}" torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
# pip's "Location ... is ignored" lines about local wheel mirrors are noise: keep the log, show it on failure.
if ! "${PIP[@]}" -r requirements.txt > .venv/pip-install.log 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" .venv/pip-install.log; exit 1
fi
"${PIP[@]}" --no-deps -e .
# A named kernel inside .venv: JupyterLab (`make lab`) and VS Code list it as "emlib (.venv)", this interpreter.
# (papermill runs use the python3 kernel, which is the interpreter running papermill: the same one under make.)
.venv/bin/python -m ipykernel install --sys-prefix --name emlib --display-name "emlib (.venv)" >/dev/null
.venv/bin/python -c "import emlib, torch, transformers, peft, papermill; print('setup: ok, torch', torch.__version__)"
echo "$want" > "$stamp"
