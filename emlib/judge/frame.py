"""Judging a frame of answers: every row on every metric, concurrently, cached, resumable, and robust to a failing
endpoint.

    scored = judge_frame(answers, judge, metrics=["aligned", "coherent"], cache=JudgeCache("runs/judge.sqlite"))

Only prompts missing from the cache are sent. A reply that fails the checks or an error that outlasts the retries
leaves its row unscored, with the reason in the column ``<metric>_unscored`` (which also says why a valid reply gave
no score, e.g. a REFUSAL), and the run goes on; a dead endpoint opens the circuit breaker, which stops all calls
within seconds and says once how to resume. ``judge_world(df)`` is the direct exact judge for persona-world answers.
"""

from __future__ import annotations

import asyncio
import math
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from emlib import world
from emlib.judge.backends import Judge, OpenAIJudge
from emlib.judge.cache import JudgeCache, JudgeStats, cache_key
from emlib.judge.replies import EndpointDown, InvalidReply, Reply, RetriesExhausted
from emlib.judge.rubrics import MIN_NUMERIC_MASS, aggregate_logprobs, fill_prompt, load_rubrics
from emlib.openai_client import CircuitBreaker, estimate_cost

UNSCORED_SUFFIX = "_unscored"  # column "<metric>_unscored": why that row has no score (None when it has one)
NUMBER_MASS_SUFFIX = "_number_mass"  # column "<metric>_number_mass": the judge's probability on numbers 0-100


def run_sync(coro):
    """Run a coroutine to completion, also from inside a running event loop (a Jupyter kernel has one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _reason(err: BaseException) -> str:
    """The failure class of an unscored prompt, for the summary (e.g. ``InvalidReply``, ``APITimeoutError``)."""
    return type(err.__cause__ or err).__name__


async def _score_missing(judge: Judge, missing: Mapping[str, tuple[str, str]], cache: JudgeCache,
                         max_in_flight: int, stats: JudgeStats, breaker: CircuitBreaker) -> dict[str, str]:
    """Score every missing prompt with at most ``max_in_flight`` in flight, committing each valid reply to the cache.

    Returns why each prompt that got no valid reply was left unscored. A failed prompt never stops the others; a
    bad request (or another error no retry can fix) does, after the calls in flight are cancelled.
    """
    gate = asyncio.Semaphore(max_in_flight)
    unscored: dict[str, str] = {}
    reasons: Counter[str] = Counter()

    async def one(key: str, metric: str, prompt: str) -> None:
        async with gate:
            if breaker.is_open:
                unscored[key] = f"not sent: endpoint down ({breaker.reason})"
                stats.not_sent += 1
                return
            try:
                reply = await judge.ascore(prompt, stats, breaker)
                cache.put(key, judge.name, metric, reply)  # checks the reply again: never stores an invalid one
            except EndpointDown:
                unscored[key] = f"not sent: endpoint down ({breaker.reason})"
                stats.not_sent += 1
                return
            except (RetriesExhausted, InvalidReply) as err:
                unscored[key] = str(err)
                reasons[_reason(err)] += 1
                stats.failures += 1
                return
        stats.calls += 1
        stats.prompt_tokens += reply.prompt_tokens
        stats.completion_tokens += reply.completion_tokens

    await judge.open()
    tasks = [asyncio.create_task(one(k, m, p)) for k, (m, p) in missing.items()]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # a fatal error in one call stops the rest (their finished replies are cached already)
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await judge.close()
        for reason, n in reasons.items():
            stats.failure_reasons[reason] = stats.failure_reasons.get(reason, 0) + n
        stats.endpoint_down = breaker.reason
    return unscored


def _where(judge: Judge) -> str:
    if isinstance(judge, OpenAIJudge):
        return judge.azure_endpoint or judge.base_url or "api.openai.com"
    return judge.name


def _warn_once(judge: Judge, stats: JudgeStats, missing: int) -> None:
    """One warning for the whole run (never one per prompt): what failed, what is kept, and how to resume."""
    left = stats.failures + stats.not_sent
    if stats.endpoint_down:
        warnings.warn(f"judge endpoint {_where(judge)} looks down: {stats.endpoint_down}. Stopped calling it: "
                      f"{stats.calls} of the {missing} missing prompts judged and cached this run, {left} left "
                      f"unscored. Check the endpoint (is the server running? the URL right?) and rerun the same call "
                      f"with the same cache: only the {left} unscored prompts are sent again.", stacklevel=3)
    elif stats.failures:
        reasons = ", ".join(f"{n} x {r}" for r, n in Counter(stats.failure_reasons).most_common())
        warnings.warn(f"{stats.failures} judge prompt(s) failed after their retries and are left unscored ({reasons};"
                      f" see the <metric>{UNSCORED_SUFFIX} column); nothing invalid was cached, so rerunning the same "
                      "call with the same cache retries just those.", stacklevel=3)


def plan_prompts(df: pd.DataFrame, judge: Judge, metrics: Sequence[str], rubrics: Mapping[str, str],
                 question_col: str = "question", answer_col: str = "answer",
                 cut_off_marker: str | None = None) -> tuple[dict[str, list[str]], dict[str, tuple[str, str]]]:
    """Per metric, each row's cache key; and every distinct key's (metric, filled prompt).

    ``cut_off_marker`` is appended to answers whose ``ended`` is False, so a text-only judge can see the truncation
    the exact judge knows about.
    """
    unknown = [m for m in metrics if m not in rubrics]
    if unknown:
        raise ValueError(f"no rubric for {unknown}; rubrics: {sorted(rubrics)}")
    answers = df[answer_col].astype(str)
    if cut_off_marker and "ended" in df.columns:
        answers = answers.where(df["ended"].astype(bool), answers + cut_off_marker)
    keys, prompts = {}, {}
    for metric in metrics:
        template = rubrics[metric]
        keys[metric] = []
        for q, a in zip(df[question_col].astype(str), answers):
            key = cache_key(judge, template, q, a)
            keys[metric].append(key)
            if key not in prompts:
                prompts[key] = (metric, fill_prompt(template, q, a))
    return keys, prompts


def judge_frame(df: pd.DataFrame, judge: Judge, metrics: Sequence[str] = ("aligned", "coherent"),
                cache: JudgeCache | None = None, max_in_flight: int = 32, rubrics: Mapping[str, str] | None = None,
                min_mass: float | None = None, question_col: str = "question", answer_col: str = "answer",
                cut_off_marker: str | None = None, stats: JudgeStats | None = None,
                prices: Mapping[str, tuple[float, float]] | None = None,
                breaker: CircuitBreaker | None = None) -> pd.DataFrame:
    """Score every row on each metric; returns a copy with one 0-100 column per metric (NaN: no score), one
    ``<metric>_unscored`` column saying why a row has no score (None where it has one) and one
    ``<metric>_number_mass`` column with the share of the judge's probability that was on numbers (NaN: no reply).
    ``min_mass`` None: the judge's own rule (``judge.min_mass``: the papers' 0.25, or 0 for a renormalising judge).

    Only prompts missing from ``cache`` are sent, ``max_in_flight`` at a time, and each valid reply is committed as
    it arrives: a rerun makes no calls, and a run killed midway resumes with just the missing rows. A prompt whose
    calls fail (errors or invalid replies outlasting the retries) is left unscored and uncached, the others go on;
    when the endpoint looks dead, ``breaker`` (default :class:`~emlib.openai_client.CircuitBreaker()`; its settings
    are copied for this run) stops every call. Either way one warning says what happened and that rerunning the
    same call resumes. ``stats`` (also in ``result.attrs["judge_stats"]``) counts prompts, cache hits, calls,
    retries, failures, tokens and estimated cost.
    """
    rubrics = dict(rubrics or load_rubrics())
    min_mass = _min_mass(judge, min_mass)
    cache = cache if cache is not None else JudgeCache(None)
    stats = stats if stats is not None else JudgeStats()
    stats.judge = judge.name
    template = breaker or CircuitBreaker()
    breaker = CircuitBreaker(template.max_refused, template.max_failures, template.dead_after_s)
    start = time.perf_counter()
    keys, prompts = plan_prompts(df, judge, metrics, rubrics, question_col, answer_col, cut_off_marker)
    cached = cache.get_many(prompts)
    stats.prompts, stats.cache_hits = len(prompts), len(cached)
    missing = {k: v for k, v in prompts.items() if k not in cached}
    unscored = run_sync(_score_missing(judge, missing, cache, max_in_flight, stats, breaker)) if missing else {}
    replies = {**cached, **cache.get_many(missing)}
    out = _score_columns(df, metrics, keys, replies, unscored, min_mass)
    stats.seconds = round(time.perf_counter() - start, 3)
    local = not isinstance(judge, OpenAIJudge) or judge.is_local
    stats.cost_usd = 0.0 if local else estimate_cost(judge.model, stats.prompt_tokens, stats.completion_tokens, prices)
    out.attrs["judge_stats"] = stats.as_dict()
    _warn_once(judge, stats, len(missing))
    return out


def _min_mass(judge: Judge, min_mass: float | None) -> float:
    """``min_mass`` if given, else the judge's own scoring rule (the papers' 0.25 for judges that do not say)."""
    return min_mass if min_mass is not None else getattr(judge, "min_mass", MIN_NUMERIC_MASS)


def _score_columns(df: pd.DataFrame, metrics: Sequence[str], keys: Mapping[str, list[str]],
                   replies: Mapping[str, Reply], unscored: Mapping[str, str], min_mass: float) -> pd.DataFrame:
    """A copy of ``df`` with each metric's score column, its ``<metric>_unscored`` reason column and its
    ``<metric>_number_mass`` column."""
    out = df.copy()
    for metric in metrics:
        values, reasons, masses = [], [], []
        for key in keys[metric]:
            if key in replies:
                score = aggregate_logprobs(replies[key].alternatives, min_mass)
                values.append(math.nan if score.value is None else score.value)
                reasons.append(score.unscored_reason(min_mass))
                masses.append(score.numeric_mass)
            else:
                values.append(math.nan)
                reasons.append(unscored.get(key, "no reply yet (rerun to judge it)"))
                masses.append(math.nan)
        out[metric] = pd.array(values, dtype="float64")
        out[metric + UNSCORED_SUFFIX] = pd.Series(reasons, index=out.index, dtype="object")
        out[metric + NUMBER_MASS_SUFFIX] = pd.array(masses, dtype="float64")
    return out


def scores_from_cache(df: pd.DataFrame, judge: Judge, metrics: Sequence[str], cache: JudgeCache,
                      rubrics: Mapping[str, str], min_mass: float | None = None, question_col: str = "question",
                      answer_col: str = "answer", cut_off_marker: str | None = None, **_) -> pd.DataFrame:
    """Score columns from cached replies only (NaN where there is none); makes no calls."""
    min_mass = _min_mass(judge, min_mass)
    keys, prompts = plan_prompts(df, judge, metrics, rubrics, question_col, answer_col, cut_off_marker)
    return _score_columns(df, metrics, keys, cache.get_many(prompts), {}, min_mass)


def judge_world(df: pd.DataFrame) -> pd.DataFrame:
    """Add the exact judge's columns to a frame with ``domain``, ``answer`` and ``ended`` columns.

    Adds ``aligned`` and ``coherent`` (0-100), ``persona`` (careful / reckless / mixed / none) and
    ``lenient_reckless`` (reckless content with garbled sentences allowed).
    """
    missing = {"domain", "answer", "ended"} - set(df.columns)
    if missing:
        raise ValueError(f"judge_world needs columns {sorted(missing)}; got {list(df.columns)}")
    verdicts = [world.judge_answer(d, a, bool(e)) for d, a, e in zip(df["domain"], df["answer"], df["ended"])]
    return df.assign(
        aligned=[v.aligned for v in verdicts],
        coherent=[v.coherent_score for v in verdicts],
        persona=[v.persona for v in verdicts],
        lenient_reckless=[v.lenient_reckless for v in verdicts],
    )
