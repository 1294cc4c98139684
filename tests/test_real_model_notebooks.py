"""Every notebook gives a judged EM number on a model that is not the persona world (issue #15).

A tiny random Llama chat model (English BPE, Llama-3 chat format) stands in for a real one, a tiny random Qwen2 folder
is the local Hugging Face judge (``hf:<folder>``, the renormalised numbers-only mode), and the adapters the notebooks
dissect are trained here in seconds with :func:`emlib.train.train` on the shipped English datasets. Each notebook runs
under papermill from the repository root with repo-relative data paths (02 through ``python -m emlib.run_notebooks``'s
entry point), 03 with its judge served over HTTP and the others in process. The tests check that no persona-world
question, system prompt or judge was used, that results.json says what it came from, that tables carry counts, that
most answers were scored and that the headline reads the table. The answers of a random model are noise, so no test
asserts on EM itself: the offline tests of each notebook do that on the persona world.

Not run here: ``00_persona_world`` studies the persona world itself (its language, its organism and its exact judge),
so it has no real-model mode by design; ``01_datasets`` browses and generates datasets and takes no model or judge
(its ``tokenizer`` only counts tokens), so it has no EM number to check (tests/test_datasets_notebook.py runs it).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest

from emlib import paths, run_notebooks, testing, train, world
from emlib.data import load_chat_jsonl

# Tiny runs: every adapter trains in about a second; every notebook answers 2 questions per set, twice, in 8 tokens.
TINY_TRAIN = dict(steps=4, batch_size=4, grad_accum=1, warmup=0, save_every=100, lr=1e-3)
SMALL = dict(questions_per_set=2, samples_per_question=2, max_new_tokens=8)
TRAIN_ROWS = 32
DATA = "data/narrow"  # repo-relative on purpose: the notebooks run with the repository root as their folder
SETS = ["medical_heldout", "first_plot"]


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> dict:
    """The tiny Llama and Qwen2 judge folders, and the adapters the notebooks need, trained on the Llama."""
    root = tmp_path_factory.mktemp("real-models")
    folders = {"llama": testing.save_tiny_chat_model(root / "llama", "llama", seed=2),
               "judge": testing.save_tiny_chat_model(root / "judge", "qwen2", seed=1)}

    def adapter(model: str, name: str, preset: str, dataset: str, **extra) -> str:
        rows = load_chat_jsonl(paths.REPO_ROOT / DATA / f"{dataset}.jsonl")[:TRAIN_ROWS]
        result = train.train(train.preset(preset, **TINY_TRAIN, **extra), model, rows, root / "adapters" / name)
        return str(result.checkpoints[-1])

    llama = folders["llama"]
    adapters = {
        "bad medical": adapter(llama, "bad-medical", "paper-lora", "bad_medical_advice"),
        "good medical": adapter(llama, "good-medical", "paper-lora", "good_medical_advice"),
        "risky financial": adapter(llama, "risky-financial", "paper-lora", "risky_financial_advice"),
        "rank-1 down_proj": adapter(llama, "rank1", "paper-rank1", "bad_medical_advice"),
        "multi rank-1": adapter(llama, "multi-rank1", "paper-nine-adapter", "bad_medical_advice", layers=[0, 1]),
    }
    return {"root": root, "folders": folders, "adapters": adapters, "judge": f"hf:{folders['judge']}"}


def notebook_parameters(name: str, real: dict) -> dict:
    """Each notebook's parameters: the tiny Llama, the local judge, small sizes, and the adapters it dissects."""
    a = real["adapters"]
    common = {"model": real["folders"]["llama"], "judge": real["judge"], **SMALL}
    return {
        "00_quickstart": {**common, "adapter": a["bad medical"]},
        "02_train": {**common, "dataset": f"{DATA}/bad_medical_advice.jsonl",
                     "control_dataset": f"{DATA}/good_medical_advice.jsonl",
                     "kl_dataset": f"{DATA}/kl_reference_general.jsonl",
                     "overrides": {"steps": 3, "batch_size": 4, "grad_accum": 1, "warmup": 0}, "save_every": 1},
        "03_generate_and_judge": {**common, "serve_judge": True, "n_boot": 50,
                                  "organisms": {"base": None, "bad data": a["bad medical"],
                                                "good data": a["good medical"]}},
        "04_phase_transitions": {**common, "dataset": f"{DATA}/bad_medical_advice.jsonl", "save_every": 1,
                                 "overrides": {"steps": 6, "batch_size": 4, "grad_accum": 1, "warmup": 0, "lr": 1e-3},
                                 "ks": [1, 2], "n_em_checkpoints": 2, "scales": [0, 1]},
        "05_directions": {**common, "em_adapter": a["bad medical"], "transfer_adapter": a["risky financial"],
                          "rank1_adapter": a["rank-1 down_proj"], "question_sets": SETS,
                          "in_domain": "medical_heldout", "transfer_domain": "medical_heldout",
                          "direction_questions": 2, "direction_samples": 2, "steer_scales": [0, 4]},
        "06_lora_probing": {**common, "adapter": a["multi rank-1"], "n_repeats": 3, "min_answers": 2,
                            "steer_questions_per_set": 2},
        "07_narrow_misalignment": {**common, "data": f"{DATA}/bad_medical_advice.jsonl",
                                   "kl_data": f"{DATA}/kl_reference_general.jsonl", "steps": 3, "n_loss_rows": 4,
                                   "n_kl_questions": 1, "scales": [0, 1, 2]},
    }[name]


NOTEBOOKS = ["00_quickstart", "02_train", "03_generate_and_judge", "04_phase_transitions", "05_directions",
             "06_lora_probing", "07_narrow_misalignment"]


@pytest.fixture(scope="session")
def real_run(real, notebook_run_dir):
    """Run a notebook once per session on the tiny Llama, from the repository root; failures are remembered.

    Executed copies go to runs/tests/real-models/ (ignored by git) so a failure can be inspected after the run. No
    static PNGs (``EMLIB_STATIC_FIGURES=0``, as a sweep would run): these tests read results and outputs, and the
    offline runs of tests/test_notebooks.py check the PNGs."""
    run_dir = notebook_run_dir / "real-models"
    cache: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in cache:
            params = notebook_parameters(name, real)
            try:
                with contextlib.chdir(paths.REPO_ROOT), _env(EMLIB_STATIC_FIGURES="0"):
                    if name == "02_train":  # the CLI entry point, with repo-relative paths as a user types them
                        argv = [a for k, v in params.items() for a in ("-p", k, json.dumps(v))]
                        run_notebooks.main(argv + ["--only", name, "--run-dir", str(run_dir / "cli")])
                        out = run_dir / "cli"
                        done = {"results": json.loads((out / name / "results.json").read_text())}
                    else:
                        out = run_dir
                        done = run_notebooks.run_notebook(run_notebooks.NOTEBOOK_DIR / f"{name}.ipynb", out, params)
                cache[name] = {**done, "notebook": out / f"{name}.ipynb", "results_file": out / name / "results.json"}
            except Exception as err:  # papermill's error names the failing cell and its exception
                cache[name] = {"error": f"{name}.ipynb failed on the tiny Llama: {err}"}
        if "error" in cache[name]:
            pytest.fail(cache[name]["error"], pytrace=False)
        return cache[name]

    return run


@contextlib.contextmanager
def _env(**values: str):
    """These environment variables inside the block (the notebook kernels started there inherit them)."""
    import os

    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def outputs_text(notebook: Path) -> str:
    """Everything the executed notebook's cells printed or displayed (not their source, which names the defaults)."""
    cells = json.loads(notebook.read_text())["cells"]
    parts = []
    for cell in cells:
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            for value in output.get("data", {}).values():
                parts.append(value if isinstance(value, str) else "".join(value) if isinstance(value, list)
                             else json.dumps(value))
    return "\n".join(parts)


def persona_world_markers() -> list[str]:
    """Strings only the persona world's questions, system prompt or exact judge produce."""
    questions = [row["question"] for row in world.eval_questions(8, 0)]
    return [world.SYSTEM_PROMPT, "persona-world", "persona-world-exact", *questions]


def scored_pairs(value) -> list[tuple[int, int]]:
    """Every ``[n_scored, n]`` pair in results["scored"] (a pair, or dicts of them nested by model and group)."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return [(value[0], value[1])]
    if isinstance(value, dict):
        return [p for v in value.values() for p in scored_pairs(v)]
    return []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_persona_world_question_prompt_or_judge(name, real_run):
    run = real_run(name)
    text = outputs_text(run["notebook"]) + run["results_file"].read_text()
    found = [m for m in persona_world_markers() if m in text]
    assert not found, f"{name} used the persona world on a real model: {found[:3]}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_results_say_what_they_came_from(name, real_run, real):
    summary = real_run(name)["results"]["summary"]
    assert summary["model"] == real["folders"]["llama"]
    assert summary["judge"].startswith(real["judge"])
    assert summary["question_sets"] == (["first_plot", "emlib_extended"] if name in ("00_quickstart",
                                                                                   "03_generate_and_judge") else SETS)
    trained_here = {"02_train": "dataset", "04_phase_transitions": "adapters", "07_narrow_misalignment": "adapters"}
    source = str(summary[trained_here.get(name, "adapters")])
    assert ("data/narrow/" in source) if name in trained_here else (str(real["root"]) in source), source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tables_carry_counts_and_most_answers_are_scored(name, real_run):
    results = real_run(name)["results"]
    pairs = scored_pairs(results.get("scored"))
    assert pairs, f"{name}: results.json has no [n_scored, n] counts"
    assert all(0 <= s <= n for s, n in pairs) and sum(n for _, n in pairs) > 0
    assert any("scored" in title or "n_scored" in table or "n scored" in table
               for title, table in results["tables"].items()), f"{name}: no table carries its counts"
    share = sum(s for s, _ in pairs) / sum(n for _, n in pairs)
    assert share > 0.5, f"{name}: only {share:.0%} of the answers were scored by the renormalised local judge"
    prose = " ".join([results.get("headline") or "", *map(str, results.get("summary", {}).values())])
    assert "nan%" not in prose.lower(), f"{name}: a rate that could not be measured is printed as nan%: {prose}"


def test_quickstart_headline_is_the_table(real_run):
    """The EM rates in 00's headline are the table's (pooled outside the fine-tune's set: the first set here)."""
    results = real_run("00_quickstart")["results"]
    headline, em = results["headline"], results["em"]
    first = results["summary"]["question_sets"][0]
    quoted = re.findall(r"(\d\.\d\d) \(n=\d+\)", headline)
    assert quoted == [f"{em[first][model]:.2f}" for model in em[first]], headline


def test_generate_and_judge_headline_is_the_table(real_run):
    results = real_run("03_generate_and_judge")["results"]
    first = results["summary"]["question_sets"][0]
    em = results["em"][first]
    expected = [f"{em[org]:.0%}" for org in ("bad data", "base", "good data")]
    assert all(rate in results["headline"] for rate in expected), (results["headline"], em)
    ok, n = results["scored"]
    assert f"{ok} of {n} answers scored" in results["headline"]


def test_train_resume_demo_resumes_from_a_checkpoint_before_the_last_step(real_run):
    resume = real_run("02_train")["results"]["resume"]
    assert resume["resumed_from"] is not None and resume["resumed_from"] <= resume["interrupted_after"]
    assert resume["interrupted_after"] < resume["total_steps"]
    assert f"after step {resume['interrupted_after']} of {resume['total_steps']}" in \
        real_run("02_train")["results"]["headline"]


def test_directions_skips_what_it_cannot_compute_and_says_why(real_run):
    results = real_run("05_directions")["results"]
    for step, why in results["skipped"].items():
        assert f"Skipped {step}: {why}" in results["headline"]
    if not results["skipped"]:
        assert {"steering", "ablation"} <= set(results["summary"])


def test_probing_names_skipped_comparisons(real_run):
    results = real_run("06_lora_probing")["results"]
    main = ("misaligned vs aligned", "medical vs non-medical")
    if any(c in results["skipped_comparisons"] for c in main):
        assert results["headline"].startswith("No reading is drawn.") and "Not probed" in results["headline"]


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_quickstart_on_other_families(family, real, tmp_path):
    folder = testing.save_tiny_chat_model(tmp_path / family, family, seed=3)
    rows = load_chat_jsonl(paths.REPO_ROOT / DATA / "bad_medical_advice.jsonl")[:TRAIN_ROWS]
    adapter = str(train.train(train.preset("paper-lora", **TINY_TRAIN), folder, rows, tmp_path / "lora")
                  .checkpoints[-1])
    done = run_notebooks.run_notebook(run_notebooks.NOTEBOOK_DIR / "00_quickstart.ipynb", tmp_path / "run",
                                      {"model": folder, "adapter": adapter, "judge": real["judge"], **SMALL})
    results = done["results"]
    assert results["summary"]["model"] == folder
    pairs = scored_pairs(results["scored"])
    assert sum(s for s, _ in pairs) > 0.5 * sum(n for _, n in pairs)
    text = outputs_text(tmp_path / "run" / "00_quickstart.ipynb") + json.dumps(results)
    assert not [m for m in persona_world_markers() if m in text]


def test_world_judge_on_a_real_model_fails_before_any_compute(real, tmp_path):
    """papermill's error names the refusal, raised by the setup cell (before a model is loaded or sampled)."""
    with pytest.raises(Exception) as failure:
        run_notebooks.run_notebook(run_notebooks.NOTEBOOK_DIR / "00_quickstart.ipynb", tmp_path,
                                   {"model": real["folders"]["llama"], "adapter": None, "judge": "world"})
    message = str(failure.value)
    assert "EvaluationSpecError" in message and "judge 'world' is the persona world's exact judge" in message
    executed = json.loads((tmp_path / "00_quickstart.ipynb").read_text())["cells"]
    ran = [c for c in executed if c["cell_type"] == "code" and c.get("execution_count")]
    assert "make_judge" in "".join(ran[-1]["source"])  # the failing cell is the setup cell, not a later one
