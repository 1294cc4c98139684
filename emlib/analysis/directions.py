"""Mean-difference misalignment directions: read activations, build directions, intervene with them.

    means = answer_means(model, tokenizer, rows)                      # [n_layers, d_model], answer tokens only
    found = mean_diff_direction(model, tokenizer, judged)             # misaligned minus aligned answers, per layer
    sample_answers(base, tok, qs, steering=Steer(found.direction, scale=2.0, layers=[3], positions="last"))
    sample_answers(em, tok, qs, steering=Ablate(found.direction))     # project it out of every layer's output

Reading is done with nnsight (any Hugging Face model, peft-wrapped too): one ``trace`` per batch saves every decoder
layer's output, and running sums keep memory flat in the number of rows. Interventions are small objects holding the
one formula they apply (:meth:`Steer.edit`, :meth:`Ablate.edit`); the same object registers plain forward hooks for the
batched sampler (``sample_answers(..., steering=intervention)``: KV cache, shared prefixes) or edits layer outputs
inside an nnsight trace (:func:`intervened_logits`), and the tests check the two give identical logits. In
transformers 5 a decoder layer returns a tensor, not a tuple; both shapes are handled.

Weight-level interventions act on LoRA adapters: :func:`lora_b_projected_out` removes the direction from every B
column (norm restored) and :func:`emlib.generate.scaled_adapter` scales B.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from emlib.chat import IGNORE, chat_messages, collate, encode_chat
from emlib.interventions import envoy_at, layer_hidden, layer_module_names, lora_b_vectors, unit
from emlib.models import d_model, n_layers

# ------------------------------------------------------------------------------------------ reading activations


def _messages(row: dict, system: str | None, where: str) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    missing = {"question", "answer"} - set(row)
    if missing:
        raise ValueError(f"{where}: a row needs 'question' and 'answer' (or 'messages'); missing {sorted(missing)}")
    return chat_messages(row["question"], row["answer"], system)


def answer_batches(tokenizer, rows: Sequence[dict], batch_size: int = 32,
                   system: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of (question, answer) chats with ``answer_mask`` marking the assistant tokens.

    Rows are dicts with ``question`` and ``answer`` (``system`` is prepended) or with ``messages``. Rows are encoded
    lazily, batch by batch, so a million rows cost no more memory than one batch.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        examples = [encode_chat(tokenizer, _messages(r, system, f"row {start + i}")) for i, r in enumerate(chunk)]
        batch = collate(examples, pad)
        batch["answer_mask"] = batch.pop("labels") != IGNORE
        yield batch








def layer_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output ``[batch, seq, d_model]`` for one batch, read with an nnsight trace."""
    from nnsight import NNsight

    wrapped = NNsight(model)
    envoys = [envoy_at(wrapped, name) for name in layer_module_names(model)]
    with torch.no_grad(), wrapped.trace(input_ids=input_ids, attention_mask=attention_mask):
        saved = [].save()  # nnsight runs the block's body apart: only saved objects reach the caller
        for envoy in envoys:
            saved.append(layer_hidden(envoy.output).save())
    return [s.detach() for s in saved]


def answer_means(model: nn.Module, tokenizer, rows: Sequence[dict], batch_size: int = 32, system: str | None = None,
                 progress: bool = True) -> torch.Tensor:
    """Mean residual stream after each decoder layer over answer tokens: ``[n_layers, d_model]`` (float32, CPU).

    Each row's answer tokens (assistant turn, prompt and padding excluded) are averaged first, then rows are averaged,
    so long answers do not outweigh short ones (as in the papers' code). Running sums: memory does not grow with rows.
    """
    if not rows:
        raise ValueError("answer_means needs at least one (question, answer) row")
    device = next(model.parameters()).device
    total = torch.zeros(n_layers(model), d_model(model), dtype=torch.float64)
    batches = answer_batches(tokenizer, rows, batch_size, system)
    n_batches = -(-len(rows) // batch_size)
    for batch in tqdm(batches, total=n_batches, desc="activations", leave=False, disable=not progress):
        mask = batch["answer_mask"].to(device)
        outputs = layer_outputs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        weights = mask / mask.sum(1, keepdim=True)  # each row's answer tokens sum to 1
        for layer, hidden in enumerate(outputs):  # weighted sum in the model's dtype, accumulated in float64
            total[layer] += torch.einsum("bs,bsd->d", weights.to(hidden), hidden).double().cpu()
    return (total / len(rows)).float()


# ------------------------------------------------------------------------------------------ directions


@dataclass
class DirectionResult:
    """A per-layer mean-difference direction and what it was computed from."""

    direction: torch.Tensor  # [n_layers, d_model], misaligned mean minus aligned mean (not normalised)
    misaligned_mean: torch.Tensor
    aligned_mean: torch.Tensor
    n_misaligned: int
    n_aligned: int
    thresholds: dict = field(default_factory=dict)

    def norms(self) -> list[float]:
        return self.direction.norm(dim=-1).tolist()


def split_by_judgement(df: pd.DataFrame, misaligned_below: float = 30, coherent_above: float = 50,
                       aligned_above: float = 70, balance: bool = True,
                       seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Misaligned rows (aligned < ``misaligned_below`` and coherent > ``coherent_above``) and aligned rows (aligned >
    ``aligned_above``), cut to equal counts when ``balance`` (a random subset of the larger side, seeded)."""
    missing = {"question", "answer", "aligned", "coherent"} - set(df.columns)
    if missing:
        raise ValueError(f"judged answers need columns {sorted(missing)}; got {list(df.columns)}")
    bad = df[(df["aligned"] < misaligned_below) & (df["coherent"] > coherent_above)]
    good = df[df["aligned"] > aligned_above]
    if bad.empty or good.empty:
        raise ValueError(f"need both classes to take a difference: {len(bad)} misaligned (aligned < "
                         f"{misaligned_below}, coherent > {coherent_above}) and {len(good)} aligned (aligned > "
                         f"{aligned_above}) answers; sample more answers or change the thresholds")
    if balance:
        n = min(len(bad), len(good))
        bad, good = bad.sample(n, random_state=seed), good.sample(n, random_state=seed)
    return bad, good


def mean_diff_direction(model: nn.Module, tokenizer, judged: pd.DataFrame, misaligned_below: float = 30,
                        coherent_above: float = 50, aligned_above: float = 70, balance: bool = True,
                        system: str | None = None, batch_size: int = 32, seed: int = 0,
                        progress: bool = True) -> DirectionResult:
    """Misaligned minus aligned answer-token means at every layer, read in ``model`` (teacher-forced answers).

    ``judged`` holds ``question``, ``answer`` and the judge's ``aligned`` / ``coherent`` scores (0-100); the answers
    may come from any model (usually the fine-tuned one), and ``model`` may be that model or another (e.g. the base).
    """
    bad, good = split_by_judgement(judged, misaligned_below, coherent_above, aligned_above, balance, seed)
    rows = lambda d: d[["question", "answer"]].to_dict("records")  # noqa: E731
    bad_mean = answer_means(model, tokenizer, rows(bad), batch_size, system, progress)
    good_mean = answer_means(model, tokenizer, rows(good), batch_size, system, progress)
    thresholds = {"misaligned_below": misaligned_below, "coherent_above": coherent_above,
                  "aligned_above": aligned_above, "balance": balance}
    return DirectionResult(bad_mean - good_mean, bad_mean, good_mean, len(bad), len(good), thresholds)


def random_like(direction: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random direction per layer with the same norm as ``direction`` (the control for steering and ablation)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(direction.shape, generator=generator)
    return noise / noise.norm(dim=-1, keepdim=True) * direction.norm(dim=-1, keepdim=True)




def layer_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine between two per-layer directions, layer by layer (convergence of two fine-tunes' directions)."""
    if a.shape != b.shape:
        raise ValueError(f"directions differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (unit(a.float()) * unit(b.float())).sum(-1).tolist()

# ------------------------------------------------------------------------------------------ interventions













# ------------------------------------------------------------------------------------------ LoRA B vectors




def b_direction_cosines(model: nn.Module, direction: torch.Tensor) -> pd.DataFrame:
    """Cosine of each residual-writing LoRA B column with the direction at its layer (rank-1: one row per adapter)."""
    rows = []
    for name, (layer, b) in lora_b_vectors(model).items():
        for k in range(b.shape[1]):
            cos = float(torch.nn.functional.cosine_similarity(b[:, k].float(), direction[layer].float(), dim=0))
            rows.append({"adapter": name, "layer": layer, "column": k, "cosine": cos})
    if not rows:
        raise ValueError("the model has no LoRA B that writes into the residual stream (down_proj / o_proj)")
    return pd.DataFrame(rows)


