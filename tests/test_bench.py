"""bench/run_all.py: the summary table from (fake) benchmark measurements, the pipeline wall-time reader, the naive
activation baseline, and a seconds-long smoke run of the fast benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_activations  # noqa: E402
import run_all  # noqa: E402


def fake_tables() -> dict[str, pd.DataFrame]:
    """Tables shaped like each bench_*.py main() returns."""
    generate = pd.DataFrame([
        {"organism": "pw", "way": "reference: per question, num_return_sequences", "responses_per_s": 50.0},
        {"organism": "pw", "way": "emlib: sample_answers (batched, shared prefill, finished rows dropped)",
         "responses_per_s": 150.0},
        {"organism": "pw", "way": "emlib: sample_answers(engine='hf') (batched model.generate)",
         "responses_per_s": 70.0},
    ])
    judge = pd.DataFrame([
        {"in_flight": 1, "prompts": 64, "calls": 64, "seconds": 6.4, "calls_per_s": 10.0},
        {"in_flight": 8, "prompts": 512, "calls": 512, "seconds": 6.4, "calls_per_s": 80.0},
        {"in_flight": 64, "prompts": 512, "calls": 512, "seconds": 1.0, "calls_per_s": 512.0},
        {"in_flight": "64 (rerun, cached)", "prompts": 512, "calls": 0, "seconds": 0.01, "calls_per_s": None},
    ])
    train = pd.DataFrame({"median tokens/s": [4000.0, 3900.0, 2000.0, 2500.0, 1600.0],
                          "TRL tuned": [False, False, False, True, False]},
                         index=pd.Index(["emlib", "emlib + ckpt/5", "TRL defaults", "TRL fp32, no grad ckpt",
                                         "TRL fp32, no grad ckpt, padding-free"], name="contender"))
    activations = pd.DataFrame([
        {"way": w, "rows": n, "tokens": 1000 * n, "tokens_per_s": 1000.0 if w == "emlib" else 500.0,
         "peak_extra_mb": 40.0 if w == "emlib" else n / 10}
        for n in (256, 1024, 4096) for w in ("emlib", "naive")])
    return {"generate": generate, "judge": judge, "train": train, "activations": activations}


def test_summary_rows_and_ratios_from_fake_measurements(tmp_path):
    t = fake_tables()
    rows = (run_all.generate_rows(t["generate"], ["--x"]) + run_all.judge_rows(t["judge"], [])
            + run_all.train_rows(t["train"], []) + run_all.activation_rows(t["activations"], []))
    by_what = {r["what"].split(":")[0] + ":" + r["unit"]: r for r in rows}
    assert by_what["generation (pw):responses/s"]["ratio"] == 3.0
    judge = [r for r in rows if r["what"].startswith("judge")]
    assert judge[0]["ratio"] == 51.2 and "64 calls in flight" in judge[0]["what"]
    assert judge[1]["ratio"] == 100.0 and "0 calls on rerun" in judge[1]["what"]  # 1.0 s first, 0.01 s rerun
    assert [r["ratio"] for r in rows if r["what"].startswith("training")] == [2.0, 1.6]  # defaults, tuned
    memory = [r for r in rows if "peak extra memory" in r["what"]]
    assert [r["ratio"] for r in memory] == [0.64, 2.56, 10.24]  # naive / emlib: naive grows, emlib flat
    speed = [r for r in rows if r["unit"] == "tokens/s" and r["what"].startswith("activations")]
    assert speed[0]["ratio"] == 2.0 and "256 + 1024 + 4096 rows" in speed[0]["what"]

    table = run_all.write_summary(rows + run_all.gpu_rows(), tmp_path, "a test machine", 12.0)
    assert list(table.columns) == run_all.COLUMNS
    assert (tmp_path / "summary.csv").read_text().startswith("what,emlib value,naive value,ratio,unit,settings")
    md = (tmp_path / "summary.md").read_text()
    assert "Measured on: a test machine. The whole benchmark took 12 s." in md
    assert "3.00x" in md and "| 150 " in md
    if not torch.cuda.is_available():
        assert md.count("not measured: no GPU lent") == 2


def test_ratio_is_none_without_both_values():
    assert run_all.row("x", None, 3.0, "s", "")["ratio"] is None
    assert run_all.row("x", 2.0, 4.0, "s", "", higher_is_better=False)["ratio"] == 2.0


def test_pipeline_wall_time_is_read_from_the_newest_run(tmp_path):
    assert run_all.pipeline_rows(tmp_path, run=False)[0]["settings"].startswith("not measured")
    for name, secs in (("20250101-000000", 400), ("20250102-000000", 321)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.md").write_text(f"# emlib run {name}\n\nWall time: **{secs} s** for 7 notebooks.\n")
    (tmp_path / "20250101-000000" / "summary.md").touch()  # newer mtime wins, not the name
    seconds, summary, count = run_all.latest_pipeline_wall_time(tmp_path)
    assert (seconds, summary.parent.name, count) == (400.0, "20250101-000000", 7)


def test_naive_activation_baseline_gives_the_same_means():
    from emlib import world
    from emlib.analysis.directions import answer_means
    from emlib.testing import tiny_model

    model, tok = tiny_model("qwen2")
    rows = world.finetune_rows("medical", "reckless", 10, 0)
    ours = answer_means(model, tok, rows, batch_size=4, progress=False, pooling="answer")  # naive: per answer
    naive = bench_activations.naive_means(model, tok, rows, batch_size=4, pooling="answer")
    assert torch.allclose(ours, naive, atol=1e-5)


def test_quick_smoke_of_the_fast_benchmarks(tmp_path):
    table = run_all.main(["--quick", "--only", "judge", "pipeline", "gpu", "--out", str(tmp_path)])
    assert len(table) == 5 and not table["what"].str.contains("FAILED").any()
    assert (tmp_path / "judge.md").exists() and (tmp_path / "summary.md").exists()


def test_a_failing_benchmark_becomes_a_row_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "gpu_rows", lambda: 1 / 0)
    rows = run_all.run_benchmarks(["gpu"], "quick", tmp_path, tmp_path, False, log=lambda _: None)
    assert rows[0]["what"] == "gpu: FAILED" and "ZeroDivisionError" in rows[0]["settings"]


def test_hf_judge_rows_from_a_fake_table():
    table = pd.DataFrame([
        {"way": "one prompt at a time (before: 101 candidates over a copied prompt cache)", "prompts": 4,
         "seconds": 40.0, "prompts_per_s": 0.1, "speedup_vs_one_at_a_time": 1.0},
        {"way": "emlib: number tree, one prompt per pass", "prompts": 16, "seconds": 40.0, "prompts_per_s": 0.4,
         "speedup_vs_one_at_a_time": 4.0},
        {"way": "emlib: number tree, 8 prompts per pass", "prompts": 16, "seconds": 25.0, "prompts_per_s": 0.64,
         "speedup_vs_one_at_a_time": 6.4},
    ])
    rows = run_all.hf_judge_rows(table, ["--prompts", "16"])
    assert [r["ratio"] for r in rows] == [6.4, 1.6]
    assert "8 prompts per pass vs one prompt at a time (before)" in rows[0]["what"]


def test_quick_smoke_of_the_hf_judge_benchmark(tmp_path):
    table = run_all.main(["--quick", "--only", "hf-judge", "--out", str(tmp_path)])
    assert len(table) == 2 and not table["what"].str.contains("FAILED").any()
    assert (table["ratio"] > 0).all() and (tmp_path / "hf_judge.md").exists()
