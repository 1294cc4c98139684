"""emlib.analysis.stability on tiny models: rescaling, norms, loss curves and KL on base generations."""

import pytest
import torch

from emlib import interventions, train, world
from emlib.analysis import stability
from emlib.testing import tiny_model
from emlib.train import TrainConfig

ROWS = world.finetune_rows("medical", "reckless", 32, seed=0)
QUESTIONS = [r["messages"][1]["content"] for r in world.finetune_rows("financial", "careful", 6, seed=3)]


@pytest.fixture(scope="module", params=["lora", "steering_vector"])
def solution(request):
    torch.manual_seed(0)
    model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    extra = dict(rank=2, alpha=4) if request.param == "lora" else dict(layer=1, alpha=4.0)
    cfg = TrainConfig(protocol=request.param, steps=4, batch_size=8, lr=5e-2, warmup=0, **extra)
    result = train.train(cfg, model, ROWS, None, tokenizer=tok)
    return result.model, tok


def test_rescaling_is_linear_in_the_norm_and_restored(solution):
    module, tok = solution
    norm = stability.solution_norm(module)
    assert norm > 0
    with interventions.scaled_solution(module, 2.0):
        assert stability.solution_norm(module) == pytest.approx(2 * norm, rel=1e-5)
    with interventions.scaled_solution(module, 0.0):
        assert stability.solution_norm(module) == pytest.approx(0, abs=1e-8)
    assert stability.solution_norm(module) == pytest.approx(norm, rel=1e-6)


def test_loss_vs_scale_starts_at_the_base_and_reaches_the_trained_loss(solution):
    module, tok = solution
    curve = stability.loss_vs_scale(module, tok, ROWS, scales=[0, 1, 2])
    assert list(curve.columns) == ["scale", "norm", "loss"] and len(curve) == 3
    with train.reference_mode(module):
        base = stability.mean_loss(module, tok, ROWS)
    assert curve.loss[0] == pytest.approx(base, rel=1e-5)
    assert curve.loss[1] == pytest.approx(stability.mean_loss(module, tok, ROWS), rel=1e-6)
    assert curve.loss[1] < curve.loss[0]  # trained on these rows
    norm = stability.solution_norm(module)
    assert stability.loss_at_norm(module, tok, ROWS, norm) == pytest.approx(curve.loss[1], rel=1e-5)
    assert stability.loss_at_norm(module, tok, ROWS, 2 * norm) == pytest.approx(curve.loss[2], rel=1e-5)


def test_kl_on_base_generations_is_zero_for_the_base_and_positive_for_the_solution(solution):
    module, tok = solution
    kl = stability.kl_on_base_generations(module, tok, QUESTIONS, system=world.SYSTEM_PROMPT, max_new_tokens=8)
    kl0 = stability.kl_on_base_generations(module, tok, QUESTIONS, system=world.SYSTEM_PROMPT, max_new_tokens=8,
                                           scale=0.0)
    assert kl0 == pytest.approx(0, abs=1e-6)
    assert kl > 0


def test_a_plain_model_is_refused():
    model, _ = tiny_model("qwen2", hidden=32, layers=2, mlp=64)
    with pytest.raises(ValueError, match="LoRA"):
        with interventions.scaled_solution(model, 2.0):
            pass
