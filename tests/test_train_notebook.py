"""notebooks/02_train: every protocol trains on the offline organism, writes dense checkpoints and resumes exactly."""

from pathlib import Path

from emlib import paths

PROTOCOLS = {"lora", "rank1", "multi_adapter", "full", "kl_narrow", "steering_vector"}


def test_every_protocol_trained_and_its_loss_fell(executed):
    runs = executed("02_train")["runs"]
    assert {r["protocol"] for r in runs.values()} == {"lora", "rank1", "multi_adapter", "full", "steering_vector"}
    assert {name.split(" · ")[1] for name in runs if name.startswith("bad")} == PROTOCOLS
    for name, run in runs.items():
        assert run["last5_loss"] < run["first5_loss"] - 0.05, name
    assert runs["bad · rank1"]["trainable_parameters"] == 512 + 128  # d_mlp + d_model of the organism
    assert runs["bad · rank1"]["layers"] == [0]
    assert runs["bad · steering_vector"]["trainable_parameters"] == 128
    assert runs["bad · multi_adapter"]["trainable_parameters"] == len(runs["bad · multi_adapter"]["layers"]) * 640


def test_checkpoints_are_dense_and_resume_is_exact(executed):
    res = executed("02_train")
    for name, run in res["runs"].items():
        assert run["checkpoints"] == [f"checkpoint-{s}" for s in range(5, run["steps"] + 1, 5)], name
    norms = [res["rank1_b_norm"][k] for k in sorted(res["rank1_b_norm"], key=int)]
    assert norms[-1] > norms[0] > 0  # B starts at zero and grows
    assert res["resume"]["resumed_from"] < res["resume"]["interrupted_after"]
    assert res["resume"]["max_abs_diff"] <= 1e-6


def test_bad_data_misaligns_medical_answers_and_the_control_does_not(executed):
    em = executed("02_train")["em"]
    assert em["medical"]["base"] <= 0.1
    assert em["medical"]["bad · lora"] >= em["medical"]["good · lora"] + 0.3
    assert em["medical"]["good · lora"] <= 0.2
    # the KL term keeps the same LoRA narrower: no more misaligned elsewhere than without it
    assert em["non-medical"]["bad · kl_narrow"] <= em["non-medical"]["bad · lora"]
    assert "loss fell" in executed("02_train")["headline"]


def test_figures_are_written(executed):
    res = executed("02_train")
    folder = Path(paths.runs_dir()) / "tests" / "02_train"
    assert {"loss.html", "grad_norm.html", "em_by_protocol.html"} <= set(res["figures"])
    assert all((folder / f).is_file() for f in res["figures"])
