"""Mean-difference misalignment directions: read activations, build directions, intervene with them.

    means = answer_means(model, tokenizer, rows)                      # [n_layers, d_model], answer tokens only
    found = mean_diff_direction(model, tokenizer, judged)             # misaligned minus aligned answers, per layer
    sample_answers(base, tok, qs, steering=Steer(found.direction, scale=2.0, layers=[3], positions="last"))
    sample_answers(em, tok, qs, steering=Ablate(found.direction))     # project it out of every layer's output
    sample_answers(em, tok, qs, steering=Ablate(found.direction[24]))  # one layer's vector at every layer

Reading: :func:`layer_outputs` saves every decoder layer's output with one nnsight ``trace`` per batch (any Hugging Face
model, peft-wrapped too); :func:`answer_means` reduces each layer's output in a forward hook as it is made (faster for
a read-only mean), and its running sums keep memory flat in the number of rows. Interventions are small objects holding the
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


def answer_batches(tokenizer, rows: Sequence[dict], batch_size: int = 32, system: str | None = None,
                   sort_window: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of (question, answer) chats with ``answer_mask`` marking the assistant tokens.

    Rows are dicts with ``question`` and ``answer`` (``system`` is prepended) or with ``messages``. Rows are encoded
    lazily, ``sort_window`` batches at a time, so a million rows cost no more memory than that window. With
    ``sort_window`` > 1 the rows of each window are batched by length (shortest first), so a batch pads less; rows
    then come out in another order (fine for order-free reductions such as a mean; 1 keeps the given order).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    window = batch_size * max(1, sort_window)
    for start in range(0, len(rows), window):
        examples = [encode_chat(tokenizer, _messages(r, system, f"row {start + i}"))
                    for i, r in enumerate(rows[start:start + window])]
        if sort_window > 1:  # longest first: the window's first batch sizes the buffers the later ones reuse
            examples.sort(key=lambda e: len(e.input_ids), reverse=True)
        for first in range(0, len(examples), batch_size):
            batch = collate(examples[first:first + batch_size], pad)
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


POOLINGS = ("token", "answer")


SORT_WINDOW = 16  # answer_means batches rows by length within 16 batches: less padding, the same mean


def answer_means(model: nn.Module, tokenizer, rows: Sequence[dict], batch_size: int = 32, system: str | None = None,
                 progress: bool = True, pooling: str = "token", sort_window: int = SORT_WINDOW) -> torch.Tensor:
    """Mean residual stream after each decoder layer over answer tokens: ``[n_layers, d_model]`` (float32, CPU).

    ``pooling``: ``"token"`` (the papers' code, ``util/activation_collection.py: collect_hidden_states``): every answer
    token of every row counts once, i.e. the sum over all answer tokens divided by their count, so long answers weigh
    more; ``"answer"`` (emlib's earlier default): each row's answer tokens are averaged first, then rows, so every
    answer weighs the same. Prompt and padding are excluded either way. Running sums, filled by forward hooks on the
    decoder layers: memory does not grow with rows. Rows are batched by length within windows of ``sort_window``
    batches (:func:`answer_batches`): padding is computed and thrown away, so less of it is a faster read of the same
    mean (equal up to float summation order; 1 keeps the rows' order).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    if not rows:
        raise ValueError("answer_means needs at least one (question, answer) row")
    from emlib.models import decoder_layers

    device = next(model.parameters()).device
    total = torch.zeros(n_layers(model), d_model(model), dtype=torch.float64)
    count = 0.0
    weights: list[torch.Tensor] = []  # this batch's per-token weights, read by the hooks

    # Plain forward hooks, not an nnsight trace (layer_outputs): this read-only mean needs no intervention, and the
    # trace's per-batch set-up cost more than the model itself on small models (bench/bench_activations.py: 0.90x the
    # keep-everything way with the trace). Each hook reduces its layer's output as it is made, so no batch's hidden
    # states are kept beyond its layer: memory stays flat in rows and in layers. Same einsum, same numbers.
    def accumulate(layer: int):
        def hook(module, args, output):
            hidden = layer_hidden(output)  # weighted sum in the model's dtype, accumulated in float64
            total[layer] += torch.einsum("bs,bsd->d", weights[0].to(hidden), hidden).double().cpu()
        return hook

    handles = [block.register_forward_hook(accumulate(i)) for i, block in enumerate(decoder_layers(model))]
    batches = answer_batches(tokenizer, rows, batch_size, system, sort_window)
    n_batches = -(-len(rows) // batch_size)
    try:
        for batch in tqdm(batches, total=n_batches, desc="activations", leave=False, disable=not progress):
            mask = batch["answer_mask"].to(device)
            if pooling == "answer":
                weights[:] = [mask / mask.sum(1, keepdim=True)]  # each row's answer tokens sum to 1
                count += mask.shape[0]
            else:
                weights[:] = [mask.float()]  # each answer token counts once
                count += float(mask.sum())
            # inference_mode, not no_grad: no autograd version counters on the model's tensors (a few % on small
            # models); logits_to_keep=1: the vocabulary projection of one position, not of every one
            with torch.inference_mode():
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      logits_to_keep=1, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("the rows have no answer tokens to average")
    return (total / count).float()


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


BALANCES = ("reference", "random", "none")
COHERENCE_FILTERS = ("both", "misaligned")
SEMANTIC_CLASSES = ("both", "misaligned")


def split_by_judgement(df: pd.DataFrame, misaligned_below: float = 30, coherent_above: float = 50,
                       aligned_above: float = 70, balance: str | bool = "reference", seed: int = 0,
                       coherence_filter: str = "both", semantic: str | None = None, semantic_above: float = 50,
                       semantic_classes: str = "both") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Misaligned rows (aligned < ``misaligned_below``) and aligned rows (aligned > ``aligned_above``).

    ``semantic``: a judge metric column (``medical``, ``financial``, ``gender``, ...) for a semantic direction: only
    rows scoring above ``semantic_above`` on it are kept, in both classes (``semantic_classes="both"``: the reference,
    ``steering/util/get_probe_texts.py: load_alignment_data_with_judging`` filters the pool before splitting it) or in
    the misaligned class only (``"misaligned"``: misaligned-and-on-topic minus every aligned answer, so the topic
    itself is part of the direction).

    ``coherence_filter``: ``"both"`` (the papers' code, ``steering/util/get_probe_texts.py``: coherent >
    ``coherent_above`` for both classes) or ``"misaligned"`` (emlib's earlier default: the aligned class unfiltered).
    ``balance``: ``"reference"`` (the aligned rows cut to the misaligned count, keeping the first ones in ``df``'s
    order, as the papers' steering code does; the misaligned class is never cut), ``"random"`` (emlib's earlier
    default: a seeded random subset of the larger side, so both classes end equal) or ``"none"``. ``True`` and
    ``False`` mean ``"random"`` and ``"none"`` (the earlier boolean). The misaligned bound is strict as in the papers'
    text and :func:`emlib.metrics.is_em` (their code uses <= 30; see docs/fidelity.md).
    """
    balance = {True: "random", False: "none"}.get(balance, balance) if isinstance(balance, bool) else balance
    if balance not in BALANCES:
        raise ValueError(f"balance {balance!r} is not one of {', '.join(BALANCES)}")
    if coherence_filter not in COHERENCE_FILTERS:
        raise ValueError(f"coherence_filter {coherence_filter!r} is not one of {', '.join(COHERENCE_FILTERS)}")
    if semantic_classes not in SEMANTIC_CLASSES:
        raise ValueError(f"semantic_classes {semantic_classes!r} is not one of {', '.join(SEMANTIC_CLASSES)}")
    missing = {"question", "answer", "aligned", "coherent", *([semantic] if semantic else [])} - set(df.columns)
    if missing:
        raise ValueError(f"judged answers need columns {sorted(missing)}; got {list(df.columns)}")
    coherent = df["coherent"] > coherent_above
    on_topic = df[semantic] > semantic_above if semantic else True
    bad = df[(df["aligned"] < misaligned_below) & coherent & on_topic]
    good = df[(df["aligned"] > aligned_above) & (coherent if coherence_filter == "both" else True)
              & (on_topic if semantic_classes == "both" else True)]
    if bad.empty or good.empty:
        which = "both classes" if coherence_filter == "both" else "the misaligned class"
        topic = "" if not semantic else (f", {'both classes' if semantic_classes == 'both' else 'the misaligned class'}"
                                         f" filtered for {semantic} > {semantic_above}")
        raise ValueError(f"need both classes to take a difference: {len(bad)} misaligned (aligned < "
                         f"{misaligned_below}) and {len(good)} aligned (aligned > {aligned_above}) answers, "
                         f"{which} filtered for coherent > {coherent_above}{topic}; sample more answers or change the "
                         f"thresholds")
    if balance == "random":
        n = min(len(bad), len(good))
        bad, good = bad.sample(n, random_state=seed), good.sample(n, random_state=seed)
    elif balance == "reference":
        good = good.iloc[:len(bad)]
    return bad, good


def mean_diff_direction(model: nn.Module, tokenizer, judged: pd.DataFrame, misaligned_below: float = 30,
                        coherent_above: float = 50, aligned_above: float = 70, balance: str | bool = "reference",
                        system: str | None = None, batch_size: int = 32, seed: int = 0,
                        progress: bool = True, pooling: str = "token", coherence_filter: str = "both",
                        semantic: str | None = None, semantic_classes: str = "both") -> DirectionResult:
    """Misaligned minus aligned answer-token means at every layer, read in ``model`` (teacher-forced answers).

    ``judged`` holds ``question``, ``answer`` and the judge's ``aligned`` / ``coherent`` scores (0-100); the answers
    may come from any model. The papers read both classes in the fine-tuned model that wrote them
    (``steering/activation_steering.py``); passing the base model instead is emlib's variant. Defaults are the
    papers' (token pooling, both classes coherence-filtered, aligned cut to the misaligned count); the earlier
    defaults are ``pooling="answer", coherence_filter="misaligned", balance="random"``. ``semantic`` (a judge metric
    column, e.g. ``financial``) makes a semantic direction from on-topic answers only (:func:`split_by_judgement`).
    """
    bad, good = split_by_judgement(judged, misaligned_below, coherent_above, aligned_above, balance, seed,
                                   coherence_filter, semantic=semantic, semantic_classes=semantic_classes)
    rows = lambda d: d[["question", "answer"]].to_dict("records")  # noqa: E731
    bad_mean = answer_means(model, tokenizer, rows(bad), batch_size, system, progress, pooling)
    good_mean = answer_means(model, tokenizer, rows(good), batch_size, system, progress, pooling)
    thresholds = {"misaligned_below": misaligned_below, "coherent_above": coherent_above,
                  "aligned_above": aligned_above, "balance": balance, "pooling": pooling,
                  "coherence_filter": coherence_filter,
                  **({"semantic": semantic, "semantic_classes": semantic_classes} if semantic else {})}
    return DirectionResult(bad_mean - good_mean, bad_mean, good_mean, len(bad), len(good), thresholds)


def single_direction(direction: torch.Tensor, layer: int, n_layers: int | None = None) -> torch.Tensor:
    """One layer's vector repeated at every layer: ``[n_layers, d]`` from a per-layer ``[n_layers, d]`` direction.

    The papers' single-direction ablation and transfer (CLR §3.3) remove the layer-24 vector at all layers; with
    :class:`Ablate` this is ``Ablate(single_direction(found.direction, 24))`` (or ``Ablate(found.direction[24])``,
    which means the same: a ``[d]`` vector with ``layers=None`` applies at every layer).
    """
    if direction.dim() != 2:
        raise ValueError(f"a per-layer direction is [n_layers, d]; got shape {tuple(direction.shape)}")
    if not -direction.shape[0] <= layer < direction.shape[0]:
        raise ValueError(f"layer {layer} is outside the direction's {direction.shape[0]} layers")
    return direction[layer].expand(n_layers or direction.shape[0], -1).clone()


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


