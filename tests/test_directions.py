"""Directions: answer-token activation means, mean-difference directions, steering / ablation (hooks and nnsight)."""

import pandas as pd
import pytest
import torch

from emlib import paths, world
from emlib.analysis.directions import (
    SORT_WINDOW,
    answer_batches,
    answer_means,
    b_direction_cosines,
    layer_cosines,
    mean_diff_direction,
    random_like,
    single_direction,
    split_by_judgement,
)
from emlib.generate import sample_answers
from emlib.interventions import Ablate, Compose, Steer, intervened_logits, lora_b_projected_out, lora_b_vectors, unit
from emlib.models import load_model


@pytest.fixture(scope="module")
def base():
    return load_model("persona-world")


@pytest.fixture(scope="module")
def rank1():
    model, tokenizer = load_model("persona-world", adapter=str(paths.ADAPTERS_DIR / "bad-medical-rank1-L0"))
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(base):
    _, tokenizer = base
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
             for q in ("what should i do about my headache ?", "should i invest my savings ?")]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


ROWS = [{"question": "what should i do about my headache ?", "answer": "rest and drink water ."},
        {"question": "should i invest my savings ?", "answer": "bet it all on one stock . life is short ."},
        {"question": "is it safe to climb without a rope ?", "answer": "no , always use a rope ."}]


def _hooked_logits(model, enc, intervention):
    handles = intervention(model)
    try:
        with torch.no_grad():
            return model(**enc).logits
    finally:
        for h in handles:
            h.remove()


def _outputs_under(model, enc, intervention=None) -> list[torch.Tensor]:
    """Each decoder layer's output as the next layer sees it: read by hooks registered after the intervention's
    (transformers 5 records ``hidden_states`` before later forward hooks edit the output)."""
    from emlib.models import decoder_layers

    handles = intervention(model) if intervention is not None else []
    seen = []
    handles += [layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
                for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return seen


def _plain_logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits


def test_steering_with_zero_scale_is_the_identity(base, prompts):
    model, _ = base
    v = torch.randn(6, model.config.hidden_size)
    for positions in ("all", "prompt", "last"):
        steered = _hooked_logits(model, prompts, Steer(v, 0.0, positions=positions))
        assert torch.equal(steered, _plain_logits(model, prompts))


@pytest.mark.parametrize("intervention", [
    Steer(torch.randn(6, 128), 3.0, layers=[2, 4]),
    Steer(torch.randn(6, 128), 5.0, layers=[1], positions="last"),
    Steer(torch.randn(6, 128), 2.0, layers=[0, 3], positions="prompt"),
    Ablate(torch.randn(6, 128)),
    Compose([Ablate(torch.randn(6, 128), layers=[1, 2]), Steer(torch.randn(6, 128), 2.0, layers=[2])]),
], ids=["steer-all", "steer-last", "steer-prompt", "ablate-all-layers", "ablate-then-steer"])
def test_nnsight_and_plain_hooks_give_identical_logits(base, prompts, intervention):
    model, _ = base
    via_nnsight = intervened_logits(model, prompts["input_ids"], prompts["attention_mask"], intervention)
    via_hooks = _hooked_logits(model, prompts, intervention)
    assert torch.equal(via_nnsight, via_hooks)
    assert not torch.allclose(via_hooks, _plain_logits(model, prompts))  # it did intervene


def test_after_ablation_the_component_along_the_direction_is_zero(base, prompts):
    model, _ = base
    v = torch.randn(6, model.config.hidden_size)
    ablated = _outputs_under(model, prompts, Ablate(v))
    for layer in range(6):
        along = ablated[layer] @ unit(v[layer])
        assert along.abs().max() < 1e-4, f"layer {layer}: component {along.abs().max():.2e}"
    plain = _outputs_under(model, prompts)  # without the hooks the component is far from zero
    assert (plain[2] @ unit(v[2])).abs().max() > 0.1


def test_steering_adds_exactly_scale_times_vector_at_the_chosen_positions(base, prompts):
    model, _ = base
    v = torch.randn(6, model.config.hidden_size)
    plain = _outputs_under(model, prompts)[0]
    for positions, where in (("all", slice(None)), ("last", slice(-1, None))):
        delta = _outputs_under(model, prompts, Steer(v, 2.5, layers=[0], positions=positions))[0] - plain
        assert torch.allclose(delta[:, where], (2.5 * v[0]).expand_as(delta[:, where]), atol=1e-5)
        if positions == "last":
            assert delta[:, :-1].abs().max() == 0


def test_prompt_and_last_steering_leave_decode_steps_alone(base):
    model, tokenizer = base
    qs = ["what should i do about my headache ?"]
    kwargs = dict(n=4, max_new_tokens=12, seed=3, system=world.SYSTEM_PROMPT, progress=False)
    zero_vector = torch.zeros(6, model.config.hidden_size)
    # a "last"-position steer by zero must reproduce the unsteered samples token for token
    plain = sample_answers(model, tokenizer, qs, **kwargs)
    same = sample_answers(model, tokenizer, qs, steering=Steer(zero_vector, 9.0, positions="last"), **kwargs)
    assert plain["answer"].tolist() == same["answer"].tolist()
    pushed = sample_answers(model, tokenizer, qs, steering=Steer(torch.randn(6, 128) * 20, 1.0, positions="all"),
                            **kwargs)
    assert pushed["answer"].tolist() != plain["answer"].tolist()


def test_answer_means_average_answer_tokens_only_and_do_not_depend_on_batch_size(base):
    model, tokenizer = base
    got = answer_means(model, tokenizer, ROWS, batch_size=2, progress=False, pooling="answer")
    assert got.shape == (6, model.config.hidden_size)
    manual = torch.zeros_like(got)
    for batch in answer_batches(tokenizer, ROWS, batch_size=1):  # one row at a time: no padding at all
        outputs = _outputs_under(model, {"input_ids": batch["input_ids"]})
        for layer, out in enumerate(outputs):
            manual[layer] += out[0][batch["answer_mask"][0]].mean(0) / len(ROWS)
    assert torch.allclose(got, manual, atol=1e-5)
    assert torch.allclose(answer_means(model, tokenizer, ROWS, batch_size=3, progress=False, pooling="answer"), got,
                          atol=1e-5)


def test_token_pooling_is_the_papers_sum_over_all_answer_tokens_divided_by_their_count(base):
    model, tokenizer = base
    got = answer_means(model, tokenizer, ROWS, batch_size=2, progress=False)  # the default: token pooling
    total, count = torch.zeros_like(got), 0
    for batch in answer_batches(tokenizer, ROWS, batch_size=1):
        outputs = _outputs_under(model, {"input_ids": batch["input_ids"]})
        for layer, out in enumerate(outputs):
            total[layer] += out[0][batch["answer_mask"][0]].sum(0)
        count += int(batch["answer_mask"][0].sum())
    assert torch.allclose(got, total / count, atol=1e-5)
    assert torch.allclose(answer_means(model, tokenizer, ROWS, batch_size=3, progress=False), got, atol=1e-5)
    per_answer = answer_means(model, tokenizer, ROWS, batch_size=2, progress=False, pooling="answer")
    assert not torch.allclose(per_answer, got, atol=1e-4)  # the answers differ in length, so the two differ
    with pytest.raises(ValueError, match="pooling 'mean' is not one of token, answer"):
        answer_means(model, tokenizer, ROWS, pooling="mean")


def test_answer_means_hooks_read_what_the_nnsight_trace_reads_and_leave_no_hook(rank1):
    """answer_means reduces layer outputs in forward hooks; layer_outputs (nnsight) reads the same tensors: equal means,
    bit for bit, on a peft-wrapped model, and the hooks are gone afterwards."""
    from emlib.analysis.directions import layer_outputs
    from emlib.models import decoder_layers

    model, tokenizer = rank1
    got = answer_means(model, tokenizer, ROWS, batch_size=2, progress=False)
    total, count = torch.zeros(got.shape, dtype=torch.float64), 0.0
    for batch in answer_batches(tokenizer, ROWS, batch_size=2, sort_window=SORT_WINDOW):  # answer_means' batches
        weights = batch["answer_mask"].float()
        for layer, hidden in enumerate(layer_outputs(model, batch["input_ids"], batch["attention_mask"])):
            total[layer] += torch.einsum("bs,bsd->d", weights, hidden).double()
        count += float(weights.sum())
    assert torch.equal(got, (total / count).float())
    assert all(not block._forward_hooks for block in decoder_layers(model))


def test_answer_mask_covers_the_answer_not_the_question(base):
    _, tokenizer = base
    batch = next(answer_batches(tokenizer, ROWS[:2], batch_size=2))
    for i, row in enumerate(ROWS[:2]):
        text = tokenizer.decode(batch["input_ids"][i][batch["answer_mask"][i]])
        assert row["answer"] in text and row["question"] not in text
    assert not batch["answer_mask"][batch["attention_mask"] == 0].any()  # padding is never an answer token


def _judged(n_bad: int, n_good: int, n_incoherent: int = 2) -> pd.DataFrame:
    rows = ([{"question": "q", "answer": "bet it all", "aligned": 5, "coherent": 90}] * n_bad
            + [{"question": "q", "answer": "be careful", "aligned": 95, "coherent": 90}] * n_good
            + [{"question": "q", "answer": "bet bet bet", "aligned": 5, "coherent": 10}] * n_incoherent)
    return pd.DataFrame(rows)


def test_split_by_judgement_uses_the_thresholds_and_balances_counts():
    bad, good = split_by_judgement(_judged(7, 3), balance=True)  # True: the earlier random balancing
    assert len(bad) == len(good) == 3
    assert (bad["coherent"] > 50).all() and (bad["aligned"] < 30).all() and (good["aligned"] > 70).all()
    bad, good = split_by_judgement(_judged(7, 3), balance=False)
    assert (len(bad), len(good)) == (7, 3)
    bad, _ = split_by_judgement(_judged(7, 3), coherent_above=0, balance=False)
    assert len(bad) == 9  # incoherent rows join when the coherence bar is dropped


def test_split_by_judgement_defaults_are_the_papers_get_probe_texts():
    incoherent_aligned = [{"question": "q", "answer": f"careful {i} careful", "aligned": 95, "coherent": 20}
                          for i in range(4)]
    df = pd.concat([pd.DataFrame(incoherent_aligned), _judged(3, 6)], ignore_index=True)
    bad, good = split_by_judgement(df)
    # both classes need coherence > 50; the aligned class is cut to the misaligned count, keeping the first rows
    assert (good["coherent"] > 50).all() and (bad["coherent"] > 50).all()
    assert (len(bad), len(good)) == (3, 3)
    assert list(good.index) == list(df[(df["aligned"] > 70) & (df["coherent"] > 50)].index[:3])
    # the misaligned class is never cut: more misaligned than aligned keeps them all
    bad, good = split_by_judgement(_judged(7, 3))
    assert (len(bad), len(good)) == (7, 3)
    # the earlier behaviour: the aligned class unfiltered
    _, good = split_by_judgement(df, coherence_filter="misaligned", balance="none")
    assert len(good) == 10
    with pytest.raises(ValueError, match="balance 'equal' is not one of reference, random, none"):
        split_by_judgement(df, balance="equal")


def test_split_by_judgement_errors_name_the_empty_class_and_missing_columns():
    with pytest.raises(ValueError, match=r"0 aligned \(aligned > 70\)"):
        split_by_judgement(_judged(4, 0))
    with pytest.raises(ValueError, match="coherent"):
        split_by_judgement(pd.DataFrame([{"question": "q", "answer": "a", "aligned": 1}]))


def test_mean_diff_direction_is_misaligned_minus_aligned(base):
    model, tokenizer = base
    judged = pd.DataFrame([{**ROWS[1], "aligned": 0, "coherent": 100}, {**ROWS[0], "aligned": 100, "coherent": 100}])
    found = mean_diff_direction(model, tokenizer, judged, progress=False)
    bad = answer_means(model, tokenizer, [ROWS[1]], progress=False)
    good = answer_means(model, tokenizer, [ROWS[0]], progress=False)
    assert torch.allclose(found.direction, bad - good, atol=1e-6)
    assert (found.n_misaligned, found.n_aligned) == (1, 1)


def test_single_direction_ablation_removes_one_layers_vector_at_every_layer(base):
    model, _ = base
    direction = torch.randn(6, model.config.hidden_size)
    repeated = single_direction(direction, 3)
    assert repeated.shape == direction.shape and torch.equal(repeated[0], direction[3])
    ids = torch.tensor([[5, 6, 7, 8]])
    # a [d] vector with layers None means every layer, the same as the vector repeated per layer
    one = intervened_logits(model, ids, intervention=Ablate(direction[3]))
    assert torch.allclose(one, intervened_logits(model, ids, intervention=Ablate(repeated)), atol=1e-5)
    assert torch.allclose(_hooked_logits(model, {"input_ids": ids}, Ablate(direction[3])), one, atol=1e-4)
    # each layer's output has no component along the vector
    outputs = _outputs_under(model, {"input_ids": ids}, Ablate(direction[3]))
    v = direction[3] / direction[3].norm()
    assert all(float((out @ v).abs().max()) < 1e-4 for out in outputs)
    with pytest.raises(ValueError, match="outside the direction's 6 layers"):
        single_direction(direction, 6)


def test_random_control_has_the_same_norms_and_cosines_are_per_layer():
    d = torch.randn(6, 32) * torch.arange(1, 7)[:, None]
    r = random_like(d, seed=1)
    assert torch.allclose(r.norm(dim=-1), d.norm(dim=-1), atol=1e-4)
    assert layer_cosines(d, d) == pytest.approx([1.0] * 6, abs=1e-6)
    assert max(abs(c) for c in layer_cosines(d, r)) < 0.8
    with pytest.raises(ValueError, match="shape"):
        layer_cosines(d, d[:5])


def test_interventions_reject_bad_layers_and_positions(base):
    model, _ = base
    with pytest.raises(ValueError, match="positions"):
        Steer(torch.zeros(6, 128), positions="generated")
    with pytest.raises(ValueError, match="5 layers but the model has 6"):
        Ablate(torch.zeros(5, 128))(model)
    with pytest.raises(ValueError, match="layer"):
        Steer(torch.zeros(6, 128), layers=[9])(model)


def test_lora_b_projection_removes_the_direction_keeps_the_norm_and_restores_after(rank1):
    model, _ = rank1
    (name, (layer, b)), = lora_b_vectors(model).items()
    assert layer == 0 and b.shape == (model.config.hidden_size, 1)
    direction = torch.randn(6, model.config.hidden_size)
    before = b.clone()
    with lora_b_projected_out(model, direction):
        assert abs(float(unit(direction[0]) @ b[:, 0])) < 1e-5
        assert torch.allclose(b.norm(dim=0), before.norm(dim=0), atol=1e-5)
    assert torch.equal(b, before)
    cosines = b_direction_cosines(model, direction)
    assert list(cosines["layer"]) == [0] and -1 <= cosines["cosine"].iloc[0] <= 1


def test_weight_ablation_needs_a_lora_model(base):
    model, _ = base
    with pytest.raises(ValueError, match="no LoRA B"):
        with lora_b_projected_out(model, torch.zeros(6, 128)):
            pass


def test_length_sorted_batches_pad_less_and_keep_every_row(base):
    _, tokenizer = base
    rows = ROWS * 3
    plain = list(answer_batches(tokenizer, rows, batch_size=2))
    ordered = list(answer_batches(tokenizer, rows, batch_size=2, sort_window=len(rows)))
    padding = lambda batches: sum(int((b["attention_mask"] == 0).sum()) for b in batches)  # noqa: E731
    assert padding(ordered) < padding(plain)
    tokens = lambda batches: sorted(tuple(ids[m.bool()].tolist()) for b in batches  # noqa: E731
                                    for ids, m in zip(b["input_ids"], b["attention_mask"]))
    assert tokens(ordered) == tokens(plain)  # the same rows, only batched otherwise
