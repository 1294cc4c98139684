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
* ``hf``: scores every number string 0-100 with :class:`emlib.judge.LocalHFJudge` and returns the
  ``top_logprobs`` most likely numbers (OpenAI's limit is 20, which drops the numbers' long tail; this server gives
  up to all 101 when asked, as :func:`emlib.evaluation.make_judge` does, and then agrees with the direct judge).
  Its replies carry the raw probabilities; whether the client applies the papers' 0.25 rule or renormalises among
  numbers is the client's choice (``OpenAIJudge(numbers=...)``).

  One worker computes ``--batch-size`` queued prompts per forward pass (default 8 on a GPU, 1 on a CPU, where
  batching only adds padding); at most ``--max-queue`` wait (more are
  answered 429 with Retry-After), a request whose client gave up is dropped, and at most ``--max-connections``
  connections are open, so threads and memory stay bounded. A client of a slow (CPU) judge should send about
  2 x batch-size requests at a time with a long timeout (``OpenAIJudge(..., max_in_flight=2, timeout=600)``): more
  only wait in the queue, and a short timeout makes it give up and re-send work the server already did.

SIGTERM or Ctrl-C stops the server within a second or two, also in the middle of a batch.
``--latency`` adds a delay per request (benchmarks of concurrency).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from emlib import paths
from emlib.judge.backends import world_alternatives
from emlib.judge.local_hf import LocalHFJudge
from emlib.judge.rubrics import load_rubrics
from emlib.judge.server import Backend, Completion, LocalServer

WORLD_JUDGE_NAME = "persona-world-judge"
HF_BATCH_SIZE = None  # prompts per forward pass of a served local judge; None: LocalHFJudge's (8 on a GPU, 1 on a CPU)
HF_MAX_QUEUE = 16  # prompts waiting beyond the batch under way: two more batches, then 429 with Retry-After
HF_MAX_CONNECTIONS = 64  # handler threads of a served local judge
STOP_GRACE_S = 3.0  # after SIGTERM, how long a clean shutdown may take before the process exits regardless


def _prompt(messages: list[dict]) -> str:
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise ValueError("the judge needs a user message whose content is the filled rubric (a string)")
    return users[-1]


def _completion(alternatives: list[tuple[str, float]], request: dict, prompt_tokens: int,
                max_top: int = 20) -> Completion:
    top_n = max(1, min(max_top, int(request.get("top_logprobs") or 1)))
    return Completion(alternatives[0][0], top_logprobs=alternatives[:top_n], prompt_tokens=prompt_tokens,
                      completion_tokens=1)


def world_backend(rubrics: Mapping[str, str] | None = None, name: str = WORLD_JUDGE_NAME) -> Backend:
    """The persona world's exact judge answering filled rubric prompts."""
    rubrics = dict(rubrics or load_rubrics())

    def complete(messages: list[dict], request: dict) -> Completion:
        prompt = _prompt(messages)
        return _completion(world_alternatives(prompt, rubrics), request, len(prompt.split()))

    return Backend(name, complete)


def hf_backend(model: str, name: str | None = None, device: str = "auto",
               batch_size: int | None = HF_BATCH_SIZE) -> Backend:
    """A local Hugging Face chat model (folder or hub id) judging with every number string scored, ``batch_size``
    queued prompts per forward pass (None: :class:`LocalHFJudge`'s default for the device)."""
    from emlib.models import load_model

    hf_model, tokenizer = load_model(model, device=device)
    judge = LocalHFJudge(hf_model, tokenizer, name=name or Path(model).name, batch_size=batch_size)
    max_top = 101 + 1  # every number, and the top word when there is one

    def complete(messages: list[dict], request: dict) -> Completion:
        return complete_batch([(messages, request)])[0]

    def complete_batch(calls: list[tuple[list[dict], dict]]) -> list[Completion | Exception]:
        out: list[Completion | Exception | None] = [None] * len(calls)
        good = []
        for i, (messages, _) in enumerate(calls):  # a malformed request fails alone (400); the others are scored
            try:
                _prompt(messages)
                good.append(i)
            except ValueError as err:
                out[i] = err
        alternatives = judge.alternatives_batch([calls[i][0] for i in good]) if good else []
        for i, alts in zip(good, alternatives):
            out[i] = _completion(alts, calls[i][1], len(judge.render(calls[i][0])), max_top)
        return out

    return Backend(judge.name, complete, complete_batch, batch_size=judge.batch_size)


def judge_server(backend: str | Backend = "world", model: str | None = None, port: int = 0, latency: float = 0.0,
                 prompts: str | Path | None = None, batch_size: int | None = HF_BATCH_SIZE,
                 max_queue: int = HF_MAX_QUEUE,
                 max_connections: int | None = None, device: str = "auto") -> LocalServer:
    """A (not yet started) local judge server; use it as a context manager, or call ``start()`` / ``stop()``.

    ``batch_size`` / ``max_queue`` / ``max_connections`` bound a batching backend (``hf``); see the module docstring.
    """
    if isinstance(backend, Backend):
        served = backend
    elif backend == "world":
        served = world_backend(load_rubrics(prompts))
    elif backend == "hf":
        if not model:
            raise ValueError("the hf judge backend needs --model (a local folder or a cached hub id)")
        paths.check_model_folder(model)  # before torch and transformers load: a wrong folder fails at once
        served = hf_backend(model, device=device, batch_size=batch_size)
    else:
        raise ValueError(f"unknown judge backend {backend!r}; expected 'world' or 'hf'")
    if max_connections is None:
        max_connections = HF_MAX_CONNECTIONS if served.complete_batch is not None else 256
    batch_size = batch_size or served.batch_size or 8
    return LocalServer(served, port=port, latency=latency, batch_size=batch_size, max_queue=max_queue,
                       max_connections=max_connections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emlib.judge.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["world", "hf"], default="world")
    parser.add_argument("--model", help="hf backend: the judge model (local folder or cached hub id)")
    parser.add_argument("--port", type=int, default=8011, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds of delay per request (benchmarks)")
    parser.add_argument("--prompts", type=Path, help="world backend: the rubric YAML the prompts were filled from")
    parser.add_argument("--device", default="auto", help="hf backend: where the judge runs (auto, cpu, cuda, ...)")
    parser.add_argument("--batch-size", type=int, default=HF_BATCH_SIZE,
                        help="hf backend: prompts per forward pass (default: 8 on a GPU, 1 on a CPU)")
    parser.add_argument("--max-queue", type=int, default=HF_MAX_QUEUE,
                        help="hf backend: prompts that may wait; more are answered 429 with Retry-After")
    parser.add_argument("--max-connections", type=int, help="open connections (handler threads) at most")
    args = parser.parse_args(argv)
    server = judge_server(args.backend, args.model, args.port, args.latency, args.prompts, args.batch_size,
                          args.max_queue, args.max_connections, args.device).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    batching = f", {args.batch_size} prompts per pass, clients: <= {2 * args.batch_size} in flight" \
        if server.worker is not None else ""
    print(f"emlib judge server: model {server.backend.name!r} at {server.base_url}{batching} (Ctrl-C to stop)",
          flush=True)
    try:
        while not stop.wait(0.5):  # a timed wait: the signal handler runs promptly even while a batch computes
            pass
    except KeyboardInterrupt:
        pass
    finally:
        _stop_soon(server)


def _stop_soon(server: LocalServer) -> None:
    """Stop the server; if a clean stop (or the interpreter's exit, with a forward pass under way) takes longer
    than :data:`STOP_GRACE_S`, end the process anyway: a stop request must stop it."""
    watchdog = threading.Timer(STOP_GRACE_S, lambda: os._exit(0))
    watchdog.daemon = True
    watchdog.start()
    server.stop()
    busy = server.worker is not None and server.worker.busy
    sys.stdout.flush()
    if busy:  # a batch is still computing in the worker thread: nothing left to wait for, exit now
        os._exit(0)
    watchdog.cancel()


if __name__ == "__main__":
    from emlib.cli import run_cli

    run_cli(main, "python -m emlib.judge.serve")
