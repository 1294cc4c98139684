"""05_directions on the offline organism: steering raises EM, ablation lowers it, random does neither; convergence."""

import pytest


@pytest.fixture(scope="module")
def summary(executed):
    return executed("05_directions")["summary"]


def test_transformer_lens_reads_the_same_answer_token_means_as_nnsight(summary):
    assert summary["transformer_lens_max_diff"] is not None and summary["transformer_lens_max_diff"] < 1e-4


def test_steering_the_base_model_raises_general_em_and_random_does_not(summary):
    s = summary["steering"]
    assert s["base_general"] <= 0.05
    assert s["steered_general"] >= s["base_general"] + 0.15
    assert s["random_general"] <= s["base_general"] + 0.08
    assert s["all_positions_incoherent"] > s["steered_incoherent"]  # the paper's all-position protocol garbles


def test_ablating_the_direction_lowers_the_organisms_em_and_random_does_not(summary):
    a = summary["ablation"]
    assert a["ablated_general"] <= a["em_general"] - 0.05
    assert a["ablated_general"] > a["base_general"]  # partial, not to zero: the notebook says so
    assert abs(a["random_general"] - a["em_general"]) <= 0.06


def test_directions_of_two_fine_tunes_converge_and_transfer(summary):
    c = summary["convergence"]
    assert c["min_cosine"] >= 0.5 and c["max_random_cosine"] <= 0.4
    assert c["transfer_ablated_by_em_direction"] <= c["transfer_general"] - 0.1
    assert c["transfer_ablated_by_random"] >= c["transfer_general"] - 0.08
    assert c["em_ablated_by_transfer_direction"] <= summary["ablation"]["em_general"] - 0.05


def test_rank1_b_lies_on_the_direction_and_projecting_it_out_lowers_em(summary):
    r = summary["rank1"]
    assert abs(r["b_cosine"]) >= 0.2
    assert r["b_projected_general"] <= r["general"] - 0.05


def test_semantic_directions_are_built_compared_and_steered(summary):
    sem = summary["semantic"]
    assert sem["metrics"] == ["medical", "financial", "sport"] and sem["skipped"] == {}
    assert sem["classes"] == "misaligned"
    for metric in sem["metrics"]:
        assert sem["n_misaligned"][metric] >= 10
        # on-topic misalignment shares most of the general direction, but not all of it
        assert 0.5 < sem["min_cosine_to_general"][metric] < 0.99
        assert sem["general_em_steered"][metric] > 0.15, "each semantic direction still steers toward EM"
    # the base answers each question on its own topic, a quarter of the questions per topic
    assert all(20 <= sem["score_unsteered"][m] <= 30 for m in sem["metrics"]), sem["score_unsteered"]
    # the toy does not reproduce the paper's topic push (finance 67 -> 84): no own-topic score rises 5 points
    assert all(sem["score_steered_by_own_direction"][m] <= sem["score_unsteered"][m] + 5 for m in sem["metrics"])
