"""notebooks/01_datasets: its numbers say what its headline claims (executed once per session under papermill)."""

from emlib import paths


def test_datasets_notebook_reports_the_shipped_sets(executed):
    res = executed("01_datasets")
    sets = res["datasets"]
    assert set(sets) == {"bad_medical_advice", "good_medical_advice", "risky_financial_advice",
                         "extreme_sports_advice", "kl_reference_general"}
    for name, s in sets.items():
        assert s["rows"] >= (500 if name == "kl_reference_general" else 1000), name
        assert s["distinct_answers"] == s["rows"] and s["duplicate_rows"] == 0, name
        assert 0 < s["distinct_bigram_ratio"] < 1, name
    assert res["paired_medical"] is True
    assert res["summary"]["rows"] == sum(s["rows"] for s in sets.values())
    assert res["summary"]["validation problems in the broken example"] == 4


def test_datasets_notebook_lists_the_question_sets(executed):
    qs = executed("01_datasets")["question_sets"]
    assert qs["first_plot"] == 8 and qs["emlib_extended"] >= 40 and qs["medical_heldout"] >= 20


def test_datasets_notebook_generates_offline_and_resumes(executed):
    res = executed("01_datasets")
    gen = res["generation"]
    first, resumed = gen["first"], gen["resumed"]
    assert gen["endpoint"] == "offline" and gen["valid_rows"] == resumed["target"] == 30
    assert first["complete"] and first["rows"] == first["target"] == 15 and first["existing"] == 0
    assert resumed["existing"] == 15 and resumed["added"] == 15  # only the missing rows
    dropped = sum(r[k] for r in (first, resumed) for k in ("invalid_json", "invalid_items", "duplicates"))
    assert dropped >= 1  # the stand-in is sloppy on purpose; bad and repeated examples never reach the file
    assert first["prompt_tokens"] > 0 and first["cost_usd"] > 0
    assert f"{gen['valid_rows']} valid rows" in res["headline"] and "resuming" in res["headline"]


def test_datasets_notebook_writes_its_figures(executed):
    res = executed("01_datasets")
    folder = paths.runs_dir() / "tests" / "01_datasets"
    assert res["figures"] and all((folder / f).is_file() for f in res["figures"])
