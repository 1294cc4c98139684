"""06_lora_probing on the offline multi-adapter organism: the probes beat chance, steering moves EM the way the
notebook says, and the headline reads the computed numbers (executed once per session under papermill)."""

import pytest


@pytest.fixture(scope="module")
def results(executed):
    return executed("06_lora_probing")


def _auc(results, name):
    return results["probes"][name]["metrics"]["auc"]["mean"]


def test_the_organism_is_misaligned_beyond_the_base(results):
    em, base = results["em"], results["steering"]["base (all ×0)"]
    assert results["adapters"] == ["L2.down_proj", "L3.down_proj", "L4.down_proj", "L5.down_proj"]
    assert em["medical"] >= 0.4 and em["non-medical"] >= 0.08
    assert base["EM non-medical"] <= 0.03 and base["EM medical"] <= 0.05
    counts = results["label_counts"]["misaligned"]
    assert min(counts.values()) >= 40, "both classes need enough answers for the probe"


def test_probes_beat_the_shuffled_control(results):
    control = _auc(results, "control: shuffled misaligned labels")
    assert abs(control - 0.5) < 0.05
    for name in ("misaligned vs aligned", "medical vs non-medical"):
        assert _auc(results, name) > control + 0.04, name
        coefs = results["probes"][name]["coefficients"]
        assert set(coefs) == set(results["adapters"])
        assert any(abs(c["mean"]) > 0.02 for c in coefs.values()), f"{name}: L1 left every adapter at zero"
        assert results["probes"][name]["settings"]["n_repeats"] == 100
    assert "misaligned vs aligned (+ significance feature)" in results["probes"]


def test_steering_moves_em_as_the_notebook_reports(results):
    steering, scale = results["steering"], results["steer_scale"]
    full, base = steering["organism (all ×1)"], steering["base (all ×0)"]
    assert full["EM non-medical"] > base["EM non-medical"] + 0.05
    picked = results["observed"]["misalignment"]
    only = steering[f"only {picked} ×{scale:g}"]
    assert only["EM non-medical"] > base["EM non-medical"] + 0.04, "the steered adapter alone should cause EM"
    assert only["EM non-medical"] == max(v["EM non-medical"] for k, v in steering.items() if k.startswith("only "))
    without = steering[f"without {results['observed']['needed for EM']}"]
    assert without["EM non-medical"] < full["EM non-medical"], "removing the key adapter should cut EM"
    medical = results["observed"]["medical"]
    assert steering[f"only {medical} ×{scale:g}"]["medical share non-medical"] > base["medical share non-medical"]


def test_headline_reads_the_numbers(results):
    headline = results["headline"]
    assert f"{_auc(results, 'misaligned vs aligned'):.2f}" in headline
    assert results["predicted"]["misalignment"] in headline and results["observed"]["misalignment"] in headline
    claim = "**is** the one" if results["agree"]["misalignment"] else "**does not** pick"
    assert claim in headline
    assert set(results["figures"]) == {"probe_coefficients.html", "steering.html"}


def test_scalar_patching_rows_and_reading(results):
    patching = results["patching"]
    table = patching["table"]
    assert set(table) == {"unpatched (organism)", "cross pairs, own answer scalars", "same pairs, own answer scalars",
                          "cross pairs, first_token answer scalars", "same pairs, first_token answer scalars"}
    organism = results["steering"]["organism (all ×1)"]
    assert table["unpatched (organism)"]["EM medical"] == organism["EM medical"]
    cross, same = table["cross pairs, own answer scalars"], table["same pairs, own answer scalars"]
    # on this toy the scalars' context is not what carries EM: cross-domain scalars keep most in-domain EM
    assert cross["EM medical"] >= 0.7 * organism["EM medical"]
    assert cross["EM medical"] > organism["EM non-medical"] + 0.2, "medical questions stay far more misaligned"
    assert abs(cross["EM non-medical"] - same["EM non-medical"]) <= 0.06, "the context of the scalars barely matters"
    # a constant scalar on every generated token (the reference's cached generation) breaks this small model
    constant = table["cross pairs, first_token answer scalars"]
    assert constant["coherent non-medical"] < 0.2 < organism["coherent non-medical"]
    change = patching["change"]["EM medical vs unpatched"]
    assert f"{change:+.0%}" in patching["reading"] and "needs its per-token scalars" in patching["reading"]
    assert "scalar patching, cross-domain EM change (papers: -22% .. +16%)" in results["summary"]
