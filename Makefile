# The two commands of the README: `make run` (set up, then the main job) and `make test` (set up, then the tests).
PY := .venv/bin/python
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test organism sync-notebooks bench clean

setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m emlib.run_notebooks

test: setup
	$(PY) -m pytest

organism: setup            ## rebuild data/persona-world from scratch (minutes on 2 cores)
	rm -rf data/persona-world/pretrained data/persona-world/base data/persona-world/adapters
	$(PY) -m emlib.world.organism build
	$(PY) -m emlib.world.organism adapters

bench: setup              ## every benchmark side by side -> runs/bench/summary.md + .csv (about 6-9 min; BENCH_ARGS=--quick)
	EMLIB_THREADS=$${EMLIB_THREADS:-1} HF_HUB_OFFLINE=1 $(PY) bench/run_all.py $(BENCH_ARGS)

sync-notebooks: setup      ## regenerate notebooks/*.ipynb from their paired notebooks/*.py (jupytext)
	$(PY) -m jupytext --sync notebooks/*.py

clean:
	rm -rf runs .pytest_cache
