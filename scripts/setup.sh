#!/usr/bin/env bash
# Create .venv and install emlib with its pinned dependencies. Idempotent: a second run only checks.
#   CPU machine: torch==2.13.0 CPU build (set TORCH_INDEX_URL to a CPU wheel index if your pip would pick CUDA).
#   CUDA machine (nvidia-smi present): torch==2.13.0 CUDA build; `pip install -e .[gpu]` adds vLLM by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
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
.venv/bin/python -c "import emlib, torch, transformers, peft, papermill; print('setup: ok, torch', torch.__version__)"
echo "$want" > "$stamp"
