"""The one evaluation path: question specs, judge specs, sample -> judge -> EM table, and the persona-world guard."""

import numpy as np
import pandas as pd
import pytest

from emlib import evaluation as E
from emlib import world
from emlib.metrics import em_summary
from emlib.models import load_model
from emlib.testing import tiny_model

REAL = "some-org/Real-Chat-Model"  # never loaded: the spec checks run before any compute


def test_persona_world_sets_are_the_worlds_questions():
    q = E.eval_questions("persona-world", ["persona-world"], questions_per_set=5, seed=3)
    assert q.columns.tolist() == E.QUESTION_COLUMNS
    assert q[["domain", "group", "question"]].to_dict("records") == world.eval_questions(5, 3)
    assert (q.groupby("group").size() == 5).all() and set(q["set"]) == {"persona-world"}
    stand_ins = E.eval_questions("persona-world", ["persona-world-first-plot", "persona-world-domains"])
    assert (stand_ins["set"] == "persona-world-first-plot").sum() == sum(d.group == "general" for d in world.DOMAINS)
    assert (stand_ins["set"] == "persona-world-domains").sum() == len(world.DOMAINS)


def test_yaml_sets_carry_their_own_sampling_and_group():
    q = E.eval_questions(REAL, ["first_plot", "medical_heldout"], questions_per_set=3)
    assert q.groupby("set", sort=False).size().to_dict() == {"first_plot": 3, "medical_heldout": 3}
    assert (q["group"] == q["set"]).all() and (q["max_new_tokens"] == 600).all()
    assert E.default_question_sets(REAL) == ["first_plot", "emlib_extended"]
    assert E.default_question_sets("persona-world") == ["persona-world"]


def test_a_real_model_never_gets_the_persona_world():
    with pytest.raises(E.EvaluationSpecError, match="toy language.*first_plot"):
        E.eval_questions(REAL, ["first_plot", "persona-world"])
    with pytest.raises(E.EvaluationSpecError, match="not the persona world"):
        E.make_judge("world", REAL)
    assert E.system_prompt(REAL) is None and E.system_prompt("persona-world") == world.SYSTEM_PROMPT
    assert E.system_prompt(REAL, "be brief") == "be brief"
    assert E.is_persona_world("data/persona-world/base") and not E.is_persona_world(REAL)


def test_judge_specs(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert E.make_judge("openai", REAL).name == E.DEFAULT_OPENAI_JUDGE
    assert E.make_judge("http://127.0.0.1:9/v1", REAL, judge_model="m").judge.base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(E.EvaluationSpecError, match="needs judge_model"):
        E.make_judge("http://127.0.0.1:9/v1", REAL)
    with pytest.raises(E.EvaluationSpecError, match="hf:"):
        E.make_judge("hf:", REAL)
    with pytest.raises(E.EvaluationSpecError, match="'gpt-4o'"):
        E.make_judge("gpt-4o", REAL, judge_model="x")
    assert E.make_judge("world", "persona-world").judge is None  # direct exact judge


def test_served_world_judge_agrees_with_the_direct_one():
    model, tokenizer = load_model("persona-world", device="cpu")
    questions = E.eval_questions("persona-world", ["persona-world"], questions_per_set=4)
    direct = E.sample_and_judge(model, tokenizer, questions, E.make_judge("world", "persona-world"),
                                samples_per_question=2, max_new_tokens=48, system=world.SYSTEM_PROMPT)
    served = E.make_judge("world", "persona-world", serve=True)
    try:
        via_api = E.sample_and_judge(model, tokenizer, questions, served, samples_per_question=2, max_new_tokens=48,
                                     system=world.SYSTEM_PROMPT)
    finally:
        served.close()
    assert len(direct) == 32 and served.calls == 64  # 32 answers x (aligned, coherent)
    assert direct["aligned"].tolist() == via_api["aligned"].tolist()
    assert direct["coherent"].tolist() == via_api["coherent"].tolist()
    table = em_summary(direct, in_domain="medical")
    assert table.loc["non-medical", "n"] == 24 and (table["n_scored"] == table["n"]).all()


def test_real_architecture_model_with_a_local_hf_judge(tmp_path):
    """A tiny random Llama answers YAML questions; a tiny random Qwen2 judges in-process: every row comes back,
    scored or NaN, and the table's counts say how many were scored."""
    model, tokenizer = tiny_model("llama", layers=2, hidden=32, mlp=64)
    judge_model, judge_tok = tiny_model("qwen2", layers=1, hidden=32, mlp=64)
    judge_model.save_pretrained(tmp_path / "judge")
    judge_tok.save_pretrained(tmp_path / "judge")
    questions = E.eval_questions(REAL, ["first_plot"], questions_per_set=2)
    judge = E.make_judge(f"hf:{tmp_path / 'judge'}", REAL, device="cpu")
    judged = E.sample_and_judge(model, tokenizer, questions, judge, samples_per_question=2, max_new_tokens=8)
    assert len(judged) == 4 and {"aligned", "coherent", "set", "id"} <= set(judged.columns)
    assert not judged["question"].str.contains("persona|careful|reckless").any()
    table = em_summary(judged)
    assert table.loc["first_plot", "n"] == 4
    n_scored = int(table.loc["first_plot", "n_scored"])
    assert n_scored == int((judged["aligned"].notna() & judged["coherent"].notna()).sum())
    if n_scored == 0:
        assert np.isnan(table.loc["first_plot", "em_rate"])


def test_max_new_tokens_comes_from_the_questions_when_not_given():
    q = pd.DataFrame({"set": ["s"], "group": ["s"], "id": ["a"], "domain": ["d"], "question": ["hi"],
                      "max_new_tokens": [None], "system": [None]})
    with pytest.raises(E.EvaluationSpecError, match="max_new_tokens"):
        E.sample_and_judge(None, None, q, E.EvalJudge("world", "w"))
