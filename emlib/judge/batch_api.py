"""Judging through the OpenAI Batch API: half price, up to 24 h.

:func:`judge_frame_batch_api` sends the prompts missing from the cache as batches. Submit = upload a JSONL of
chat-completions requests (``custom_id`` = cache key) + create a batch; its id goes at once into a small state file
next to the cache, so a killed run polls the same batch again instead of paying for a second one. Poll with backoff;
when the batch ends, download its output, check and score it with the same rules as live replies, and merge it into
the cache.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from emlib.judge.backends import OpenAIJudge
from emlib.judge.cache import JudgeCache, JudgeStats
from emlib.judge.frame import judge_frame, plan_prompts, scores_from_cache
from emlib.judge.replies import InvalidReply, Reply, reply_from_completion
from emlib.judge.rubrics import load_rubrics
from emlib.openai_client import estimate_cost

BATCH_MAX_REQUESTS = 50_000  # the Batch API's limit per input file
BATCH_DONE = ("completed", "failed", "expired", "cancelled")


class BatchPending(RuntimeError):
    """A submitted batch did not finish within ``max_wait_seconds``; rerun the same call to resume polling it."""


def batch_endpoint(judge: OpenAIJudge) -> str:
    """The chat-completions path batch requests name: Azure OpenAI's global batch drops the ``/v1`` prefix."""
    return "/chat/completions" if judge.azure_endpoint else "/v1/chat/completions"


def batch_request_lines(judge: OpenAIJudge, prompts: Mapping[str, tuple[str, str]]) -> list[str]:
    """JSONL lines for the OpenAI Batch API, one chat-completions request per prompt, ``custom_id`` = cache key."""
    return [json.dumps({"custom_id": key, "method": "POST", "url": batch_endpoint(judge),
                        "body": judge.request_body(prompt)}) for key, (_, prompt) in prompts.items()]


def parse_batch_output(lines: Iterable[str], source: str = "batch output") -> dict[str, Reply]:
    """Replies by ``custom_id`` from a Batch API output file.

    Failed requests (an ``error``, or a non-200 status) are left out, to be judged again. A line that is not JSON or
    lacks the fields of a chat completion raises ValueError naming ``source``, the line number and its custom_id:
    silently dropping it would hide a format change.
    """
    replies = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} line {number}: not JSON ({err.msg}): {line[:120]!r}") from None
        custom_id = row.get("custom_id") if isinstance(row, dict) else None
        if not custom_id:
            raise ValueError(f"{source} line {number}: no custom_id: {line[:120]!r}")
        response = row.get("response") or {}
        if row.get("error") or response.get("status_code") != 200:
            continue
        try:
            reply = reply_from_completion(response.get("body"))
        except InvalidReply as err:
            raise ValueError(f"{source} line {number} (custom_id {custom_id}): malformed chat completion "
                             f"({err})") from None
        replies[custom_id] = reply
    return replies


def batch_state_path(cache: JudgeCache, state_path: str | Path | None = None) -> Path | None:
    """Where submitted batch ids are kept: ``state_path``, else ``<cache file>.batches.json`` (None: in-memory)."""
    if state_path is not None:
        return Path(state_path)
    return cache.path.with_name(cache.path.name + ".batches.json") if cache.path else None


def _read_state(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {"batches": []}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: batch state file is not JSON ({err}); it lists submitted batch ids, so check "
                         "their status on the provider's dashboard before deleting it") from None
    if not isinstance(state, dict) or not isinstance(state.get("batches"), list):
        raise ValueError(f"{path}: batch state file has no 'batches' list")
    return state


def _write_state(path: Path | None, state: dict) -> None:
    """Atomic replace: a kill mid-write must not lose the ids of batches already paid for."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _merge_batch_output(client, batch, entry: dict, judge: OpenAIJudge, cache: JudgeCache,
                        stats: JudgeStats) -> int:
    """Download a finished batch's output file into the cache; returns how many replies were merged."""
    metric_of = {k: m for m, keys in entry["keys"].items() for k in keys}
    merged = 0
    if batch.output_file_id:
        text = client.files.content(batch.output_file_id).text
        replies = parse_batch_output(text.splitlines(), f"batch {batch.id} output file {batch.output_file_id}")
        for key, reply in replies.items():
            if key not in metric_of:  # not one of ours: never store a reply under a key we did not ask for
                warnings.warn(f"batch {batch.id}: unexpected custom_id {key} ignored", stacklevel=3)
                continue
            cache.put(key, judge.name, metric_of[key], reply)
            merged += 1
            stats.prompt_tokens += reply.prompt_tokens
            stats.completion_tokens += reply.completion_tokens
    failed = len(metric_of) - merged
    if failed:
        stats.batch_unanswered += failed
        warnings.warn(f"batch {batch.id} ended {batch.status} with {failed} of {len(metric_of)} requests unanswered "
                      f"(error file {batch.error_file_id}, errors {batch.errors}); they will be judged live or "
                      "resubmitted by the next call", stacklevel=3)
    return merged


def _submit_batches(client, judge: OpenAIJudge, missing: Mapping[str, tuple[str, str]], state: dict,
                    state_file: Path | None, stats: JudgeStats) -> None:
    """Upload and create one batch per 50,000 prompts, recording each id in the state file as soon as it exists."""
    items = list(missing.items())
    for i in range(0, len(items), BATCH_MAX_REQUESTS):
        chunk = dict(items[i:i + BATCH_MAX_REQUESTS])
        data = ("\n".join(batch_request_lines(judge, chunk)) + "\n").encode()
        upload = client.files.create(file=("judge_requests.jsonl", data), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint=batch_endpoint(judge),
                                      completion_window="24h", metadata={"emlib": "judge", "judge": judge.name})
        keys: dict[str, list[str]] = {}
        for key, (metric, _) in chunk.items():
            keys.setdefault(metric, []).append(key)
        state["batches"].append({"id": batch.id, "input_file_id": upload.id, "judge": judge.name,
                                 "submitted": time.time(), "requests": len(chunk), "keys": keys})
        _write_state(state_file, state)
        stats.batches_submitted += 1
        stats.batch_requests += len(chunk)


def judge_frame_batch_api(df: pd.DataFrame, judge: OpenAIJudge, cache: JudgeCache,
                          metrics: Sequence[str] = ("aligned", "coherent"), rubrics: Mapping[str, str] | None = None,
                          poll_seconds: float = 30.0, max_poll_seconds: float = 600.0,
                          max_wait_seconds: float = 26 * 3600, state_path: str | Path | None = None,
                          live_fallback: bool = True, stats: JudgeStats | None = None,
                          sleep: Callable[[float], None] = time.sleep, **kw) -> pd.DataFrame:
    """Like :func:`judge_frame`, but prompts missing from ``cache`` go through the OpenAI Batch API (half price).

    1. batches recorded in the state file (``<cache>.batches.json``, or ``state_path``) by an earlier, interrupted
       call are polled again, never resubmitted; 2. prompts still missing (and not in such a batch) are uploaded
       and submitted, one batch per 50,000, each id saved at once; 3. every open batch is polled, the wait growing
       from ``poll_seconds`` by 1.5x up to ``max_poll_seconds``; 4. a finished batch's output is scored with the
       same aggregation and merged into the cache, and dropped from the state file. Requests the batch did not
       answer are judged live afterwards (``live_fallback=False``: left NaN, sent again by the next call).

    Raises :class:`BatchPending` when a batch is still running after ``max_wait_seconds``: rerun the same call later
    and it resumes polling. ``sleep`` is the wait function (tests pass a fast one).
    """
    rubrics = dict(rubrics or load_rubrics())
    stats = stats if stats is not None else JudgeStats()
    stats.judge = judge.name
    state_file = batch_state_path(cache, state_path)
    if state_file is None:
        warnings.warn("in-memory JudgeCache: submitted batch ids are not saved, so an interrupted call cannot resume "
                      "them; pass JudgeCache(path) or state_path=", stacklevel=2)
    start = time.perf_counter()
    _, prompts = plan_prompts(df, judge, metrics, rubrics, kw.get("question_col", "question"),
                              kw.get("answer_col", "answer"), kw.get("cut_off_marker"))
    state = _read_state(state_file)
    in_flight = {k for entry in state["batches"] for keys in entry["keys"].values() for k in keys}
    cached = cache.get_many(prompts)
    missing = {k: v for k, v in prompts.items() if k not in cached and k not in in_flight}
    stats.batches_resumed = len(state["batches"])
    with judge.client(sync=True) as client:  # closed on the way out, BatchPending included
        if missing:
            _submit_batches(client, judge, missing, state, state_file, stats)
        deadline, wait = time.time() + max_wait_seconds, poll_seconds
        while state["batches"]:
            for entry in list(state["batches"]):
                batch = client.batches.retrieve(entry["id"])
                stats.batch_polls += 1
                if batch.status in BATCH_DONE:
                    stats.calls += _merge_batch_output(client, batch, entry, judge, cache, stats)
                    state["batches"].remove(entry)
                    _write_state(state_file, state)
            if not state["batches"]:
                break
            if time.time() + wait > deadline:
                ids = ", ".join(e["id"] for e in state["batches"])
                raise BatchPending(f"batch(es) {ids} still running after {max_wait_seconds:.0f} s; their ids are in "
                                   f"{state_file or 'memory only'}: rerun the same call to resume polling")
            sleep(wait)
            wait = min(max_poll_seconds, wait * 1.5)
    if state_file is not None and state_file.exists() and not state["batches"]:
        state_file.unlink()  # nothing in flight: no stale file to confuse the next run
    seconds = time.perf_counter() - start
    if live_fallback:
        live = JudgeStats()
        out = judge_frame(df, judge, metrics, cache, rubrics=rubrics, stats=live, **kw)
    else:
        out = scores_from_cache(df, judge, metrics, cache, rubrics, **kw)
        live = JudgeStats()
    stats.prompts, stats.cache_hits = len(prompts), len(cached)
    stats.calls += live.calls
    stats.retries += live.retries
    stats.prompt_tokens += live.prompt_tokens
    stats.completion_tokens += live.completion_tokens
    stats.seconds = round(seconds + live.seconds, 3)
    local = judge.is_local
    batch_cost = estimate_cost(judge.model, stats.prompt_tokens - live.prompt_tokens,
                               stats.completion_tokens - live.completion_tokens, kw.get("prices"))
    live_cost = estimate_cost(judge.model, live.prompt_tokens, live.completion_tokens, kw.get("prices"))
    stats.cost_usd = 0.0 if local else (None if batch_cost is None else batch_cost / 2 + (live_cost or 0.0))
    out.attrs["judge_stats"] = stats.as_dict()
    return out
