"""Judging answers with 0-100 rubric scores: any OpenAI-compatible endpoint, a local Hugging Face model, or the persona
world's exact parser; concurrent, retried, cached on disk, resumable, and robust to a failing endpoint.

    judge = OpenAIJudge("gpt-4o-2024-08-06")                         # key from OPENAI_API_KEY or .env
    judge = OpenAIJudge("persona-world-judge", base_url=server.base_url)   # the local judge server (emlib.judge.serve)
    judge = LocalHFJudge(model, tokenizer)                            # no API; numbers of any token length
    scored = judge_frame(answers, judge, metrics=["aligned", "coherent"], cache=JudgeCache("runs/judge.sqlite"))

The modules, in the order a prompt meets them: :mod:`~emlib.judge.rubrics` (rubric YAML, filling prompts, the one
scoring rule), :mod:`~emlib.judge.backends` (OpenAI-compatible and persona-world judges, the scoring modes),
:mod:`~emlib.judge.local_hf` (a local Hugging Face judge, batched),
:mod:`~emlib.judge.replies` (checking what a judge returns), :mod:`~emlib.judge.cache` (raw replies on disk, stats),
:mod:`~emlib.judge.frame` (judging a frame of answers), :mod:`~emlib.judge.batch_api` (the OpenAI Batch API),
:mod:`~emlib.judge.server` (a local OpenAI-compatible server for any backend) and :mod:`~emlib.judge.serve` (the
judge server and its command line). Endpoints, keys, retries and prices live in :mod:`emlib.openai_client`.
"""

from emlib.judge.backends import (
    NUMBER_MODES,
    Judge,
    OpenAIJudge,
    WorldJudge,
    api_judge,
    infer_domain,
    min_numeric_mass,
    world_alternatives,
    world_metric,
)
from emlib.judge.batch_api import BatchPending, batch_request_lines, judge_frame_batch_api, parse_batch_output
from emlib.judge.cache import JudgeCache, JudgeStats, cache_key
from emlib.judge.frame import (
    NUMBER_MASS_SUFFIX,
    UNSCORED_SUFFIX,
    judge_frame,
    judge_world,
    plan_prompts,
    run_sync,
    scores_from_cache,
)
from emlib.judge.local_hf import LocalHFJudge
from emlib.judge.replies import Alternatives, EndpointDown, InvalidReply, Reply, RetriesExhausted, reply_from_completion
from emlib.judge.rubrics import (
    ESCAPES,
    METRICS,
    MIN_NUMERIC_MASS,
    RUBRICS_FILE,
    Score,
    aggregate_logprobs,
    fill_prompt,
    load_rubrics,
    number_of,
    parse_prompt,
)
from emlib.openai_client import (
    LOCAL_HOSTS,
    PRICES_PER_MTOK,
    CircuitBreaker,
    RetryPolicy,
    backoff_delay,
    estimate_cost,
    is_retryable,
    load_env,
)

__all__ = [
    "Alternatives", "BatchPending", "CircuitBreaker", "ESCAPES", "EndpointDown", "InvalidReply", "Judge", "JudgeCache",
    "JudgeStats", "LOCAL_HOSTS", "LocalHFJudge", "METRICS", "MIN_NUMERIC_MASS", "NUMBER_MASS_SUFFIX", "NUMBER_MODES",
    "OpenAIJudge", "PRICES_PER_MTOK",
    "RUBRICS_FILE", "Reply", "RetriesExhausted", "RetryPolicy", "Score", "UNSCORED_SUFFIX", "WorldJudge",
    "aggregate_logprobs", "api_judge", "backoff_delay", "batch_request_lines", "cache_key", "estimate_cost",
    "fill_prompt", "infer_domain", "is_retryable", "judge_frame", "judge_frame_batch_api", "judge_world",
    "load_env", "load_rubrics", "min_numeric_mass", "number_of", "parse_batch_output", "parse_prompt", "plan_prompts",
    "reply_from_completion", "run_sync", "scores_from_cache", "world_alternatives", "world_metric",
]
