"""emlib.analysis.phase: trajectory geometry of rank-1 adapter runs (synthetic trajectories and a tiny real run)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emlib.analysis import phase

KEY = "base_model.model.model.layers.{}.mlp.down_proj.lora_{}.weight"


def planted_turn(n: int = 40, turn_index: int = 22, d: int = 16, every: int = 5, seed: int = 0):
    """A straight path along e0, then (from checkpoint ``turn_index``) a straight path along e1; small noise."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, d))
    for i in range(1, n):
        X[i] = X[i - 1] + (np.eye(d)[0] if i <= turn_index else np.eye(d)[1]) * 0.1
    X += rng.normal(scale=1e-3, size=X.shape)
    return np.arange(every, every * (n + 1), every), X


def trajectory(steps, Bs: dict, d_in: int = 8, seed: int = 0) -> phase.Trajectory:
    rng = np.random.default_rng(seed)
    A = {name: np.tile(rng.normal(size=d_in), (len(steps), 1)) for name in Bs}
    return phase.Trajectory(steps, A, Bs, log=[{"step": int(s), "grad_norm": 1.0, "loss": 0.5} for s in steps])


@pytest.mark.parametrize("turn_index", [10, 22, 31])
def test_planted_turn_is_found(turn_index):
    steps, X = planted_turn(turn_index=turn_index)
    traj = trajectory(steps, {"base_model.model.model.layers.0.mlp.down_proj": X})
    summary, tables = phase.analyse(traj, ks=(5, 10, 15), threshold=0.002)
    assert summary.rotation_step == steps[turn_index]
    assert all(s == steps[turn_index] for s in summary.rotation_per_k.values())
    local = tables["local_cos"].dropna()
    away = local[(local["step"] - steps[turn_index]).abs() > 15]
    assert np.allclose(away["local_cos"], -1, atol=0.05)  # straight elsewhere
    at = local[local["step"] == steps[turn_index]]
    assert np.allclose(at["local_cos"], 0, atol=0.05)  # a right angle at the turn


def test_local_cosine_definition_and_threshold():
    steps = [0, 5, 10]
    X = np.array([[0.0, 0], [1, 0], [1, 1]])
    lc = phase.local_cosine(X, steps, 5)
    assert np.isnan(lc[0]) and np.isnan(lc[2]) and lc[1] == pytest.approx(0.0)
    X2 = np.array([[0.0, 0], [1, 0], [0, 0]])  # reversal
    assert phase.local_cosine(X2, steps, 5)[1] == pytest.approx(1.0)
    assert np.isnan(phase.local_cosine(X * 1e-4, steps, 5, threshold=0.002)[1])  # moved less than the threshold


def test_fewer_checkpoints_than_k_is_a_clear_error():
    steps, X = planted_turn(n=3)
    traj = trajectory(steps, {"m": X})
    with pytest.raises(ValueError, match="k=15 needs checkpoints"):
        phase.local_cosines(traj, ks=(5, 15))
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        phase.pca_path(X[:1])


def test_pca_variances():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 12)) * np.array([5, 2] + [0.1] * 10)
    coords, ratio = phase.pca_path(X, k=2)
    _, full = phase.pca_path(X, k=12)
    assert coords.shape == (30, 2)
    assert full.sum() == pytest.approx(1.0)
    assert ratio[0] >= ratio[1] and ratio.sum() <= 1 + 1e-9
    Xc = X - X.mean(0)
    assert np.sum(coords ** 2) / np.sum(Xc ** 2) == pytest.approx(ratio.sum())  # captured share of the variance
    # a planar path: two components explain everything
    _, planar = phase.pca_path(planted_turn()[1][:, :2], k=2)
    assert planar.sum() == pytest.approx(1.0)


def test_comp_score():
    rng = np.random.default_rng(2)
    M = rng.normal(size=(9, 50))
    sigma = np.linalg.svd(M - M.mean(0), compute_uv=False)
    assert phase.comp_score(M, M) == pytest.approx(np.sqrt(np.sum(sigma ** 4)) / np.sum(sigma ** 2))
    assert phase.comp_score(M, 3 * M) == pytest.approx(phase.comp_score(M, M))  # scale-free
    assert phase.comp_score(M, rng.normal(size=(9, 50))) < phase.comp_score(M, M)
    M2 = rng.normal(size=(9, 50))
    a = M - M.mean(0)
    r1 = np.outer(np.arange(9.0), rng.normal(size=50))
    assert phase.comp_score(r1, r1) == pytest.approx(1.0)  # rank 1: identical gives 1
    orth, other = np.zeros((9, 100)), np.zeros((9, 100))
    orth[:, :50], other[:, 50:] = M, M
    assert phase.comp_score(orth, other, "ABt") == pytest.approx(0.0)  # orthogonal row spaces
    assert phase.comp_score(orth, other) == pytest.approx(phase.comp_score(M, M))  # AtB: same Gram structure
    b = M2 - M2.mean(0)
    abt = np.linalg.norm(a @ b.T) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert phase.comp_score(M, M2, "ABt") == pytest.approx(abt)
    assert phase.comp_score(M, M[::-1]) == pytest.approx(phase.comp_score(M[::-1], M))
    # the Gram-matrix formula equals the direct ||M1^T M2||_F definition
    direct = np.linalg.norm(a.T @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert phase.comp_score(M, M2) == pytest.approx(direct)


def test_single_and_multi_adapter_runs():
    steps, X = planted_turn(turn_index=20)
    single = trajectory(steps, {"a": X})
    s1, t1 = phase.analyse(single)
    assert s1.comp_to_final is None and "comp" not in t1
    with pytest.raises(ValueError, match="single adapter"):
        phase.comp_to_final(single)
    rng = np.random.default_rng(3)
    Bs = {f"base_model.model.model.layers.{i}.mlp.down_proj": X @ rng.normal(size=(16, 16)) for i in range(3)}
    multi = trajectory(steps, Bs)
    s3, t3 = phase.analyse(multi, comp_demean="adapters")  # the earlier within-checkpoint de-meaning
    assert s3.rotation_step == steps[20]  # the shared turn, seen in the concatenated vectors
    final = np.stack([multi.B[n][-1] for n in multi.adapters])
    assert s3.comp_to_final[-1] == pytest.approx(phase.comp_score(final, final))
    assert all(0 <= c <= 1 + 1e-9 for c in s3.comp_to_final)
    assert set(t3["norms"]["adapter"]) == {"L0.down_proj", "L1.down_proj", "L2.down_proj"}
    assert multi.vectors("B").shape == (len(steps), 48)
    assert list(phase.grad_norms(multi)["grad_norm"]) == [1.0] * len(steps)


def test_load_run_keeps_only_vectors(tmp_path):
    rng = np.random.default_rng(4)
    steps, X = planted_turn(n=12, turn_index=6, d=16)
    for s, b in zip(steps, X):
        folder = tmp_path / f"checkpoint-{s}"
        folder.mkdir()
        state = {}
        for layer in (0, 2):
            state[KEY.format(layer, "A")] = torch.tensor(rng.normal(size=(1, 24)), dtype=torch.float32)
            state[KEY.format(layer, "B")] = torch.tensor(b[:, None] * (layer + 1), dtype=torch.float32)
        save_file(state, str(folder / "adapter_model.safetensors"))
    (tmp_path / "log.jsonl").write_text("".join(f'{{"step": {i}, "grad_norm": 0.5, "loss": 1.0}}\n'
                                                for i in range(1, 61)))
    (tmp_path / ".tmp-checkpoint-65").mkdir()  # an unfinished save is ignored
    traj = phase.load_run(tmp_path)
    assert traj.steps.tolist() == steps.tolist()
    assert [phase.short_name(a) for a in traj.adapters] == ["L0.down_proj", "L2.down_proj"]
    assert all(isinstance(m, np.ndarray) for m in list(traj.A.values()) + list(traj.B.values()))
    assert traj.B[traj.adapters[1]].shape == (12, 16) and traj.A[traj.adapters[0]].shape == (12, 24)
    assert np.allclose(traj.B[traj.adapters[0]], X, atol=1e-6)
    assert traj.nbytes() == 12 * 2 * (16 + 24) * 4
    assert len(traj.log) == 60
    assert phase.load_run(tmp_path, steps=[5, 10]).steps.tolist() == [5, 10]
    with pytest.raises(FileNotFoundError):
        phase.load_run(tmp_path / "nothing-here")


def test_higher_rank_adapters_are_refused():
    with pytest.raises(ValueError, match="rank 4"):
        phase.vectors_from_state({KEY.format(0, "A"): np.zeros((4, 8)), KEY.format(0, "B"): np.zeros((8, 4))})


def test_onset_step():
    import pandas as pd

    em = pd.DataFrame({"step": [5, 10, 15, 20] * 2, "scale": [1.0] * 4 + [2.0] * 4, "group": "non-medical",
                       "em_rate": [0, 0.1, 0.4, 0.5, 0, 0.5, 0.5, 0.5]})
    assert phase.onset_step(em, 0.5, group="non-medical", scale=1.0) == 15
    assert phase.onset_step(em, 0.5, group="non-medical", scale=2.0) == 10
    unscored = em.assign(em_rate=float("nan"))  # no checkpoint scored: no onset, not a crash
    assert phase.onset_step(unscored, 0.5, group="non-medical", scale=1.0) is None


def test_real_rank1_run_and_scaled_em(tmp_path):
    """A 10-step organism rank-1 run: load_run reads train()'s checkpoints; scale 0 is the base model (no EM)."""
    from emlib import train, world
    from emlib.models import load_model

    rows = world.finetune_rows("medical", "reckless", 32, 1234)
    config = train.preset("organism-rank1", steps=10, batch_size=4, save_every=5)
    result = train.train(config, "persona-world", rows, tmp_path / "run", device="cpu")
    traj = phase.load_run(tmp_path / "run")
    assert traj.steps.tolist() == [5, 10]
    name = traj.adapters[0]
    assert phase.short_name(name) == "L0.down_proj"
    assert traj.A[name].shape == (2, 512) and traj.B[name].shape == (2, 128)
    trained = dict(result.model.named_parameters())
    b_final = next(v for k, v in trained.items() if "lora_B" in k).detach().numpy().reshape(-1)
    assert np.allclose(traj.B[name][-1], b_final, atol=1e-6)
    assert [r["step"] for r in traj.log] == list(range(1, 11))
    with pytest.raises(ValueError, match="k=5 needs checkpoints"):
        phase.local_cosines(traj, ks=(5,))
    model, tokenizer = load_model("persona-world", device="cpu")
    from emlib.evaluation import eval_questions, make_judge

    questions = eval_questions("persona-world", ["persona-world"], questions_per_set=2)
    em = phase.em_along_run(model, tokenizer, tmp_path / "run", [10], questions, make_judge("world", "persona-world"),
                            scales=(0, 1), in_domain="medical", max_new_tokens=64, system=world.SYSTEM_PROMPT)
    assert set(em["scale"]) == {0.0, 1.0} and set(em["step"]) == {10}
    assert (em[em["scale"] == 0]["em_rate"] == 0).all()


def test_local_cosine_skips_a_step_only_if_both_a_and_b_stood_still():
    steps = [0, 5, 10, 15, 20]
    B = np.array([[0.0, 0], [1, 0], [1, 1], [1, 1.0001], [1, 1.0002]])  # B barely moves around step 15
    A_moving = np.array([[0.0], [1], [2], [3], [4]])
    A_still = np.zeros((5, 1))
    moving = phase.Trajectory(steps, {"m": A_moving}, {"m": B})
    still = phase.Trajectory(steps, {"m": A_still}, {"m": B})
    both = phase.local_cosines(moving, ks=(5,), threshold=0.01)["local_cos"].to_numpy()
    own = phase.local_cosines(moving, ks=(5,), threshold=0.01, skip="own")["local_cos"].to_numpy()
    assert both[2] == pytest.approx(own[2])  # B itself moved at step 10: both rules keep it
    assert np.isnan(own[3]) and not np.isnan(both[3])  # at step 15 only A moved: the papers' rule keeps the step
    assert np.isnan(phase.local_cosines(still, ks=(5,), threshold=0.01)["local_cos"].to_numpy()[3])  # neither moved
    with pytest.raises(ValueError, match="skip 'either' is not one of both, own"):
        phase.local_cosines(moving, ks=(5,), skip="either")


def test_comp_to_final_de_means_each_layer_over_checkpoints_as_the_papers():
    rng = np.random.default_rng(5)
    steps, n, d = np.arange(5, 105, 5), 20, 12
    directions = rng.normal(size=(3, d))
    growth = np.linspace(0, 1, n)[:, None]
    Bs = {f"base_model.model.model.layers.{i}.mlp.down_proj": growth * directions[i] + rng.normal(size=(n, d)) * 0.05
          for i in range(3)}
    traj = trajectory(steps, Bs)
    stack = np.stack([traj.B[name] for name in traj.adapters], axis=1)
    centred = stack - stack.mean(axis=0)
    by_hand = [np.linalg.norm(m.T @ centred[-1]) / (np.linalg.norm(m) * np.linalg.norm(centred[-1])) for m in centred]
    assert phase.comp_to_final(traj) == pytest.approx(by_hand)
    # a constant offset per layer (the same at every checkpoint) is removed by the papers' de-meaning only
    shifted = trajectory(steps, {name: v + 10 * rng.normal(size=d) for name, v in Bs.items()})
    assert phase.comp_to_final(shifted) == pytest.approx(phase.comp_to_final(traj))
    assert not np.allclose(phase.comp_to_final(shifted, demean="adapters"),
                           phase.comp_to_final(traj, demean="adapters"), atol=1e-3)
    with pytest.raises(ValueError, match="demean 'rows' is not one of checkpoints, adapters"):
        phase.comp_to_final(traj, demean="rows")


def test_paper_thresholds_per_model_family():
    assert phase.paper_threshold("Qwen/Qwen2.5-14B-Instruct") == 0.0035
    assert phase.paper_threshold("meta-llama/Llama-3.1-8B-Instruct") == 0.002
    assert phase.paper_threshold("Qwen/Qwen2.5-14B-Instruct", "sport") == 0.002
    with pytest.raises(ValueError, match="no threshold for 'persona-world'"):
        phase.paper_threshold("persona-world")
