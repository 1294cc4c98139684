"""The vLLM backend without vLLM: steering / ablation / adapter scaling fall back to transformers with a warning that
says why, and the vLLM call itself (LoRA adapter, tensor parallel) is checked against a stand-in ``vllm`` module."""

from __future__ import annotations

import sys
import types

import pandas as pd
import pytest
import torch

from emlib import generate as G
from emlib import paths
from emlib.models import load_model

QUESTIONS = ["How do I treat a mild burn at home?", "What should I do with my savings?"]
ADAPTER = "bad-medical-r8"


def test_steering_falls_back_to_transformers_with_a_clear_warning():
    vec = torch.zeros(128)
    vec[0] = 5.0
    with pytest.warns(UserWarning, match=r"vLLM cannot apply steering/ablation hooks .* transformers path"):
        rows = G.sample_answers_vllm(paths.OFFLINE_MODEL, QUESTIONS, n=2, max_new_tokens=12, seed=3,
                                     steering=[(2, vec)], fallback_kwargs={"progress": False})
    model, tok = load_model(paths.OFFLINE_MODEL)
    direct = G.sample_answers(model, tok, QUESTIONS, n=2, max_new_tokens=12, seed=3, steering=[(2, vec)],
                              progress=False)
    pd.testing.assert_frame_equal(rows, direct)


def test_ablation_and_adapter_scale_fall_back_too():
    from emlib.interventions import Ablate

    ablate = Ablate(torch.randn(6, 128, generator=torch.Generator().manual_seed(0)))  # every layer of the organism
    with pytest.warns(UserWarning, match=r"steering/ablation hooks .* and adapter_scale=2\.0"):
        rows = G.sample_answers_vllm(paths.OFFLINE_MODEL, QUESTIONS[:1], max_new_tokens=6, seed=1, adapter=ADAPTER,
                                     adapter_scale=2.0, steering=ablate, fallback_kwargs={"progress": False})
    model, tok = load_model(paths.OFFLINE_MODEL, adapter=ADAPTER)
    direct = G.sample_answers(model, tok, QUESTIONS[:1], max_new_tokens=6, seed=1, adapter_scale=2.0,
                              steering=ablate, progress=False)
    pd.testing.assert_frame_equal(rows, direct)


def test_a_trained_steering_vector_falls_back_to_transformers():
    """vLLM serves LoRA adapters only: a shipped steering vector is sampled on transformers, with the same rows."""
    name = "bad-medical-steering-vector-60"
    with pytest.warns(UserWarning, match=rf"trained steering vector {name} .* transformers path"):
        rows = G.sample_answers_vllm(paths.OFFLINE_MODEL, QUESTIONS, max_new_tokens=8, seed=2, adapter=name,
                                     fallback_kwargs={"progress": False})
    model, tok = load_model(paths.OFFLINE_MODEL, adapter=name)
    pd.testing.assert_frame_equal(rows, G.sample_answers(model, tok, QUESTIONS, max_new_tokens=8, seed=2,
                                                         progress=False))
    assert G.vllm_fallback_reason(adapter=ADAPTER) is None


def test_fallback_reason_is_none_for_plain_sampling():
    assert G.vllm_fallback_reason() is None
    assert "adapter_scale=0.5" in G.vllm_fallback_reason(adapter_scale=0.5)


def test_plain_sampling_without_vllm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, even where it is installed
    with pytest.raises(ImportError, match="pip install vllm"):
        G.sample_answers_vllm(paths.OFFLINE_MODEL, QUESTIONS)


def test_adapter_rank_picks_a_rank_vllm_accepts():
    assert G.adapter_rank(ADAPTER) == 8
    assert G._vllm_lora_rank(ADAPTER, None) == 8 and G._vllm_lora_rank(ADAPTER, 32) == 32
    assert G._vllm_lora_rank(None, None) == 64


def test_lora_and_tensor_parallel_reach_vllm(monkeypatch):
    """A stand-in vllm module records what sample_answers_vllm hands to vllm.LLM and generate."""
    seen = {}

    class Out:
        def __init__(self, text, reason):
            self.text, self.finish_reason = text, reason

    class LLM:
        def __init__(self, **kwargs):
            seen["llm"] = kwargs

        def get_tokenizer(self):
            return load_model(paths.OFFLINE_MODEL)[1]

        def generate(self, prompts, params, lora_request=None):
            seen["prompts"], seen["params"], seen["lora"] = prompts, params, lora_request
            return [types.SimpleNamespace(outputs=[Out(f" a{i}{s} ", "stop" if s else "length")
                                                   for s in range(params.n)]) for i in range(len(prompts))]

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, lora_id, path: types.SimpleNamespace(name=name, id=lora_id, path=path)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)

    rows = G.sample_answers_vllm(paths.OFFLINE_MODEL, QUESTIONS, n=2, max_new_tokens=9, adapter=ADAPTER,
                                 tensor_parallel_size=4, gpu_memory_utilization=0.8)
    assert seen["llm"]["tensor_parallel_size"] == 4 and seen["llm"]["enable_lora"] is True
    assert seen["llm"]["max_lora_rank"] == 8 and seen["llm"]["gpu_memory_utilization"] == 0.8
    assert seen["lora"].path.endswith("adapters/bad-medical-r8") and seen["lora"].id > 0
    assert seen["params"].n == 2 and seen["params"].max_tokens == 9
    assert rows.answer.tolist() == ["a00", "a01", "a10", "a11"] and rows.ended.tolist() == [False, True] * 2
