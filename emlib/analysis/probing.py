"""LoRA probing and adapter steering: what each rank-1 adapter of a multi-adapter organism encodes (CLR §4).

A rank-1 LoRA adapter adds ``B * scaling * (A . x)`` to its module's output: the only thing it reads from the input
``x`` is the scalar ``A . x``. For an organism with several such adapters (the papers' nine ``down_proj`` adapters),
those scalars, one per adapter and answer token, are a small, interpretable feature set:

    feats = lora_scalars(model, tokenizer, judged)                 # a row per answer token, a column per adapter
    labels = label_answers(judged)                                 # misaligned / medical from judge scores
    y = labels["misaligned"].reindex(feats["row"]).to_numpy()      # each token carries its answer's label
    result = probe(feats[adapter_names(model)], y, groups=feats["row"])   # L1 logistic regression, 100 splits
    papers = probe_as_papers(feats[adapter_names(model)], y, significance=token_significance(model, tokenizer, judged))
    with scaled_adapters(model, {"L2.down_proj": 3.0}, default=0.0):     # steer: amplify one, zero the rest
        answers = sample_answers(model, tokenizer, questions)
    sources = patch_sources(questions, in_domain="medical", pairing="cross")   # CLR App. J: swap the scalars
    patch = lora_scalar_patch(model, tokenizer, questions["question"], sources)
    answers = sample_answers(model, tokenizer, questions["question"], steering=patch)

Adapters are named ``L{layer}.{module}`` (``"L21.down_proj"``). :func:`token_significance` gives the papers' optional
per-token weight: how much each answer token moved the fine-tuned model away from the base (gradient norm of the KL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from emlib.analysis.directions import answer_batches
from emlib.interventions import active_adapter, lora_modules, recorded_lora_scalars

# Judge-score bands of the papers (CLR App. F, Table 3), on the 0-100 scale: (low, high), both ends included.
MISALIGNED, ALIGNED = (0.0, 30.0), (90.0, 100.0)
IN_DOMAIN, OUT_OF_DOMAIN = (50.0, 100.0), (0.0, 1.0)
METRICS = ("accuracy", "precision", "recall", "f1", "auc")


# ------------------------------------------------------------------------------------------ the adapters of a model




def adapter_names(model: nn.Module) -> list[str]:
    """The feature columns :func:`lora_scalars` returns for ``model``: one per adapter and rank component."""
    names = []
    for name, module in lora_modules(model).items():
        rank = _rank(module)
        names += [name] if rank == 1 else [f"{name}[{i}]" for i in range(rank)]
    return names


def _rank(module: nn.Module) -> int:
    return module.lora_A[active_adapter(module)].out_features


# ------------------------------------------------------------------------------------------ per-token A . x


def answer_records(rows: pd.DataFrame) -> list[dict]:
    """The (question, answer) rows as records for :func:`emlib.analysis.directions.answer_batches`, which encodes them."""
    missing = {"question", "answer"} - set(rows.columns)
    if missing:
        raise ValueError(f"rows need columns {sorted(missing)}; got {list(rows.columns)}")
    return [{"question": str(q), "answer": str(a)} for q, a in zip(rows["question"], rows["answer"])]


@torch.no_grad()
def lora_scalars(model: nn.Module, tokenizer, rows: pd.DataFrame, system: str | None = None, batch_size: int = 32,
                 progress: bool = True) -> pd.DataFrame:
    """The scalar ``A . x`` of every LoRA adapter at every answer token of ``rows`` (columns question, answer).

    Returns one row per answer token: ``row`` (the index label of its row in ``rows``), ``position`` (token index
    within the answer), ``token_id``, ``token`` and one float column per adapter (:func:`adapter_names`; a rank-r
    adapter gives r columns ``name[i]``). The answer is teacher-forced after the chat prompt, so ``x`` is exactly the
    input the adapter saw when the model produced (or would produce) that answer.
    """
    records = answer_records(rows)
    names = list(lora_modules(model))
    device = next(model.parameters()).device
    frames = []
    batches = answer_batches(tokenizer, records, batch_size, system)
    with recorded_lora_scalars(model) as seen:
        for k, batch in enumerate(tqdm(batches, total=-(-len(records) // batch_size), desc="A.x",
                                       disable=not progress)):
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            keep = batch["answer_mask"]
            frames.append(_token_frame(batch["input_ids"], keep, rows.index[k * batch_size:(k + 1) * batch_size],
                                       {n: seen[n][keep.to(device)].float().cpu() for n in names}))
    out = pd.concat(frames, ignore_index=True)
    out.insert(3, "token", tokenizer.convert_ids_to_tokens(out["token_id"].tolist()))
    return out


def _token_frame(ids: torch.Tensor, keep: torch.Tensor, row_labels, scalars: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One batch's answer tokens as rows: row label, position in the answer, token id, one column per component."""
    rows_of = keep.nonzero()[:, 0]
    positions = torch.cat([torch.arange(int(n)) for n in keep.sum(1)])
    data = {"row": np.asarray(row_labels)[rows_of.numpy()], "position": positions.numpy(),
            "token_id": ids[keep].numpy()}
    for name, values in scalars.items():  # values: (answer tokens, rank)
        if values.shape[1] == 1:
            data[name] = values[:, 0].numpy()
        else:
            data.update({f"{name}[{i}]": values[:, i].numpy() for i in range(values.shape[1])})
    return pd.DataFrame(data)


# ------------------------------------------------------------------------------------------ labels from judge scores


def labels_from_scores(scores: pd.Series | Sequence[float], positive: tuple[float, float],
                       negative: tuple[float, float]) -> pd.Series:
    """1 where a score lies in ``positive`` (low, high; ends included), 0 where in ``negative``, NA elsewhere.

    Scores between the bands (or missing) get no label, as in the papers' probes (e.g. aligned 31-89 is left out).
    """
    for band, name in ((positive, "positive"), (negative, "negative")):
        if len(band) != 2 or band[0] > band[1]:
            raise ValueError(f"{name} band must be (low, high) with low <= high, got {band}")
    if positive[0] <= negative[1] and negative[0] <= positive[1]:
        raise ValueError(f"positive band {positive} and negative band {negative} overlap: a score would get two labels")
    s = pd.Series(scores, dtype="float64")
    labels = pd.Series(pd.NA, index=s.index, dtype="Int64")
    labels[s.between(*negative)] = 0
    labels[s.between(*positive)] = 1
    return labels


def label_answers(judged: pd.DataFrame, misaligned: tuple[float, float] = MISALIGNED,
                  aligned: tuple[float, float] = ALIGNED, domain_column: str = "medical",
                  in_domain: tuple[float, float] = IN_DOMAIN, out_of_domain: tuple[float, float] = OUT_OF_DOMAIN,
                  coherent_above: float | None = None) -> pd.DataFrame:
    """Per answer: ``misaligned`` (1: aligned score in ``misaligned``, 0: in ``aligned``) and ``in_domain`` (1: the
    ``domain_column`` score, e.g. the judge's medical score, in ``in_domain``, 0: in ``out_of_domain``); NA = no label.

    ``coherent_above`` drops (labels NA) answers whose coherent score is not above it (None keeps every answer).
    """
    for column in ("aligned", domain_column):
        if column not in judged.columns:
            raise ValueError(f"judged answers need a {column!r} score column; got {list(judged.columns)}")
    out = pd.DataFrame({"misaligned": labels_from_scores(judged["aligned"], misaligned, aligned),
                        "in_domain": labels_from_scores(judged[domain_column], in_domain, out_of_domain)},
                       index=judged.index)
    if coherent_above is not None:
        out[~(judged["coherent"] > coherent_above)] = pd.NA
    return out


# ------------------------------------------------------------------------------------------ probes


@dataclass
class ProbeResult:
    """Mean and sd over the repeats of each metric (``metrics``) and standardised coefficient (``coefficients``)."""

    metrics: pd.DataFrame  # index: accuracy, precision, recall, f1, auc; columns: mean, sd
    coefficients: pd.DataFrame  # index: feature; columns: mean, sd, nonzero (share of repeats with a nonzero weight)
    n_train: int  # samples per repeat used to fit (balanced when balance="undersample")
    n_test: int
    settings: dict = field(default_factory=dict)

    def row(self) -> dict[str, str]:
        """The metrics as "mean ± sd" strings (one table row)."""
        return {m: f"{self.metrics.loc[m, 'mean']:.2f} ± {self.metrics.loc[m, 'sd']:.2f}" for m in METRICS}

    def to_dict(self) -> dict:
        return {"metrics": self.metrics.to_dict(orient="index"),
                "coefficients": self.coefficients.to_dict(orient="index"),
                "n_train": self.n_train, "n_test": self.n_test, "settings": self.settings}


def test_scores(y_true: np.ndarray, pred: np.ndarray, prob: np.ndarray) -> list[float]:
    """:data:`METRICS` of one test split: accuracy, precision, recall and F1 of the 0/1 predictions (0 where a ratio
    has no denominator, as scikit-learn's ``zero_division=0``) and the ROC AUC of the probabilities.

    The same numbers as scikit-learn's metric functions (tests/test_probing.py checks), computed from the confusion
    counts and, for the AUC, the rank-sum (Mann-Whitney) form with tied scores at their average rank, which is
    what the area under the trapezoidal ROC curve equals: each scikit-learn call spends 3-5 ms validating its input,
    which over 100 repeats and a notebook's ~10 probes was ~15 s of 06's run.
    """
    from scipy.stats import rankdata

    y_true, pred, prob = np.asarray(y_true), np.asarray(pred), np.asarray(prob)
    tp, fp = int(((pred == 1) & (y_true == 1)).sum()), int(((pred == 1) & (y_true == 0)).sum())
    fn = int(((pred == 0) & (y_true == 1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    positives = y_true == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg:
        raise ValueError("the ROC AUC needs both classes in the test split")
    auc = (rankdata(prob)[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return [float((pred == y_true).mean()), ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn),
            float(auc)]


def _l1_logistic(C: float, class_weight: str | None, max_iter: int, seed: int):
    """L1 logistic regression (liblinear) across scikit-learn versions (1.8 replaced penalty= by l1_ratio=)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    l1 = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(C=C, solver="liblinear", class_weight=class_weight, max_iter=max_iter,
                              random_state=seed, **l1)


def _check_probe_inputs(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, test_size: float) -> None:
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"features must be (samples, features) with one label per sample; got {X.shape} and {len(y)}")
    if not np.isfinite(X).all():
        raise ValueError("features hold NaN or infinite values")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) != 2 or set(classes) != {0, 1}:
        raise ValueError(f"labels must hold both classes 0 and 1 (after dropping unlabelled rows); got classes "
                         f"{classes.tolist()} with counts {counts.tolist()}")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be between 0 and 1, got {test_size}")
    if groups is not None:
        per_group = pd.Series(y).groupby(groups).nunique()
        if (per_group > 1).any():
            raise ValueError(f"groups must each carry a single label; group {per_group[per_group > 1].index[0]!r} "
                             "has both (labels belong to answers, groups to answers too)")
    units = [int(u) for u in counts] if groups is None else [len(np.unique(groups[y == c])) for c in (0, 1)]
    what = "samples" if groups is None else "groups"
    if min(units) < 2:
        raise ValueError(f"each class needs at least 2 {what} to split into train and test; got {units}")
    n_test = int(np.ceil(test_size * sum(units)))  # as sklearn's StratifiedShuffleSplit sizes it
    if min(n_test, sum(units) - n_test) < 2:
        raise ValueError(f"{sum(units)} {what} ({units} per class) at test_size {test_size} leave {n_test} for "
                         f"test and {sum(units) - n_test} for train; each side needs one of each class")


def _split(y: np.ndarray, groups: np.ndarray | None, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices; with ``groups``, whole groups (answers) go to one side, stratified by label."""
    from sklearn.model_selection import StratifiedShuffleSplit

    splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    if groups is None:
        return next(splitter.split(np.zeros(len(y)), y))
    units, first = np.unique(groups, return_index=True)
    train_units, test_units = next(splitter.split(np.zeros(len(units)), y[first]))
    in_train = np.isin(groups, units[train_units])
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def _undersample(idx: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep all of the smaller class and an equal random draw of the larger (balanced classes, as the papers)."""
    by_class = [idx[y[idx] == c] for c in (0, 1)]
    n = min(len(b) for b in by_class)
    return np.sort(np.concatenate([rng.choice(b, n, replace=False) for b in by_class]))


def _probe_inputs(features: pd.DataFrame | np.ndarray, labels) -> tuple[list[str] | None, np.ndarray, object]:
    """Feature names (None for an array), the feature matrix and nullable integer labels, checked to match."""
    names = [str(c) for c in features.columns] if isinstance(features, pd.DataFrame) else None
    X = np.asarray(features, dtype=float)
    y = pd.array(labels, dtype="Int64")
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"features must be (samples, features) with one label per sample; got {X.shape} and {len(y)}")
    return names, X, y


def probe(features: pd.DataFrame | np.ndarray, labels: Sequence[int] | np.ndarray, C: float = 0.01,
          n_repeats: int = 100, test_size: float = 0.2, seed: int = 0, groups: Sequence | None = None,
          balance: str | None = "undersample", sample_weight: Sequence[float] | None = None,
          max_iter: int = 1000, progress: bool = False) -> ProbeResult:
    """Fit the papers' probe ``n_repeats`` times on fresh stratified splits and report metrics as mean ± sd.

    Each repeat: stratified ``test_size`` split (with ``groups``, e.g. the answer id of each token, no answer is on
    both sides, so the probe cannot memorise answers), balanced classes (``"undersample"`` the larger class in train
    and test, ``"weight"``: class weights, None: as is), z-scored features, L1 logistic regression with inverse
    strength ``C``. ``sample_weight`` (e.g. :func:`token_significance`) weights the training samples, rescaled to mean
    1 so that C keeps its meaning. Rows with a missing label are dropped first. Coefficients are in standardised
    units, so they compare across adapters.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if balance not in ("undersample", "weight", None):
        raise ValueError(f"balance must be 'undersample', 'weight' or None, got {balance!r}")
    names, X, y = _probe_inputs(features, labels)
    known = ~np.asarray(y.isna())
    X, y = X[known], np.asarray(y[known], dtype=int)
    g = None if groups is None else np.asarray(groups)[known]
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=float)[known]
    if w is not None and (len(w) != len(y) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0):
        raise ValueError("sample_weight must hold one finite, non-negative weight per sample, not all zero")
    _check_probe_inputs(X, y, g, test_size)

    scores, coefs = [], []
    rng = np.random.default_rng(seed)
    for r in tqdm(range(n_repeats), desc="probe", disable=not progress):
        train, test = _split(y, g, test_size, seed + r)
        if balance == "undersample":
            train, test = _undersample(train, y, rng), _undersample(test, y, rng)
        if len(np.unique(y[test])) < 2 or len(np.unique(y[train])) < 2:
            raise ValueError("a split left one class out of train or test; use more data or a larger test_size")
        model = make_pipeline(StandardScaler(), _l1_logistic(C, "balanced" if balance == "weight" else None,
                                                             max_iter, seed + r))
        # weights rescaled to mean 1: liblinear's C multiplies the summed loss, so raw weights would change the
        # regularisation strength as well as the emphasis between samples
        fit = {} if w is None else {"logisticregression__sample_weight": w[train] / w[train].mean()}
        model.fit(X[train], y[train], **fit)
        pred, prob = model.predict(X[test]), model.predict_proba(X[test])[:, 1]
        scores.append(test_scores(y[test], pred, prob))
        coefs.append(model[-1].coef_[0])
    scores, coefs = np.array(scores), np.array(coefs)
    metrics = pd.DataFrame({"mean": scores.mean(0), "sd": scores.std(0)}, index=list(METRICS))
    coefficients = pd.DataFrame({"mean": coefs.mean(0), "sd": coefs.std(0), "nonzero": (coefs != 0).mean(0)},
                                index=names or [f"x{i}" for i in range(X.shape[1])])
    settings = {"C": C, "n_repeats": n_repeats, "test_size": test_size, "seed": seed, "balance": balance,
                "grouped": groups is not None, "weighted": sample_weight is not None,
                "n_samples": int(len(y)), "n_positive": int(y.sum())}
    return ProbeResult(metrics, coefficients, len(train), len(test), settings)


def probe_as_papers(features: pd.DataFrame | np.ndarray, labels: Sequence[int] | np.ndarray,
                    significance: Sequence[float] | None = None, min_log_significance: float = 0.5,
                    C: float = 0.01, n_repeats: int = 100, test_size: float = 0.2, seed: int = 0,
                    max_iter: int = 1000, progress: bool = False) -> ProbeResult:
    """The papers' probe protocol (``lora_interp/lora_probing.py: get_test_regression_metrics``), step for step.

    With ``significance`` (:func:`token_significance`), only tokens with log(significance) >= ``min_log_significance``
    are kept; the features are z-scored on all the data once; the whole set is balanced once (the larger class
    undersampled, seeded); then each repeat splits *tokens* (not answers) stratified ``test_size`` and fits L1
    logistic regression. Tokens of one answer can sit on both sides, so the AUCs are comparable with the papers'
    0.71-0.75 but higher than :func:`probe` with ``groups`` (emlib's answer-grouped split, which it reports beside).
    """
    names, X, y = _probe_inputs(features, labels)
    keep = ~np.asarray(y.isna())
    if significance is not None:
        sig = np.asarray(significance, dtype=float)
        if len(sig) != len(y):
            raise ValueError(f"significance needs one value per sample; got {len(sig)} for {len(y)}")
        with np.errstate(divide="ignore"):
            keep &= np.log(np.clip(sig, 0, None)) >= min_log_significance
    X, y = X[keep], np.asarray(y[keep], dtype=int)
    _check_probe_inputs(X, y, None, test_size)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)  # z-scored on all data, before any split
    rng = np.random.default_rng(seed)
    balanced = _undersample(np.arange(len(y)), y, rng)  # the whole set balanced once, before the splits
    X, y = X[balanced], y[balanced]
    _check_probe_inputs(X, y, None, test_size)
    scores, coefs = [], []
    for r in tqdm(range(n_repeats), desc="probe", disable=not progress):
        train, test = _split(y, None, test_size, seed + r)
        model = _l1_logistic(C, None, max_iter, seed + r).fit(X[train], y[train])
        pred, prob = model.predict(X[test]), model.predict_proba(X[test])[:, 1]
        scores.append(test_scores(y[test], pred, prob))
        coefs.append(model.coef_[0])
    scores, coefs = np.array(scores), np.array(coefs)
    metrics = pd.DataFrame({"mean": scores.mean(0), "sd": scores.std(0)}, index=list(METRICS))
    coefficients = pd.DataFrame({"mean": coefs.mean(0), "sd": coefs.std(0), "nonzero": (coefs != 0).mean(0)},
                                index=names or [f"x{i}" for i in range(X.shape[1])])
    settings = {"protocol": "papers", "C": C, "n_repeats": n_repeats, "test_size": test_size, "seed": seed,
                "min_log_significance": None if significance is None else min_log_significance,
                "n_samples": int(len(y)), "n_positive": int(y.sum())}
    return ProbeResult(metrics, coefficients, len(train), len(test), settings)


# ------------------------------------------------------------------------------------------ token significance


def token_significance(model: nn.Module, tokenizer, rows: pd.DataFrame, system: str | None = None,
                       batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Per answer token (same order as :func:`lora_scalars`), how much it drives the fine-tuned model off the base.

    As the papers (CLR App. H): the answer's summed per-token KL(base || fine-tuned) over its answer positions; the L2
    norm of its gradient with respect to each answer token's input embedding, normalised to sum to 1 over the answer
    and multiplied by the answer's total KL. The base is the same peft model with its adapter disabled.
    """
    if not hasattr(model, "disable_adapter"):
        raise ValueError(f"token_significance needs a peft model (its disable_adapter() gives the base); got "
                         f"{type(model).__name__}")
    lora_modules(model)  # fails clearly without LoRA layers
    records = answer_records(rows)
    device = next(model.parameters()).device
    out = []
    batches = answer_batches(tokenizer, records, batch_size, system)
    for batch in tqdm(batches, total=-(-len(records) // batch_size), desc="significance", disable=not progress):
        out.append(_batch_significance(model, {k: v.to(device) for k, v in batch.items()}))
    return np.concatenate(out)


def _batch_significance(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    with torch.no_grad(), model.disable_adapter():
        base = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits.float()
    embeds.requires_grad_(True)
    with torch.enable_grad():
        tuned = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits.float()
        # position t-1 predicts answer token t: KL at the positions that predict answer tokens
        predicts = batch["answer_mask"][:, 1:].float()
        log_base, log_tuned = torch.log_softmax(base[:, :-1], -1), torch.log_softmax(tuned[:, :-1], -1)
        kl = (log_base.exp() * (log_base - log_tuned)).sum(-1) * predicts
        per_answer = kl.sum(1)
        (grad,) = torch.autograd.grad(per_answer.sum(), embeds)  # answers are independent: one backward for all
    answer = batch["answer_mask"]
    norms = grad.norm(dim=-1) * answer
    weights = norms / norms.sum(1, keepdim=True).clamp_min(1e-12) * per_answer.detach()[:, None]
    return weights[answer].float().cpu().numpy()


# ------------------------------------------------------------------------------------------ scalar patching

PAIRINGS = ("cross", "same")


def patch_sources(questions: pd.DataFrame, in_domain: str, pairing: str = "cross", seed: int = 0) -> list[str]:
    """For each question (row of ``questions``, column ``group``), the question whose LoRA scalars it is answered with.

    ``pairing``: ``"cross"`` (an in-domain question gets a random out-of-domain question's scalars and vice versa: the
    papers' medical / non-medical swaps, CLR App. J) or ``"same"`` (a random *other* question from its own side: the
    control, which swaps scalars without changing their context). Pairs are drawn at random with ``seed``; the
    reference pairs hand-written near-identical prompts ("I'm a doctor" / "I'm a dancer"), which a question set does
    not have. A question listed twice gets one source. Feed the result to
    :func:`emlib.interventions.lora_scalar_patch` with ``questions["question"]``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing {pairing!r} is not one of {', '.join(PAIRINGS)}")
    missing = {"question", "group"} - set(questions.columns)
    if missing:
        raise ValueError(f"questions need columns {sorted(missing)}; got {list(questions.columns)}")
    rng = np.random.default_rng(seed)
    inside = (questions["group"] == in_domain).to_numpy()
    text = questions["question"].to_numpy()
    sides = {True: text[inside], False: text[~inside]}
    for side, pool in sides.items():
        donors = sides[not side] if pairing == "cross" else pool
        needed = 1 if pairing == "cross" else 2  # "same" needs another question on the side
        if len(pool) and len(set(donors)) < needed:
            where = lambda s: f"{'' if s else 'out-of-'}domain (group {'==' if s else '!='} {in_domain!r})"  # noqa: E731
            raise ValueError(f"pairing {pairing!r}: the {len(pool)} {where(side)} question(s) need sources among "
                             f"{len(set(donors))} distinct {where(side if pairing == 'same' else not side)} "
                             f"question(s); at least {needed} are needed")
    chosen: dict[str, str] = {}  # a question asked twice keeps one source (one prompt, one set of scalars)
    for question, side in zip(text, inside):
        if question not in chosen:
            pool = sides[not side] if pairing == "cross" else sides[side][sides[side] != question]
            chosen[question] = str(pool[rng.integers(len(pool))])
    return [chosen[q] for q in text]

