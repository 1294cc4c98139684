"""Stability of narrow vs general misalignment solutions (NMH follow-up, paper-facts §6.6).

Three measures of a trained solution (a peft LoRA / rank-1 model, or a :class:`~emlib.train.steering_vector.SteeredModel`):

* :func:`loss_vs_scale` — training loss as the learned update is rescaled from 0 to 2x (every LoRA layer's
  ``B A * scaling``, or the steering vector): how sharp the minimum is along its own direction;
* :func:`loss_at_norm` / :func:`solution_norm` — loss with the update rescaled to a given norm, to compare the narrow
  and the general solutions at matched norms;
* :func:`kl_on_base_generations` — KL(base || tuned) on continuations the *base* model generated: how far the solution
  moved the model's behaviour on its own distribution.

    curve = loss_vs_scale(peft_model, tokenizer, rows, scales=[0, 0.5, 1, 1.5, 2])
    kl = kl_on_base_generations(peft_model, tokenizer, questions, system=world.SYSTEM_PROMPT)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from emlib.chat import collate, encode_rows
from emlib.interventions import lora_layers, scaled_solution, steering_vector_of
from emlib.train import kl_to_reference, reference_mode


@torch.no_grad()
def solution_norm(module: nn.Module) -> float:
    """Frobenius norm of the learned update: sqrt(sum over LoRA layers of ||scaling * B A||^2), or ||alpha * v||.

    It scales linearly with :func:`scaled_solution`'s factor, so two solutions can be compared at matched norms.
    """
    steered = steering_vector_of(module)
    if steered is not None:
        return float(steered.alpha * steered.vector.float().norm())
    total = 0.0
    for m in lora_layers(module):
        for name, scale in m.scaling.items():
            if name not in m.lora_A:
                continue
            delta = m.lora_B[name].weight.float() @ m.lora_A[name].weight.float()
            total += float((scale * delta).pow(2).sum())
    return math.sqrt(total)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def mean_loss(module: nn.Module, tokenizer, rows: Sequence[dict], batch_size: int = 32, max_length: int = 512,
              examples=None) -> float:
    """Token-mean cross-entropy on the assistant tokens of ``rows`` (the training loss, without dropout)."""
    examples = examples if examples is not None else encode_rows(tokenizer, rows, max_length=max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = module.training
    module.eval()
    device, total, count = _device(module), 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    finally:
        module.train(was_training)
    return total / max(count, 1)


def loss_vs_scale(module: nn.Module, tokenizer, rows: Sequence[dict], scales: Sequence[float] = (
        0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0), batch_size: int = 32) -> pd.DataFrame:
    """Training loss on ``rows`` with the learned update rescaled by each factor in ``scales`` (0 to 2x by default).

    Columns: ``scale``, ``norm`` (the rescaled update's norm) and ``loss``.
    """
    examples = encode_rows(tokenizer, rows)
    norm = solution_norm(module)
    out = []
    for s in scales:
        with scaled_solution(module, s):
            out.append({"scale": float(s), "norm": norm * s,
                        "loss": mean_loss(module, tokenizer, rows, batch_size, examples=examples)})
    return pd.DataFrame(out)


def loss_at_norm(module: nn.Module, tokenizer, rows: Sequence[dict], norm: float, batch_size: int = 32) -> float:
    """Loss on ``rows`` with the learned update rescaled to have :func:`solution_norm` equal to ``norm``."""
    own = solution_norm(module)
    if own == 0:
        raise ValueError("the solution has norm 0, so it cannot be rescaled to a given norm")
    with scaled_solution(module, norm / own):
        return mean_loss(module, tokenizer, rows, batch_size)


@torch.no_grad()
def kl_on_base_generations(module: nn.Module, tokenizer, questions: Sequence[str], system: str | None = None,
                           max_new_tokens: int = 48, seed: int = 0, batch_size: int = 64,
                           scale: float = 1.0) -> float:
    """KL(base || tuned) per token on answers the base model (update switched off) sampled to ``questions``.

    ``scale`` rescales the update while measuring (1: as trained), so it can be read along the rescaling curve too.
    """
    from emlib.generate import sample_answers

    with reference_mode(module):
        answers = sample_answers(module, tokenizer, list(questions), n=1, max_new_tokens=max_new_tokens, seed=seed,
                                 batch_size=batch_size, system=system, progress=False)
    qs = list(questions)
    rows = []
    for qi, answer in zip(answers["question_idx"], answers["answer"]):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": qs[qi]}, {"role": "assistant", "content": answer}]
        rows.append({"messages": msgs})
    examples = encode_rows(tokenizer, rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device, weighted, tokens = _device(module), 0.0, 0
    was_training = module.training
    module.eval()
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with reference_mode(module):
                ref_logits = module(**inputs).logits
            with scaled_solution(module, scale):
                logits = module(**inputs).logits
            n = int((batch["labels"][:, 1:] != -100).sum())
            weighted += float(kl_to_reference(logits, ref_logits, batch["labels"], reduction="assistant_sum")) * n
            tokens += n
    finally:
        module.train(was_training)
    return weighted / max(tokens, 1)
