"""notebooks/04_phase_transitions: a dense rank-1 run on the organism, its trajectory and the EM along it."""

from pathlib import Path

from emlib import paths


def test_trajectory_quantities(executed):
    res = executed("04_phase_transitions")
    steps = res["steps"]
    assert steps == list(range(5, steps[-1] + 1, 5)) and len(steps) >= 20  # dense checkpoints
    assert res["rotation"]["step"] in steps
    for which in ("A", "B"):
        pc1, pc2 = res["pca_explained"][which]
        assert pc1 >= pc2 >= 0 and pc1 + pc2 <= 1 + 1e-9
    norms = [res["b_norm"][str(s)] for s in steps]
    assert norms[-1] > norms[0] > 0  # B starts at zero and grows
    assert 0 < res["rotation"]["total_degrees"] < 180


def test_em_switches_on_along_the_run(executed):
    res = executed("04_phase_transitions")
    em = res["em_nonmedical"]
    first, last = str(res["em_steps"][0]), str(res["em_steps"][-1])
    assert all(v == 0 for v in em["0.0"].values())  # scale 0 is the base model
    assert em["1.0"][first] <= 0.1
    assert em["1.0"][last] >= em["1.0"][first] + 0.15
    onset = res["em_onset"]
    assert onset["step"] in res["em_steps"] and onset["step"] > res["em_steps"][0]
    assert isinstance(onset["lines_up_with_rotation"], bool)


def test_reading_and_figures(executed):
    res = executed("04_phase_transitions")
    assert f"step {res['rotation']['step']}" in res["headline"]
    assert f"step {res['em_onset']['step']}" in res["headline"]
    folder = Path(paths.runs_dir()) / "tests" / "04_phase_transitions"
    expected = {"norms.html", "pca_path.html", "local_cosine.html", "grad_norm.html", "em_by_scale.html"}
    assert expected <= set(res["figures"])
    assert all((folder / f).is_file() for f in res["figures"])
