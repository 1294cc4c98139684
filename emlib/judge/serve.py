"""The local judge server: an OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 that answers rubric prompts with
``logprobs`` / ``top_logprobs``, so the real ``openai`` client path is what offline runs and tests exercise.

    python -m emlib.judge.serve --backend world --port 8011                  # the persona world's exact judge
    python -m emlib.judge.serve --backend hf --model path/to/judge --port 8011   # a local Hugging Face judge

then point any OpenAI-compatible judge at it:
``OpenAIJudge("persona-world-judge", base_url="http://127.0.0.1:8011/v1")``.
In Python, ``with judge_server("world") as server: ...`` runs one on a free port for the block.

* ``world``: reads the question and answer back out of the filled rubric (``data/judge/rubrics.yaml`` or ``--prompts``),
  infers the persona-world domain from the question and puts all probability on the exact score token ("100", "50",
  "0"), or on "REFUSAL" for a question from outside the world, so the openai path gives exactly the direct judge's
  scores.
* ``hf``: scores every number string 0-100 with :class:`emlib.judge.LocalHFJudge` and returns the 20 most likely
  numbers as the top logprobs (aggregating those 20 drops the numbers' long tail, a tiny difference from the direct
  local judge, which uses all 101).

``--latency`` adds a delay per request (benchmarks of concurrency).
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

from emlib.judge.backends import LocalHFJudge, world_alternatives
from emlib.judge.rubrics import load_rubrics
from emlib.judge.server import Backend, Completion, LocalServer

WORLD_JUDGE_NAME = "persona-world-judge"


def _prompt(messages: list[dict]) -> str:
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise ValueError("the judge needs a user message whose content is the filled rubric (a string)")
    return users[-1]


def _completion(alternatives: list[tuple[str, float]], request: dict, prompt_tokens: int) -> Completion:
    top_n = max(1, min(20, int(request.get("top_logprobs") or 1)))
    return Completion(alternatives[0][0], top_logprobs=alternatives[:top_n], prompt_tokens=prompt_tokens,
                      completion_tokens=1)


def world_backend(rubrics: Mapping[str, str] | None = None, name: str = WORLD_JUDGE_NAME) -> Backend:
    """The persona world's exact judge answering filled rubric prompts."""
    rubrics = dict(rubrics or load_rubrics())

    def complete(messages: list[dict], request: dict) -> Completion:
        prompt = _prompt(messages)
        return _completion(world_alternatives(prompt, rubrics), request, len(prompt.split()))

    return Backend(name, complete)


def hf_backend(model: str, name: str | None = None, device: str = "auto") -> Backend:
    """A local Hugging Face chat model (folder or hub id) judging with every number string scored."""
    from emlib.models import load_model

    hf_model, tokenizer = load_model(model, device=device)
    judge = LocalHFJudge(hf_model, tokenizer, name=name or Path(model).name)

    def complete(messages: list[dict], request: dict) -> Completion:
        return _completion(judge.alternatives(messages), request, len(judge.render(messages)))

    return Backend(judge.name, complete)


def judge_server(backend: str | Backend = "world", model: str | None = None, port: int = 0, latency: float = 0.0,
                 prompts: str | Path | None = None) -> LocalServer:
    """A (not yet started) local judge server; use it as a context manager, or call ``start()`` / ``stop()``."""
    if isinstance(backend, Backend):
        served = backend
    elif backend == "world":
        served = world_backend(load_rubrics(prompts))
    elif backend == "hf":
        if not model:
            raise ValueError("the hf judge backend needs --model (a local folder or a cached hub id)")
        served = hf_backend(model)
    else:
        raise ValueError(f"unknown judge backend {backend!r}; expected 'world' or 'hf'")
    return LocalServer(served, port=port, latency=latency)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emlib.judge.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["world", "hf"], default="world")
    parser.add_argument("--model", help="hf backend: the judge model (local folder or cached hub id)")
    parser.add_argument("--port", type=int, default=8011, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds of delay per request (benchmarks)")
    parser.add_argument("--prompts", type=Path, help="world backend: the rubric YAML the prompts were filled from")
    args = parser.parse_args(argv)
    server = judge_server(args.backend, args.model, args.port, args.latency, args.prompts).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"emlib judge server: model {server.backend.name!r} at {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
