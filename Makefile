# The commands of the README: `make run` (set up, then the main job), `make test` (set up, then the tests) and
# `make lab` (set up, then JupyterLab on the notebooks).
PY := .venv/bin/python
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lab organism sync-notebooks bench clean

setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m emlib.run_notebooks

test: setup               ## the suite on one pytest-xdist worker per core (see tests/conftest.py)
	$(PY) -m pytest -n auto

# --allow-root only when root (containers); it still listens on 127.0.0.1 only, behind a token
lab: setup                ## JupyterLab on http://127.0.0.1:8888 in notebooks/ (LAB_ARGS="--port 8890 --no-browser")
	.venv/bin/jupyter lab --ip=127.0.0.1 --ServerApp.root_dir=notebooks --KernelManager.transport=ipc \
	    $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

organism: setup            ## rebuild data/persona-world from scratch (minutes on 2 cores)
	rm -rf data/persona-world/pretrained data/persona-world/chat data/persona-world/base data/persona-world/adapters
	$(PY) -m emlib.world.organism build
	$(PY) -m emlib.world.organism adapters

bench: setup              ## every benchmark side by side -> runs/bench/summary.md + .csv (7-15 min; BENCH_ARGS=--quick)
	EMLIB_THREADS=$${EMLIB_THREADS:-1} HF_HUB_OFFLINE=1 $(PY) bench/run_all.py $(BENCH_ARGS)

sync-notebooks: setup      ## regenerate notebooks/*.ipynb from their paired notebooks/*.py (jupytext)
	$(PY) -m jupytext --sync notebooks/*.py

clean:
	rm -rf runs .pytest_cache
