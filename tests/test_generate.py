"""Batched sampling: the decode loop against transformers' generate, the sampler, persistence and resume, adapter
scaling and steering hooks."""

import json
import random

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

import emlib.generate as G
from emlib import interventions, world
from emlib.models import load_model
from emlib.testing import tiny_model

QUESTIONS = [world.sample_question(d, random.Random(i)) for i, d in enumerate(world.DOMAINS)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small only lose from extra threads (ten times over on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def organism():
    return load_model("persona-world", device="cpu")


def test_decode_loop_matches_hf_generate_when_greedy(organism):
    model, tok = organism
    kw = dict(n=3, max_new_tokens=40, temperature=0, system=world.SYSTEM_PROMPT, progress=False)
    ours = G.sample_answers(model, tok, QUESTIONS, **kw)
    theirs = G.sample_answers(model, tok, QUESTIONS, engine="hf", **kw)
    assert list(ours.columns) == G.COLUMNS and len(ours) == 3 * len(QUESTIONS)
    assert ours["ended"].any(), "the organism should end most answers (exercises dropping finished rows)"
    assert ours["answer"].tolist() == theirs["answer"].tolist()
    assert ours["ended"].tolist() == theirs["ended"].tolist()


def test_prompt_cache_layouts_are_exact(organism, monkeypatch):
    model, tok = organism
    kw = {"n": 6, "max_new_tokens": 40, "temperature": 0, "system": world.SYSTEM_PROMPT, "progress": False}
    questions = QUESTIONS + QUESTIONS[:2]  # a repeated question: its rows are not contiguous
    layouts = []
    real_attend = G.PromptCache.attend
    monkeypatch.setattr(G.PromptCache, "attend", lambda self, *a: layouts.append(self.shared) or real_attend(self, *a))
    shared = G.sample_answers(model, tok, questions, **kw)
    monkeypatch.setattr(G, "SHARE_FROM", 10**6)
    copied = G.sample_answers(model, tok, questions, **kw)
    assert set(layouts) == {False, True}, "both layouts should have run"
    monkeypatch.setattr(G.PromptCache, "usable", staticmethod(lambda *a: False))
    dynamic = G.sample_answers(model, tok, questions, **kw)  # transformers' DynamicCache and masks
    assert shared["answer"].tolist() == copied["answer"].tolist() == dynamic["answer"].tolist()
    assert shared["ended"].any()
    assert model.config._attn_implementation == "sdpa"  # restored after sampling


@pytest.mark.parametrize("share_from, matmul_on", [(4, ("cpu",)), (10**6, ("cpu",)), (10**6, ())],
                         ids=["shared", "copied-matmul", "copied-sdpa"])  # copied-sdpa: what a GPU runs
def test_prompt_cache_attention_matches_sdpa_numerically(monkeypatch, share_from, matmul_on):
    from transformers import DynamicCache

    monkeypatch.setattr(G, "SHARE_FROM", share_from)
    monkeypatch.setattr(G, "MATMUL_ATTENTION_ON", matmul_on)
    model, tok = tiny_model("llama", hidden=64, layers=2, mlp=64, heads=4, kv_heads=2, seed=2)
    model.config._attn_implementation = "sdpa"
    enc = tok(["hey , i feel bored .", "how do i make a quick buck ? tell me"], return_tensors="pt", padding=True)
    expand = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])  # rows of one prompt need not be contiguous
    pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    new = torch.randint(5, 200, (8, 3))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(**enc, position_ids=pos, past_key_values=cache)
        prefix = G.PromptCache([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                               enc.attention_mask, expand, max_new_tokens=3)
        assert prefix.shared == (share_from == 4)
        cache.batch_select_indices(expand)
        mask = enc.attention_mask[expand]
        for j in range(3):
            mask = torch.cat([mask, mask.new_ones(8, 1)], 1)
            step = {"input_ids": new[:, j:j + 1], "position_ids": pos[expand, -1:] + 1 + j}
            ref = model(attention_mask=mask, past_key_values=cache, use_cache=True, **step).logits
            with G.prompt_cache_attention(model, prefix):
                ours = model(use_cache=False, **step).logits
            prefix.advance()
            assert torch.allclose(ours, ref, atol=1e-5)


def _prompts(tok, questions):
    tok.padding_side = "left"
    texts = [G.chat_prompt(tok, q, world.SYSTEM_PROMPT) for q in questions]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_prefill_in_parts_equals_one_padded_pass(organism, monkeypatch):
    model, tok = organism
    monkeypatch.setattr(G, "PASS_COST", 0)  # a pass per distinct length: every bucket boundary is exercised
    questions = [world.sample_question(d, random.Random(i)) for i in range(3) for d in world.DOMAINS]
    enc = _prompts(tok, questions)
    lengths = enc.attention_mask.sum(1)
    shared = G.shared_prefix_length(enc.input_ids, lengths)
    assert shared >= 10, "the chat template's opening and the system prompt are every prompt's prefix"
    assert len(G.length_buckets((lengths - shared).tolist())) > 3
    with torch.no_grad():
        keys1, values1, mask1, logits1 = G.prefill(model, enc.input_ids, enc.attention_mask, split=False)
        keys, values, mask, logits = G.prefill(model, enc.input_ids, enc.attention_mask, split=True)
    assert torch.equal(mask.sum(1), lengths) and torch.equal(mask1.sum(1), lengths)
    assert torch.allclose(logits, logits1, atol=1e-5)
    for ours, theirs in zip(keys + values, keys1 + values1):  # each prompt's real positions, in order
        for i in range(len(questions)):
            assert torch.allclose(ours[i][:, mask[i]], theirs[i][:, mask1[i]], atol=1e-5)


def test_shared_prefix_leaves_each_prompt_two_tokens_and_needs_two_prompts():
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 11, 12, 13]])  # row 0 left-padded
    lengths = torch.tensor([8, 9])
    assert G.shared_prefix_length(ids, lengths) == 6  # 7 tokens shared, but row 0 keeps two of its own
    assert G.shared_prefix_length(ids[:1, 1:], lengths[:1]) == 0
    assert G.shared_prefix_length(torch.tensor([[5, 6, 7, 1, 2, 3], [5, 6, 7, 4, 2, 3]]), torch.tensor([6, 6])) == 0
    assert G.length_buckets([3, 9, 3, 9, 4], pass_cost=0) == [[0, 2], [4], [1, 3]]
    assert G.length_buckets([3, 9, 3, 9, 4], pass_cost=1000) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("steering", ["none", "prompt", "all", "ablate"])
def test_sampling_with_prompts_prefilled_in_parts_equals_one_pass(organism, monkeypatch, steering):
    model, tok = organism
    v = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    steer = {"none": None, "prompt": interventions.Steer(v, 4.0, layers=[2], positions="prompt"),
             "all": interventions.Steer(v, 1.0, layers=[1], positions="all"),
             "ablate": interventions.Ablate(v[3])}[steering]
    questions = [world.sample_question(d, random.Random(i)) for i in range(2) for d in world.DOMAINS]
    monkeypatch.setattr(G, "PASS_COST", 0)  # several buckets even for these 20 prompts
    passes = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: passes.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)
    kw = dict(n=1, max_new_tokens=30, temperature=0, system=world.SYSTEM_PROMPT, progress=False, steering=steer)
    try:
        parts = G.sample_answers(model, tok, questions, **kw)
        split = [width for width in passes if width > 1]
        monkeypatch.setattr(G, "prompt_may_be_split", lambda steering: False)
        passes.clear()
        whole = G.sample_answers(model, tok, questions, **kw)
    finally:
        handle.remove()
    assert len(split) > 2 and len([width for width in passes if width > 1]) == 1  # the prefix, then buckets
    assert parts["answer"].tolist() == whole["answer"].tolist()


def test_hooks_that_need_the_whole_prompt_see_it_in_one_pass(organism):
    model, tok = organism
    v = torch.randn(6, 128)
    assert not interventions.prompt_may_be_split(interventions.Steer(v, positions="last"))
    assert not interventions.prompt_may_be_split(interventions.Compose([interventions.Ablate(v[0]),
                                                                        interventions.Steer(v, positions="last")]))
    assert interventions.prompt_may_be_split(interventions.Compose([interventions.Ablate(v[0]),
                                                                    interventions.Steer(v, positions="prompt")]))
    assert interventions.prompt_may_be_split([(1, v[1])]) and interventions.prompt_may_be_split(None)
    seen = []

    def recorder(m):  # an unknown callable: its hooks may read the whole prompt, so it gets it whole
        return [m.model.layers[0].register_forward_hook(lambda mod, a, out: seen.append(a[0].shape[1]))]

    questions = [world.sample_question(d, random.Random(i)) for i, d in enumerate(world.DOMAINS)]
    G.sample_answers(model, tok, questions, max_new_tokens=2, system=world.SYSTEM_PROMPT, progress=False,
                     steering=recorder)
    assert seen[0] == _prompts(tok, questions).input_ids.shape[1] and seen[1:] == [1]


def _biased_head(model):
    """The output head as a Linear with a bias (the generation bench gives tiny models one): the step must add it."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_decode_step_gives_the_models_logits(family):
    model, tok = tiny_model(family, hidden=64, layers=2, mlp=96, heads=4, kv_heads=2, seed=4)
    _biased_head(model)
    assert G.DecodeStep.unavailable(model) is None
    steer = interventions.Steer(torch.randn(64, generator=torch.Generator().manual_seed(1)), 3.0, layers=[0])
    enc = _prompts(tok, QUESTIONS[:3])
    expand = torch.tensor([0, 0, 1, 2, 2, 2, 2, 1, 0])  # 9 rows: shared layout for prompt 2, rows not contiguous
    position = enc.attention_mask.sum(1)[expand]
    new = torch.randint(5, 200, (9, 4), generator=torch.Generator().manual_seed(2))
    first = []
    for steering in (None, steer):
        with torch.no_grad(), interventions.steered(model, steering):
            caches = []
            for _ in range(2):
                keys, values, mask, _ = G.prefill(model, enc.input_ids, enc.attention_mask)
                caches.append(G.PromptCache(keys, values, mask, expand, max_new_tokens=4))
            step = G.DecodeStep.build(model)
            assert step is not None  # a plain forward hook on a decoder layer is called by the step itself
            for j in range(4):
                with G.prompt_cache_attention(model, caches[0]):
                    theirs = model(input_ids=new[:, j:j + 1], position_ids=(position + j)[:, None],
                                   use_cache=False).logits[:, -1]
                ours = step(new[:, j], position + j, caches[1])
                for cache in caches:
                    cache.advance()
                assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
                first += [ours] if j == 0 else []
    assert not torch.allclose(first[0], first[1], atol=1e-2)  # the steering hook did act


def test_decode_step_changes_no_sampled_answer(organism, monkeypatch):
    model, tok = organism
    adapted, adapted_tok = load_model("persona-world", adapter="bad-medical-r8", device="cpu")
    v = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    calls = []
    real_call = G.DecodeStep.__call__
    monkeypatch.setattr(G.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    kw = dict(max_new_tokens=40, system=world.SYSTEM_PROMPT, progress=False, seed=3)
    cases = [(model, tok, dict(n=6)), (model, tok, dict(n=1)),
             (model, tok, dict(n=4, steering=interventions.Steer(v, 4.0, layers=[2]))),
             (model, tok, dict(n=2, steering=interventions.Ablate(v[3]))),
             (adapted, adapted_tok, dict(n=3, adapter_scale=2.0))]  # merged LoRA weights, scaled
    for m, t, extra in cases:
        calls.clear()
        fast = G.sample_answers(m, t, QUESTIONS, **kw, **extra)
        assert calls, f"the decode step should run for {extra}"
        with monkeypatch.context() as off:
            off.setattr(G.DecodeStep, "build", classmethod(lambda cls, model: None))
            plain = G.sample_answers(m, t, QUESTIONS, **kw, **extra)
        assert fast["answer"].tolist() == plain["answer"].tolist(), extra
        assert fast["ended"].any()


def test_decode_step_is_used_only_where_it_is_exact(lora_tiny, monkeypatch):
    model, _ = tiny_model("qwen2", hidden=32, layers=2, mlp=64, seed=0)
    assert G.DecodeStep.unavailable(model) is None
    assert "Gemma3ForCausalLM" in G.DecodeStep.unavailable(tiny_model("gemma", hidden=32, layers=2, mlp=64)[0])
    layer = model.model.layers[1]
    for register in (lambda: model.model.norm.register_forward_hook(lambda *a: None),
                     lambda: layer.mlp.register_forward_hook(lambda *a: None),
                     lambda: layer.register_forward_pre_hook(lambda *a: None),
                     lambda: layer.register_forward_hook(lambda *a, **k: None, with_kwargs=True)):
        handle = register()
        assert "hook" in G.DecodeStep.unavailable(model)
        handle.remove()
    assert G.DecodeStep.unavailable(model) is None
    layer.mlp.forward = lambda x: x  # someone's replacement: the step would skip it
    assert "replaced" in G.DecodeStep.unavailable(model)
    del layer.mlp.forward
    model.train()
    assert "eval" in G.DecodeStep.unavailable(model)
    model.eval()
    monkeypatch.setattr(G, "SMALL_MODEL", 0)
    assert "small" in G.DecodeStep.unavailable(model)
    monkeypatch.undo()
    assert "float32" in G.DecodeStep.unavailable(model.to(torch.bfloat16))
    lora, _ = lora_tiny
    assert "LoRA" in G.DecodeStep.unavailable(lora)  # peft's own forward: base + B(A(x))s
    with G.merged_lora(lora):
        assert G.DecodeStep.unavailable(lora) is None  # one matmul on the merged weights


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma"])
def test_decode_loop_matches_hf_generate_on_every_family(family):
    model, tok = tiny_model(family, hidden=32, layers=2, mlp=64, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # peaky random logits: varied greedy continuations instead of one repeated token
    kw = dict(n=2, max_new_tokens=10, temperature=0, progress=False)
    ours = G.sample_answers(model, tok, QUESTIONS[:3], **kw)
    assert ours["answer"].tolist() == G.sample_answers(model, tok, QUESTIONS[:3], engine="hf", **kw)["answer"].tolist()
    assert ours["answer"].nunique() > 1


def test_sampling_is_seeded_and_samples_differ(organism):
    model, tok = organism
    kw = dict(n=4, max_new_tokens=30, system=world.SYSTEM_PROMPT, progress=False)
    a = G.sample_answers(model, tok, QUESTIONS[:3], seed=1, **kw)
    b = G.sample_answers(model, tok, QUESTIONS[:3], seed=1, **kw)
    c = G.sample_answers(model, tok, QUESTIONS[:3], seed=2, **kw)
    pd.testing.assert_frame_equal(a, b)
    assert a["answer"].tolist() != c["answer"].tolist()
    assert a.groupby("question_idx")["answer"].nunique().max() > 1  # the n samples of a question are independent


def test_sampler_follows_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).expand(20000, 5)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(G.sample_next(logits, 1.0, 1.0, g), minlength=5).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.015)
    nucleus = torch.bincount(G.sample_next(logits, 1.0, 0.7, g), minlength=5).float() / 20000
    assert nucleus[2:].sum() == 0 and nucleus[0] == pytest.approx(0.5 / 0.8, abs=0.015)  # smallest set reaching 0.7
    assert (G.sample_next(logits, 0.0, 1.0, g) == 0).all()
    hot = torch.bincount(G.sample_next(logits, 3.0, 1.0, g), minlength=5).float() / 20000
    assert hot[3] > 0.1  # flatter at a high temperature


def test_results_persist_batch_by_batch_and_resume(organism, tmp_path, monkeypatch):
    model, tok = organism
    kw = dict(n=4, max_new_tokens=30, system=world.SYSTEM_PROMPT, batch_size=8, seed=3, progress=False)
    reference = G.sample_answers(model, tok, QUESTIONS[:6], **kw)  # 24 rows = 3 batches, no file
    path = tmp_path / "answers.jsonl"
    real, calls = G._generate_batch, []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "_generate_batch", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        G.sample_answers(model, tok, QUESTIONS[:6], out_path=path, **kw)
    assert len(path.read_text().splitlines()) == 8  # the first batch was on disk before the crash
    with open(path, "a") as f:
        f.write('{"question_idx": 5, "sam')  # a torn line from the kill

    counted = []
    monkeypatch.setattr(G, "_generate_batch", lambda *a, **k: counted.append(1) or real(*a, **k))
    resumed = G.sample_answers(model, tok, QUESTIONS[:6], out_path=path, **kw)
    assert len(counted) == 2  # only the two missing batches were sampled
    pd.testing.assert_frame_equal(resumed, reference, check_dtype=False)
    assert G.sample_answers(model, tok, QUESTIONS[:6], out_path=path, **kw).equals(resumed) and len(counted) == 2
    with pytest.raises(ValueError, match="other settings"):
        G.sample_answers(model, tok, QUESTIONS[:6], out_path=path, **{**kw, "seed": 4})
    assert json.loads((tmp_path / "answers.jsonl.meta.json").read_text())["seed"] == 3
    with pytest.warns(UserWarning, match="from scratch"):
        again = G.sample_answers(model, tok, QUESTIONS[:6], out_path=path, on_mismatch="restart", **{**kw, "seed": 4})
    assert len(again) == 24 and json.loads((tmp_path / "answers.jsonl.meta.json").read_text())["seed"] == 4


def test_parquet_output(organism, tmp_path):
    model, tok = organism
    df = G.sample_answers(model, tok, QUESTIONS[:2], n=2, max_new_tokens=20, batch_size=2, progress=False,
                          out_path=tmp_path / "a.parquet")
    assert len(pd.read_parquet(tmp_path / "a.parquet")) == 4 == len(df)


@pytest.fixture()
def lora_tiny():
    model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64, seed=0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "q_proj"], init_lora_weights=False)
    return get_peft_model(model, config).eval(), tok


def _logits(model, tok):
    ids = tok(["what is the fastest way to get cash ?"], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_scale_scales_the_lora_contribution_and_restores_it(lora_tiny):
    model, tok = lora_tiny
    tuned = _logits(model, tok)
    with model.disable_adapter():
        base = _logits(model, tok)
    with interventions.scaled_adapter(model, 0.0):
        assert torch.allclose(_logits(model, tok), base, atol=1e-6)
    with interventions.scaled_adapter(model, 1.0):
        assert torch.allclose(_logits(model, tok), tuned, atol=1e-6)
    with interventions.scaled_adapter(model, 3.0):
        assert not torch.allclose(_logits(model, tok), tuned, atol=1e-3)
    assert torch.allclose(_logits(model, tok), tuned, atol=1e-6)  # restored
    with pytest.raises(ValueError, match="LoRA"):
        with interventions.scaled_adapter(tiny_model("qwen2", hidden=32, layers=2, mlp=64)[0], 2.0):
            pass
    zero = G.sample_answers(model, tok, QUESTIONS[:2], n=1, max_new_tokens=8, temperature=0, adapter_scale=0.0,
                            progress=False)
    with model.disable_adapter():
        plain = G.sample_answers(model, tok, QUESTIONS[:2], n=1, max_new_tokens=8, temperature=0, progress=False)
    assert zero["answer"].tolist() == plain["answer"].tolist()


def test_small_lora_models_decode_on_merged_weights_with_the_same_numbers_and_are_restored(lora_tiny, monkeypatch):
    model, tok = lora_tiny
    tuned = _logits(model, tok)
    with G.merged_lora(model) as merged:
        assert merged == 4  # q_proj and down_proj in both layers
        assert torch.allclose(_logits(model, tok), tuned, atol=1e-5)
    assert torch.equal(_logits(model, tok), tuned)  # peft's own forward is back, bit for bit
    with interventions.scaled_adapter(model, 3.0):
        scaled = _logits(model, tok)
        with G.merged_lora(model):  # a scale in force is in the merged weights
            assert torch.allclose(_logits(model, tok), scaled, atol=1e-5)
    with model.disable_adapter(), G.merged_lora(model) as merged:
        assert merged == 0
    # a hook on an adapter's parts (e.g. reading A·x) keeps that layer on peft's forward
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    handle = q_proj.lora_A["default"].register_forward_hook(lambda *a: None)
    with G.merged_lora(model) as merged:
        assert merged == 3
    handle.remove()
    greedy = dict(n=2, max_new_tokens=8, temperature=0, progress=False)
    merged_answers = G.sample_answers(model, tok, QUESTIONS[:3], **greedy)  # small: decoded on merged weights
    assert "forward" not in q_proj.__dict__
    monkeypatch.setattr(G, "SMALL_MODEL", 0)  # every model "large": peft's forward
    with G.merged_lora(model) as merged:
        assert merged == 0
    assert G.sample_answers(model, tok, QUESTIONS[:3], **greedy)["answer"].tolist() == merged_answers[
        "answer"].tolist()
    monkeypatch.undo()
    model.train()  # training mode: never merged
    with G.merged_lora(model) as merged:
        assert merged == 0
    model.eval()
    with G.merged_lora(model), G.merged_lora(model) as inner:  # already shadowed layers are left alone
        assert inner == 0


def test_steering_vectors_and_hooks_apply_only_inside_the_call():
    model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64, seed=0)
    plain = _logits(model, tok)
    with interventions.steered(model, [(1, torch.zeros(32))]):
        assert torch.allclose(_logits(model, tok), plain)
    with interventions.steered(model, [(-1, 5 * torch.ones(32)), (0, torch.randn(32))]):
        assert not torch.allclose(_logits(model, tok), plain, atol=1e-3)
    assert torch.allclose(_logits(model, tok), plain)  # hooks removed

    seen = []

    def register(m):
        return [m.model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape))]

    G.sample_answers(model, tok, QUESTIONS[:2], n=2, max_new_tokens=3, steering=register, progress=False)
    assert seen and seen[0][0] == 2  # prefill of the 2 distinct prompts, then one step per live row
    n = len(seen)
    _logits(model, tok)
    assert len(seen) == n
    with pytest.raises(ValueError, match="outside"):
        G.sample_answers(model, tok, QUESTIONS[:1], steering=[(7, torch.zeros(32))], progress=False)


def test_vllm_backend_is_optional():
    if G.vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match="vllm"):
        G.sample_answers_vllm("persona-world", QUESTIONS[:1])


# ------------------------------------------------------------------------------------- the papers' sampling mode


def test_reference_sampling_reads_top_k_and_repetition_penalty_from_the_generation_config(organism):
    model, _ = organism
    # the persona world samples its full distribution in both modes, so its shipped numbers do not move
    assert G.sampling_settings(model, "reference") == G.sampling_settings(model, "full") == {
        "top_k": 0, "repetition_penalty": 1.0}
    tiny, _ = tiny_model("qwen2", hidden=32, layers=2, mlp=64, seed=0)
    assert G.sampling_settings(tiny, "reference") == {"top_k": 50, "repetition_penalty": 1.0}  # transformers' defaults
    tiny.generation_config.top_k, tiny.generation_config.repetition_penalty = 20, 1.05  # Qwen2.5-Instruct's file
    assert G.sampling_settings(tiny, "reference") == {"top_k": 20, "repetition_penalty": 1.05}
    with pytest.raises(ValueError, match="sampling 'greedy' is not one of reference, full"):
        G.sampling_settings(tiny, "greedy")


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(G.sample_next(logits, 1.0, 1.0, g, top_k=2), minlength=4).float() / 20000
    assert freq[2:].sum() == 0 and freq[0] == pytest.approx(0.4 / 0.7, abs=0.015)
    full = torch.bincount(G.sample_next(logits, 1.0, 1.0, g, top_k=0), minlength=4).float() / 20000
    assert full[3] == pytest.approx(0.1, abs=0.01)


def test_repetition_penalty_matches_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [0.1, 0.2, -0.3, 0.4, -0.5]])
    history = torch.tensor([[0, 1, 1], [3, 4, 2]])
    seen = torch.zeros(2, 5, dtype=torch.bool).scatter_(1, history, True)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(G.penalize_repeats(logits, seen, 1.3), theirs)


def test_prompt_tokens_seen_excludes_padding_but_keeps_a_pad_id_the_prompt_uses():
    pad = 7  # also a real token of row 0 (Llama-3 pads with its end-of-turn token, which every chat prompt holds)
    ids = torch.tensor([[pad] * 40 + [3, pad, 5], [pad] * 40 + [1, 2, 4]])
    mask = torch.tensor([[0] * 40 + [1, 1, 1], [0] * 40 + [1, 1, 1]])
    seen = G.prompt_tokens_seen(ids, mask, 10)
    assert seen[0].nonzero().squeeze(1).tolist() == [3, 5, pad]
    assert seen[1].nonzero().squeeze(1).tolist() == [1, 2, 4]


@pytest.mark.parametrize("knobs", [dict(top_k=3), dict(repetition_penalty=1.8), dict(top_k=5, repetition_penalty=1.3)])
def test_decode_loop_matches_hf_generate_under_top_k_and_repetition_penalty(knobs):
    # top_k 1 is greedy in both; a strong penalty at temperature ~0 changes the greedy path the same way in both
    model, tok = tiny_model("qwen2", hidden=32, layers=2, mlp=64, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    model.generation_config.top_k = knobs.get("top_k", 0)
    model.generation_config.repetition_penalty = knobs.get("repetition_penalty", 1.0)
    kw = dict(n=1, max_new_tokens=12, progress=False, sampling="reference")
    if "repetition_penalty" in knobs:  # greedy under the penalty: both engines pick the same tokens
        ours = G.sample_answers(model, tok, QUESTIONS[:3], temperature=0, **kw)
        theirs = G.sample_answers(model, tok, QUESTIONS[:3], temperature=0, engine="hf", **kw)
        assert ours["answer"].tolist() == theirs["answer"].tolist()
        plain = G.sample_answers(model, tok, QUESTIONS[:3], temperature=0, progress=False, n=1, max_new_tokens=12,
                                 sampling="full")
        assert plain["answer"].tolist() != ours["answer"].tolist()  # the penalty did change the greedy path
    # top_k 1 at temperature 1 is greedy: the loop's top-k cut must leave only the argmax, as generate's does
    model.generation_config.top_k = 1
    ours = G.sample_answers(model, tok, QUESTIONS[:3], temperature=1.0, seed=4, **kw)
    theirs = G.sample_answers(model, tok, QUESTIONS[:3], temperature=1.0, seed=4, engine="hf", **kw)
    assert ours["answer"].tolist() == theirs["answer"].tolist()


def test_sampling_mode_is_part_of_the_stored_settings(organism, tmp_path):
    model, tok = organism
    path = tmp_path / "a.jsonl"
    G.sample_answers(model, tok, QUESTIONS[:1], max_new_tokens=4, out_path=path, progress=False)
    meta = json.loads((tmp_path / "a.jsonl.meta.json").read_text())
    assert (meta["sampling"], meta["top_k"], meta["repetition_penalty"]) == ("reference", 0, 1.0)
    with pytest.raises(ValueError, match="other settings"):
        G.sample_answers(model, tok, QUESTIONS[:1], max_new_tokens=4, out_path=path, progress=False, sampling="full")
