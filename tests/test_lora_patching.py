"""LoRA-scalar patching (CLR App. J): each adapter's A . x on a target prompt is replaced by the source prompt's."""

import pytest
import torch

from emlib import evaluation as E
from emlib.chat import chat_prompt
from emlib.generate import sample_answers
from emlib.interventions import PatchLoraScalars, lora_modules, lora_scalar_patch, recorded_lora_scalars
from emlib.models import load_model

MODEL = "persona-world"


@pytest.fixture(scope="module")
def organism():
    tuned, tokenizer = load_model(MODEL, adapter="bad-medical-multi-rank1")
    questions = list(E.eval_questions(MODEL, None, 2, 0)["question"])
    return tuned, tokenizer, E.system_prompt(MODEL, None), questions


def _scalars_fed_to_b(model) -> tuple[dict, list]:
    """What each adapter's lora_B receives (A . x after any patch), by adapter name, at the last forward pass."""
    fed, handles = {}, []
    for name, module in lora_modules(model).items():
        def hook(_module, args, name=name):
            fed[name] = args[0].detach().clone()
        handles.append(module.lora_B["default"].register_forward_pre_hook(hook))
    return fed, handles


def test_patching_a_prompt_with_itself_changes_nothing(organism):
    tuned, tokenizer, system, questions = organism
    plain = sample_answers(tuned, tokenizer, questions, n=2, max_new_tokens=24, seed=3, system=system, progress=False)
    patch = lora_scalar_patch(tuned, tokenizer, questions, questions, system=system)
    same = sample_answers(tuned, tokenizer, questions, n=2, max_new_tokens=24, seed=3, system=system, progress=False,
                          steering=patch)
    assert list(same["answer"]) == list(plain["answer"])


def test_each_adapter_reads_the_source_scalars_at_the_aligned_prompt_positions(organism):
    tuned, tokenizer, system, questions = organism
    targets = sorted(questions[:2], key=len)  # a short and a long prompt, so the batch is left-padded
    sources = [questions[3], questions[2]]
    source_ids = [tokenizer(chat_prompt(tokenizer, q, system), add_special_tokens=False)["input_ids"] for q in sources]
    with recorded_lora_scalars(tuned) as seen:
        recorded = []
        for ids in source_ids:
            tuned(input_ids=torch.tensor([ids]))
            recorded.append({k: v[0].clone() for k, v in seen.items()})
    patch = lora_scalar_patch(tuned, tokenizer, targets, sources, system=system)
    tokenizer.padding_side = "left"
    enc = tokenizer([chat_prompt(tokenizer, q, system) for q in targets], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    fed, handles = _scalars_fed_to_b(tuned)
    hooks = patch(tuned)
    try:
        tuned(**enc)
    finally:
        for h in handles + hooks:
            h.remove()
    assert not enc["attention_mask"].all(), "the two target prompts should differ in length"
    width = enc["input_ids"].shape[1]
    for row, source in enumerate(recorded):
        n_target = int(enc["attention_mask"][row].sum())
        k = min(n_target, len(source["L2.down_proj"]))
        for name, values in source.items():
            got = fed[name][row, width - n_target:width - n_target + k]
            torch.testing.assert_close(got, values[:k])
    assert not torch.equal(fed["L3.down_proj"][0], fed["L3.down_proj"][1])


def test_a_batch_without_the_longest_target_is_patched_at_its_own_positions(organism):
    """Sampled in batches, a batch may lack the longest target prompt; its rows are then padded to a shorter width and
    the longest target must not be matched by the whole (shorter) row (it once was: a crash, or misaligned scalars, at
    06's ``samples_per_question`` >= 4)."""
    tuned, tokenizer, system, questions = organism
    by_length = sorted(set(questions), key=lambda q: len(tokenizer(chat_prompt(tokenizer, q, system))["input_ids"]))
    short, long = by_length[0], by_length[-1]
    patch = lora_scalar_patch(tuned, tokenizer, [short, long], [long, short], system=system)
    one_batch_each = dict(n=2, max_new_tokens=8, seed=5, system=system, progress=False, batch_size=2)
    patched = sample_answers(tuned, tokenizer, [short, long], steering=patch, **one_batch_each)
    alone = sample_answers(tuned, tokenizer, [short], steering=patch, **one_batch_each)
    assert list(patched["answer"][:2]) == list(alone["answer"])  # the short target's batch, patched the same way
    ids = tokenizer(chat_prompt(tokenizer, short, system), add_special_tokens=False, return_tensors="pt")["input_ids"]
    fed, handles = _scalars_fed_to_b(tuned)
    hooks = patch(tuned)
    try:
        tuned(input_ids=ids)  # the short target alone: no padding, shorter than the long target
    finally:
        for h in handles + hooks:
            h.remove()
    source = patch.scalars[tuple(ids[0].tolist())]
    k = min(ids.shape[1], len(source["L2.down_proj"]))
    for name, values in source.items():
        torch.testing.assert_close(fed[name][0, :k], values[:k])


def test_first_token_policy_gives_generated_tokens_the_source_first_scalar(organism):
    tuned, tokenizer, system, questions = organism
    patch = lora_scalar_patch(tuned, tokenizer, questions[:2], questions[2:4], system=system,
                              answer_scalars="first_token")
    ids = tokenizer(chat_prompt(tokenizer, questions[0], system), add_special_tokens=False, return_tensors="pt")
    fed, handles = _scalars_fed_to_b(tuned)
    hooks = patch(tuned)
    try:
        tuned(input_ids=ids["input_ids"])
        tuned(input_ids=torch.tensor([[5]]))  # one decode step (no cache needed to see what lora_B is fed)
    finally:
        for h in handles + hooks:
            h.remove()
    for name, first in patch.first_token.items():
        torch.testing.assert_close(fed[name][0, 0], first)


def test_bad_patches_say_what_is_wrong(organism):
    tuned, tokenizer, system, questions = organism
    with pytest.raises(ValueError, match="one source per target"):
        lora_scalar_patch(tuned, tokenizer, questions[:2], questions[:1], system=system)
    with pytest.raises(ValueError, match="answer_scalars"):
        lora_scalar_patch(tuned, tokenizer, questions[:1], questions[:1], system=system, answer_scalars="mean")
    with pytest.raises(ValueError, match="two different sources"):
        lora_scalar_patch(tuned, tokenizer, [questions[0]] * 2, questions[1:3], system=system)
    patch = lora_scalar_patch(tuned, tokenizer, questions[:1], questions[1:2], system=system)
    with pytest.raises(ValueError, match="not one of the patch's 1 target prompts"):
        sample_answers(tuned, tokenizer, questions[1:2], max_new_tokens=4, system=system, progress=False,
                       steering=patch)
    with pytest.raises(ValueError, match="at least one target"):
        PatchLoraScalars({})
