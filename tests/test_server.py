"""The local OpenAI-compatible server, exercised through the real openai client."""

import asyncio
import http.client
import json
import math
import threading
import time

import openai
import pandas as pd
import pytest

from emlib.judge.server import Backend, Completion, LocalServer


def _echo(messages, request):
    text = messages[-1]["content"][::-1]
    return Completion(text, top_logprobs=[("42", math.log(0.7)), ("7", math.log(0.2)), ("x", math.log(0.1))],
                      prompt_tokens=len(messages[-1]["content"].split()), completion_tokens=1)


def test_round_trip_with_logprobs():
    with LocalServer(Backend("echo", _echo)) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0, timeout=10) as client:
            assert [m.id for m in client.models.list()] == ["echo"]
            for _ in range(2):  # a second call on the kept-alive connection must work too
                r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "abc"}],
                                                   max_tokens=1, temperature=0, logprobs=True, top_logprobs=20,
                                                   seed=0)
            assert r.choices[0].message.content == "cba"
            tops = r.choices[0].logprobs.content[0].top_logprobs
            assert [t.token for t in tops] == ["42", "7", "x"]
            assert math.isclose(math.exp(tops[0].logprob), 0.7, rel_tol=1e-6)
            assert r.usage.prompt_tokens == 1 and server.backend.calls == 2


def test_bad_request_is_a_clear_400():
    with LocalServer(Backend("echo", _echo)) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0, timeout=10) as client:
            with pytest.raises(openai.BadRequestError, match="messages"):
                client.chat.completions.create(model="echo", messages=[])


def test_many_concurrent_calls_with_latency():
    async def main(url):
        async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0, timeout=20) as client:
            rs = await asyncio.gather(*(client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": str(i)}]) for i in range(64)))
        return len(rs)

    with LocalServer(Backend("echo", _echo), latency=0.2) as server:
        assert asyncio.run(main(server.base_url)) == 64
        assert server.backend.calls == 64


# ------------------------------------------------------------------------------------------ the batch worker


def _slow_batches(seconds: float, seen: list):
    """A batching backend taking ``seconds`` per batch and recording every prompt it computed."""
    lock = threading.Lock()

    def complete_batch(calls):
        time.sleep(seconds)
        with lock:
            seen.extend(m[-1]["content"] for m, _ in calls)
        return [Completion("50", top_logprobs=[("50", 0.0)], completion_tokens=1) for _ in calls]

    return Backend("slow", lambda m, r: complete_batch([(m, r)])[0], complete_batch)


def _handler_threads(before: set[int]) -> int:
    """Handler threads started since ``before`` (other tests' servers may leave idle ones behind)."""
    return sum("process_request_thread" in t.name and t.ident not in before for t in threading.enumerate())


def test_more_concurrent_requests_than_the_queue_are_pushed_back_then_all_scored():
    """24 prompts at once against batches of 2, a queue of 2 and 8 connections: handler threads stay at most 8, the
    requests beyond batch + queue are answered 429 with Retry-After, and a retrying client gets every prompt scored."""
    from emlib import judge as J

    seen, peak, before = [], [0], {t.ident for t in threading.enumerate()}
    rows = pd.DataFrame({"question": [f"q{i}" for i in range(24)], "answer": ["a"] * 24})
    with LocalServer(_slow_batches(0.05, seen), batch_size=2, max_queue=2, max_connections=8) as server:
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], _handler_threads(before))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        judge = J.OpenAIJudge("slow", base_url=server.base_url, max_retries=40, backoff_max=2.0)
        stats = J.JudgeStats()
        out = J.judge_frame(rows, judge, ["aligned"], max_in_flight=24, stats=stats)
        done.set()
        worker = server.worker
    assert out["aligned"].tolist() == [50.0] * 24 and stats.failures == 0
    assert worker.rejected > 0 and stats.retries >= worker.rejected  # 429s answered, and retried
    assert worker.computed == 24 and len(seen) == 24  # each prompt computed once: a 429 costs no compute
    assert 0 < peak[0] <= 8  # handler threads never beyond max_connections


def test_a_request_whose_client_gave_up_is_not_computed():
    seen = []
    body = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "{}"}]})
    with LocalServer(_slow_batches(0.6, seen), batch_size=1, max_queue=4) as server:
        port = server.httpd.server_address[1]

        def post(content: str, timeout: float):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                conn.request("POST", "/v1/chat/completions", body.replace("{}", content),
                             {"Content-Type": "application/json"})
                return conn.getresponse().status
            except TimeoutError:
                return None
            finally:
                conn.close()

        first = threading.Thread(target=post, args=("computed", 10))
        first.start()  # occupies the worker for 0.6 s
        time.sleep(0.1)
        assert post("abandoned", 0.2) is None  # the client gives up while its request waits in the queue
        first.join()
        time.sleep(0.8)  # long enough for the worker to have computed it, had it not been dropped
        assert seen == ["computed"] and server.worker.dropped == 1 and server.worker.computed == 1
