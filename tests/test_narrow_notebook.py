"""07_narrow_misalignment: the KL-regularised run is narrow, the plain run is general, and the stability measures
are recorded (executed once per session under papermill)."""

import pytest


@pytest.fixture(scope="module")
def results(executed):
    return executed("07_narrow_misalignment")


def test_kl_run_is_narrow_and_plain_run_is_general(results):
    em = results["em"]
    med, non = em["medical"], em["non-medical"]
    assert med["base"] == 0 and non["base"] == 0
    assert non["narrow"] < non["general"] - 0.08, "the KL term should cut general EM well below the plain run's"
    assert non["narrow"] <= 0.1
    assert med["narrow"] >= 0.2 and med["narrow"] > non["narrow"] + 0.15, "the narrow run keeps in-domain EM"
    assert med["general"] >= 0.5 and non["general"] >= 0.1
    assert results["narrow_is_narrow"] is True


def test_stability_measures_are_recorded(results):
    curves = results["loss_vs_scale"]
    assert set(curves) == {"general", "narrow", "steering-vector"}
    for name, curve in curves.items():
        loss = {float(k): v for k, v in curve.items()}
        assert loss[1.0] < loss[0.0], f"{name}: the trained update must lower the training loss"
        assert len({round(v, 6) for k, v in loss.items() if k == 0.0}) == 1
    base = {float(k): v for k, v in curves["general"].items()}[0.0]
    assert all({float(k): v for k, v in c.items()}[0.0] == pytest.approx(base) for c in curves.values())
    assert all(v > 0 for v in results["norms"].values())
    kl = results["kl_on_base_generations"]
    assert kl["non-medical"]["narrow"] < kl["non-medical"]["general"], "the narrow run stays closer to the base"
    assert {r["solution"] for r in results["matched_norm_loss"]} == {"general", "narrow"}


def test_figures_and_headline(results):
    assert set(results["figures"]) == {"em_by_group.html", "loss_vs_scale.html", "kl_on_base_generations.html"}
    assert "KL term" in results["headline"] and "%" in results["headline"]


def test_offline_run_loads_the_shipped_solutions_and_says_so(results):
    """The default offline run loads the three 60-step solutions shipped with the organism (retraining gives them bit
    for bit: tests/test_organism.py) and its summary names them."""
    assert results["summary"]["solutions"] == {"general": "shipped bad-medical-r8-60",
                                               "narrow": "shipped bad-medical-kl-narrow-60",
                                               "steering-vector": "shipped bad-medical-steering-vector-60"}
    assert set(results["final_loss"]) == {"general", "narrow", "steering-vector"}
