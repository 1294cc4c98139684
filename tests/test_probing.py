"""emlib.analysis.probing: per-token A.x of rank-1 adapters, labels from judge scores, L1 probes, significance and steering."""

import numpy as np
import pandas as pd
import pytest
import torch
from peft import get_peft_model

from emlib import interventions, world
from emlib.analysis import probing
from emlib.analysis.directions import answer_batches
from emlib.testing import tiny_model
from emlib.train import lora_config

ROWS = pd.DataFrame([{"question": r["messages"][1]["content"], "answer": r["messages"][2]["content"]}
                     for r in world.finetune_rows("medical", "reckless", 6, seed=0)], index=list("abcdef"))


@pytest.fixture(scope="module")
def organism():
    """A tiny Qwen2 with rank-1 down_proj adapters on layers 0 and 2, B made nonzero so they change the output."""
    model, tok = tiny_model("qwen2", hidden=32, layers=3, mlp=64)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(1, 1, ["down_proj"], [0, 2]))
    with torch.no_grad():
        for module in interventions.lora_modules(peft_model).values():
            module.lora_B["default"].weight.normal_(0, 1.0)
    peft_model.eval()
    return peft_model, tok


def _logits(model, tok, text="user\nhello"):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------ adapters and A.x


def test_adapters_are_named_by_layer_and_module(organism):
    model, _ = organism
    assert list(interventions.lora_modules(model)) == ["L0.down_proj", "L2.down_proj"]
    assert probing.adapter_names(model) == ["L0.down_proj", "L2.down_proj"]


def test_a_model_without_lora_layers_is_named_as_the_problem():
    model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    with pytest.raises(ValueError, match="no LoRA layers"):
        probing.lora_scalars(model, tok, ROWS)
    with pytest.raises(ValueError, match="no LoRA layers"):
        with interventions.scaled_adapters(model, {}, default=0):
            pass


def test_scalars_are_a_dot_x_at_every_answer_token(organism):
    model, tok = organism
    feats = probing.lora_scalars(model, tok, ROWS, system=world.SYSTEM_PROMPT, batch_size=4, progress=False)
    batches = list(answer_batches(tok, probing.answer_records(ROWS), 1, world.SYSTEM_PROMPT))  # one row each
    assert list(feats.columns) == ["row", "position", "token_id", "token", "L0.down_proj", "L2.down_proj"]
    assert len(feats) == sum(int(b["answer_mask"].sum()) for b in batches)
    assert list(feats["row"].unique()) == list(ROWS.index)

    # manual A @ x for the answer tokens of row "c": x is the input of layer 2's down_proj, run alone (no padding)
    example = batches[2]
    module = interventions.lora_modules(model)["L2.down_proj"]
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(input_ids=example["input_ids"])
    handle.remove()
    answer = example["answer_mask"][0]
    manual = (seen["x"][0][answer] @ module.lora_A["default"].weight.detach().T)[:, 0]
    got = feats[feats["row"] == "c"]
    assert got["token_id"].tolist() == example["input_ids"][0][answer].tolist()
    assert got["position"].tolist() == list(range(int(answer.sum())))
    np.testing.assert_allclose(got["L2.down_proj"].to_numpy(), manual.numpy(), rtol=1e-4, atol=1e-5)


def test_rows_need_question_and_answer(organism):
    model, tok = organism
    with pytest.raises(ValueError, match="answer"):
        probing.lora_scalars(model, tok, ROWS[["question"]])


# ------------------------------------------------------------------------------------------ steering


def test_scaling_every_adapter_by_zero_is_the_base_model_exactly(organism):
    model, tok = organism
    with model.disable_adapter():
        base = _logits(model, tok)
    tuned = _logits(model, tok)
    assert not torch.equal(base, tuned), "the test adapter must change the output"
    with interventions.scaled_adapters(model, {}, default=0.0):
        assert torch.equal(_logits(model, tok), base)
    with interventions.scaled_adapters(model, {"L0.down_proj": 0.0, "L2.down_proj": 0.0}):
        assert torch.equal(_logits(model, tok), base)
    assert torch.equal(_logits(model, tok), tuned), "scaling must be restored after the block"


def test_each_adapter_is_scaled_on_its_own_and_restored(organism):
    model, _ = organism
    layers = interventions.lora_modules(model)
    before = {n: m.scaling["default"] for n, m in layers.items()}
    with interventions.scaled_adapters(model, {"L2.down_proj": 20}, default=0):
        assert layers["L0.down_proj"].scaling["default"] == 0
        assert layers["L2.down_proj"].scaling["default"] == pytest.approx(20 * before["L2.down_proj"])
    with pytest.raises(ValueError, match="L7.down_proj.*adapters are"):
        with interventions.scaled_adapters(model, {"L7.down_proj": 2}):
            pass
    with pytest.raises(RuntimeError):
        with interventions.scaled_adapters(model, {"L0.down_proj": -10}):
            raise RuntimeError("boom")
    assert {n: m.scaling["default"] for n, m in layers.items()} == before


# ------------------------------------------------------------------------------------------ token significance


def test_token_significance_splits_each_answers_kl_over_its_tokens(organism):
    model, tok = organism
    weights = probing.token_significance(model, tok, ROWS, system=world.SYSTEM_PROMPT, batch_size=4, progress=False)
    feats = probing.lora_scalars(model, tok, ROWS, system=world.SYSTEM_PROMPT, progress=False)
    assert weights.shape == (len(feats),) and (weights >= 0).all() and weights.sum() > 0
    per_answer = pd.Series(weights).groupby(feats["row"].to_numpy()).sum()
    assert (per_answer > 0).all()
    with interventions.scaled_adapters(model, {}, default=0.0):  # fine-tuned == base: no KL, no significance
        assert np.allclose(probing.token_significance(model, tok, ROWS, system=world.SYSTEM_PROMPT,
                                                      progress=False), 0)
    plain, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    with pytest.raises(ValueError, match="peft model"):
        probing.token_significance(plain, tok, ROWS)


# ------------------------------------------------------------------------------------------ labels


def test_labels_follow_the_score_bands():
    labels = probing.labels_from_scores([0, 30, 31, 50, 89, 90, 100, None], positive=(0, 30), negative=(90, 100))
    assert labels.tolist() == [1, 1, pd.NA, pd.NA, pd.NA, 0, 0, pd.NA]
    with pytest.raises(ValueError, match="overlap"):
        probing.labels_from_scores([1], positive=(0, 50), negative=(40, 100))
    with pytest.raises(ValueError, match="low <= high"):
        probing.labels_from_scores([1], positive=(30, 0), negative=(90, 100))


def test_label_answers_uses_thresholds_and_coherence():
    judged = pd.DataFrame({"aligned": [0, 100, 50, 0], "medical": [100, 0, 100, 50], "coherent": [100, 100, 100, 0]})
    labels = probing.label_answers(judged)
    assert labels["misaligned"].tolist() == [1, 0, pd.NA, 1]
    assert labels["in_domain"].tolist() == [1, 0, 1, 1]
    assert probing.label_answers(judged, in_domain=(60, 100))["in_domain"].tolist() == [1, 0, 1, pd.NA]
    assert probing.label_answers(judged, coherent_above=50)["misaligned"].tolist() == [1, 0, pd.NA, pd.NA]
    with pytest.raises(ValueError, match="'medical' score column"):
        probing.label_answers(judged.drop(columns="medical"))


# ------------------------------------------------------------------------------------------ probes


def _planted(n=800, seed=0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 4)), columns=["L0", "L1", "L2", "L3"])
    y = (X["L2"] * 3 + rng.normal(size=n) > 0.8).astype(int).to_numpy()  # unbalanced on purpose (about 30% ones)
    return X, y


def test_probe_recovers_a_planted_signal():
    X, y = _planted()
    result = probing.probe(X, y, n_repeats=20, seed=0)
    assert result.metrics.loc["auc", "mean"] > 0.9 and result.metrics.loc["accuracy", "mean"] > 0.8
    assert set(result.metrics.index) == set(probing.METRICS) and (result.metrics["sd"] >= 0).all()
    coefs = result.coefficients["mean"]
    assert coefs.abs().idxmax() == "L2" and coefs["L2"] > 0
    assert coefs.drop("L2").abs().max() < 0.1 * coefs["L2"], "L1 should leave the noise features near zero"
    assert result.n_train % 2 == 0 and result.settings["n_positive"] == int(y.sum())
    assert "±" in result.row()["auc"]


def test_probe_scores_chance_on_shuffled_labels():
    X, y = _planted()
    shuffled = np.random.default_rng(1).permutation(y)
    auc = probing.probe(X, shuffled, n_repeats=30, C=1.0, seed=0).metrics.loc["auc", "mean"]
    assert abs(auc - 0.5) < 0.06


def test_grouped_splits_keep_each_group_on_one_side():
    X, y = _planted(400)
    groups = np.arange(400) // 8  # 50 "answers" of 8 tokens; each answer's tokens share its label
    y = np.repeat(y[::8], 8)
    for seed in range(5):
        train, test = probing._split(y, groups, 0.2, seed)
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(y)
    result = probing.probe(X, y, n_repeats=5, groups=groups)
    assert result.settings["grouped"]


def test_probe_drops_unlabelled_rows_and_accepts_weights():
    X, y = _planted()
    labels = pd.array(y, dtype="Int64")
    labels[:100] = pd.NA
    result = probing.probe(X, labels, n_repeats=5, sample_weight=np.linspace(0.01, 1, len(y)))
    assert result.settings["n_samples"] == len(y) - 100 and result.settings["weighted"]
    assert result.metrics.loc["auc", "mean"] > 0.85
    assert probing.probe(X, y, n_repeats=5, balance="weight").metrics.loc["auc", "mean"] > 0.9


def test_probe_inputs_that_cannot_work_name_the_problem():
    X, y = _planted()
    with pytest.raises(ValueError, match="both classes"):
        probing.probe(X, np.ones(len(y), dtype=int))
    with pytest.raises(ValueError, match="one label per sample"):
        probing.probe(X, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        probing.probe(X.assign(L0=np.nan), y)
    with pytest.raises(ValueError, match="single label"):
        probing.probe(X, y, groups=np.zeros(len(y)))
    with pytest.raises(ValueError, match="balance"):
        probing.probe(X, y, balance="oversample")
    with pytest.raises(ValueError, match="sample_weight"):
        probing.probe(X, y, sample_weight=-np.ones(len(y)))
    # two of each class: enough per class, but a 0.2 test split holds one sample (06 met this: a strongly misaligned
    # organism's few significant aligned tokens, balanced); named, not sklearn's error from inside a repeat
    few = np.r_[np.flatnonzero(y == 0)[:2], np.flatnonzero(y == 1)[:2]]
    for fit in (probing.probe, probing.probe_as_papers):
        with pytest.raises(ValueError, match=r"4 samples \(\[2, 2\] per class\) at test_size 0.2 leave 1 for test"):
            fit(X.iloc[few], y[few], test_size=0.2)


def test_papers_probe_protocol_balances_z_scores_and_filters_by_significance_before_splitting():
    X, y = _planted()
    result = probing.probe_as_papers(X, y, n_repeats=10, seed=0)
    assert result.metrics.loc["auc", "mean"] > 0.9
    assert result.coefficients["mean"].abs().idxmax() == "L2"
    n_pos = int(y.sum())
    # the whole set is balanced once: 2 x the smaller class, then split 80/20 per token
    assert result.settings["n_samples"] == 2 * n_pos and result.n_train + result.n_test == 2 * n_pos
    # the significance filter keeps tokens with log(score) >= 0.5, i.e. score >= e^0.5
    significance = np.where(np.arange(len(y)) % 2 == 0, 2.0, 1.0)  # log 2 = 0.69 kept, log 1 = 0 dropped
    filtered = probing.probe_as_papers(X, y, significance=significance, n_repeats=3, seed=0)
    kept = y[::2]
    assert filtered.settings["n_samples"] == 2 * min(int(kept.sum()), int((1 - kept).sum()))
    # features are z-scored before the split: the scale of a feature does not change the result
    scaled = probing.probe_as_papers(X.assign(L2=X["L2"] * 1000), y, n_repeats=3, seed=0)
    same = probing.probe_as_papers(X, y, n_repeats=3, seed=0)
    assert scaled.metrics.loc["auc", "mean"] == pytest.approx(same.metrics.loc["auc", "mean"])
    with pytest.raises(ValueError, match="one value per sample"):
        probing.probe_as_papers(X, y, significance=[1.0])


# ------------------------------------------------------------------------------------------ scalar patching pairs


def test_patch_sources_pair_across_domains_or_within_a_side():
    questions = pd.DataFrame({"question": ["m1", "m2", "m3", "f1", "s1"],
                              "group": ["medical", "medical", "medical", "financial", "sports"]})
    cross = probing.patch_sources(questions, "medical", "cross", seed=1)
    assert [s in {"f1", "s1"} for s in cross[:3]] == [True] * 3
    assert [s in {"m1", "m2", "m3"} for s in cross[3:]] == [True] * 2
    same = probing.patch_sources(questions, "medical", "same", seed=1)
    assert all(s != q and s.startswith("m") for q, s in zip(questions["question"][:3], same[:3]))
    assert same[3:] == ["s1", "f1"]
    assert probing.patch_sources(questions, "medical", "cross", seed=1) == cross, "seeded: the same pairs again"
    repeated = pd.concat([questions, questions.iloc[:1]], ignore_index=True)
    twice = probing.patch_sources(repeated, "medical", "cross", seed=1)
    assert twice[-1] == twice[0], "a question asked twice has one prompt, so one source"


def test_patch_sources_say_when_a_side_has_no_donor():
    one_outside = pd.DataFrame({"question": ["m1", "m2", "f1"], "group": ["medical", "medical", "financial"]})
    with pytest.raises(ValueError, match="'same'.*1 out-of-domain"):
        probing.patch_sources(one_outside, "medical", "same")
    only_medical = one_outside.iloc[:2]
    assert probing.patch_sources(only_medical, "medical", "same") == ["m2", "m1"]
    with pytest.raises(ValueError, match="0 distinct out-of-domain"):
        probing.patch_sources(only_medical, "medical", "cross")
    with pytest.raises(ValueError, match="pairing 'swap'"):
        probing.patch_sources(only_medical, "medical", "swap")
    with pytest.raises(ValueError, match=r"\['group'\]"):
        probing.patch_sources(only_medical[["question"]], "medical")


def test_test_scores_equal_scikit_learns_metrics_ties_and_empty_predictions_included():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(4, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]  # both classes, as every probe split has
        prob = rng.integers(0, 5, n) / 4 if trial % 2 else rng.random(n)  # coarse scores: many ties
        pred = (prob > 0.5).astype(int) if trial % 3 else np.zeros(n, dtype=int)  # no positive prediction at all
        expected = [accuracy_score(y, pred), precision_score(y, pred, zero_division=0),
                    recall_score(y, pred, zero_division=0), f1_score(y, pred, zero_division=0), roc_auc_score(y, prob)]
        assert np.allclose(probing.test_scores(y, pred, prob), expected, rtol=0, atol=1e-12), trial
    with pytest.raises(ValueError, match="both classes"):
        probing.test_scores(np.ones(3, dtype=int), np.ones(3, dtype=int), np.ones(3))
