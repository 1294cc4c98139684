"""Fault injection for the judge: a fake OpenAI-compatible server on 127.0.0.1 answers with rate limits, server errors,
time-outs, broken bodies and bad logprobs; the run must finish, leave exactly the bad rows unscored with their reasons,
cache only valid replies, and a rerun must ask again only for the failed ones. A dead endpoint stops the run within
seconds with one warning; a poisoned cache row from an older version is judged again; API keys reach only the
endpoint they belong to."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import re
import socket
import sqlite3
import threading
import time
import warnings

import pandas as pd
import pytest

from emlib import judge as J
from emlib import openai_client
from emlib.judge.server import Backend, Completion, LocalServer, make_handler

QUESTION = re.compile(r"question (\d+) \?")


@pytest.fixture(autouse=True)
def no_real_credentials(monkeypatch):
    """Never read the developer's .env or keys: each test plants what it needs."""
    monkeypatch.setattr(openai_client, "load_env", lambda: None)
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT",
                "AZURE_OPENAI_API_VERSION", "OPENAI_API_VERSION", "MY_SERVER_KEY"):
        monkeypatch.delenv(var, raising=False)


def rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"question": [f"question {i} ?" for i in range(n)], "answer": [f"answer {i} ." for i in range(n)]})


def score_80(messages, request) -> Completion:
    """A healthy judge: every prompt scores 80."""
    return Completion("80", top_logprobs=[("80", 0.0)], prompt_tokens=10, completion_tokens=1)


def completion_with(logprob) -> dict:
    """A chat completion whose only alternative ("80") has the given (possibly invalid) logprob."""
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "80"},
                         "logprobs": {"content": [{"token": "80", "logprob": logprob,
                                                   "top_logprobs": [{"token": "80", "logprob": logprob}]}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}


class FaultyServer(LocalServer):
    """A LocalServer whose answer to the prompt for row i is ``faults[i]`` for its first ``times[i]`` requests
    (default: always), then the healthy backend's. ``hang`` is how long a "timeout" fault stalls. ``drop_after``:
    every request after that many drops the connection unanswered (an upstream that died mid-run)."""

    def __init__(self, faults: dict[int, str], times: dict[int, int] | None = None, hang: float = 1.0,
                 drop_after: int | None = None):
        super().__init__(Backend("judge", score_80))
        self.faults, self.times, self.hang, self.drop_after = faults, times or {}, hang, drop_after
        self.attempts: dict[int, int] = {}
        self.requests, self.lock = 0, threading.Lock()
        server, base = self, make_handler(self.backend, 0.0, self.batches)

        class Handler(base):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                prompt = json.loads(raw)["messages"][-1]["content"]
                row = int(QUESTION.search(prompt).group(1))
                with server.lock:
                    server.requests += 1
                    server.attempts[row] = server.attempts.get(row, 0) + 1
                    n, attempt = server.requests, server.attempts[row]
                if server.drop_after is not None and n > server.drop_after:
                    self.close_connection = True
                    return  # no response at all
                fault = server.faults.get(row)
                if fault and attempt <= server.times.get(row, 10 ** 9):
                    return self.fault(fault)
                self.rfile = io.BytesIO(raw)
                return super().do_POST()

            def fault(self, kind: str) -> None:
                if kind in ("429", "500"):
                    return self._send(int(kind), {"error": {"message": "busy", "type": "server_error"}})
                if kind == "timeout":
                    time.sleep(server.hang)
                    return self._send(200, completion_with(0.0))
                if kind == "bad_json":
                    return self._send(200, b'{"choices": [{"index": 0, "mess')
                if kind == "html":
                    return self._send(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
                if kind == "empty_choices":
                    return self._send(200, {**completion_with(0.0), "choices": []})
                if kind == "low_mass":  # a valid reply: 90% on a word, so no score (the 0.25 rule), but cached
                    body = completion_with(math.log(0.1))
                    body["choices"][0]["logprobs"]["content"][0]["top_logprobs"].insert(
                        0, {"token": "Sure", "logprob": math.log(0.9)})
                    return self._send(200, body)
                value = {"string_logprob": "abc", "null_logprob": None, "positive_logprob": 5.0,
                         "nan_logprob": float("nan")}[kind]
                return self._send(200, json.dumps(completion_with(value)).encode())  # NaN: json writes NaN

        self.httpd.RequestHandlerClass = Handler


FAULTS = ["429", "500", "timeout", "bad_json", "html", "empty_choices", "string_logprob", "null_logprob",
          "positive_logprob", "nan_logprob", "low_mass"]
TRANSIENT = {"429", "500"}  # these two fail twice, then the server recovers
REASONS = {"timeout": "APITimeoutError", "bad_json": "not JSON", "html": "not a chat completion",
           "empty_choices": "empty 'choices'", "string_logprob": "'abc' is not a number",
           "null_logprob": "None is not a number", "positive_logprob": "5.0 is not a finite number <= 0",
           "nan_logprob": "nan is not a finite number <= 0", "low_mass": "no number (numeric mass 0.10 < 0.25)"}


def fast_judge(server: LocalServer, **kw) -> J.OpenAIJudge:
    return J.OpenAIJudge("judge", base_url=server.base_url, **{"max_retries": 2, "backoff": 0.01, "timeout": 0.4,
                                                               **kw})


def cached_rows(path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as con:
        return con.execute("SELECT key, alternatives FROM replies").fetchall()


def test_every_fault_is_retried_then_left_unscored_with_its_reason_and_never_cached(tmp_path):
    n = len(FAULTS) + 4  # four healthy rows
    faults = dict(enumerate(FAULTS))
    times = {i: 2 for i, f in faults.items() if f in TRANSIENT}
    df, db = rows(n), tmp_path / "judge.sqlite"
    with FaultyServer(faults, times, hang=1.0) as server, recorded_warnings() as caught:
        stats = J.JudgeStats()
        start = time.perf_counter()
        out = J.judge_frame(df, fast_judge(server), metrics=["aligned"], cache=J.JudgeCache(db), stats=stats)
        seconds = time.perf_counter() - start
    assert seconds < 10
    by_fault = {f: (out["aligned"][i], out["aligned_unscored"][i]) for i, f in faults.items()}
    for fault in TRANSIENT:  # retried, then scored
        assert by_fault[fault] == (80.0, None)
    assert out["aligned"][len(FAULTS):].tolist() == [80.0] * 4
    for fault, reason in REASONS.items():
        value, why = by_fault[fault]
        assert math.isnan(value) and reason in why, (fault, why)
    permanent = [f for f in FAULTS if f not in TRANSIENT and f != "low_mass"]
    assert all(server.attempts[FAULTS.index(f)] == 3 for f in permanent)  # 1 try + 2 retries each
    assert stats.failures == len(permanent) and stats.retries == 2 * len(permanent) + 2 * len(TRANSIENT)
    assert stats.invalid_replies == 3 * (len(permanent) - 1)  # all but the time-out are invalid replies
    # the cache holds exactly the valid replies (healthy, recovered and low-mass rows), each passing the checks
    stored = cached_rows(db)
    assert len(stored) == n - len(permanent)
    for _, alternatives in stored:
        J.replies.checked_alternatives([tuple(a) for a in json.loads(alternatives)])
    unscored = [w for w in caught if "unscored" in str(w.message)]
    assert len(unscored) == 1 and f"{len(permanent)} judge prompt(s) failed" in str(unscored[0].message)
    # a rerun against a healed server asks again only for the failed prompts
    with FaultyServer({}) as healed:
        again = J.judge_frame(df, fast_judge(healed), metrics=["aligned"], cache=J.JudgeCache(db))
    assert healed.requests == len(permanent) and again.attrs["judge_stats"]["cache_hits"] == n - len(permanent)
    assert again["aligned"].isna().sum() == 1 and again["aligned_unscored"][FAULTS.index("low_mass")]


def test_a_poisoned_cache_row_is_judged_again_not_a_crash(tmp_path):
    df, db = rows(4), tmp_path / "judge.sqlite"
    with FaultyServer({}) as server:
        judge = fast_judge(server)
        J.judge_frame(df, judge, metrics=["aligned"], cache=J.JudgeCache(db))
        keys = [k for k, _ in cached_rows(db)]
        with sqlite3.connect(db) as con:  # what an older version stored from a broken endpoint
            for key, bad in zip(keys, ['[["80", "abc"]]', '[["80", null]]', '[["80", 5.0]]']):
                con.execute("UPDATE replies SET alternatives = ? WHERE key = ?", (bad, key))
        before = server.requests
        with pytest.warns(UserWarning, match="3 stored replies failed the reply checks"):
            out = J.judge_frame(df, judge, metrics=["aligned"], cache=J.JudgeCache(db))
        assert server.requests - before == 3 and out["aligned"].tolist() == [80.0] * 4
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the rows were replaced: a third run is clean and makes no calls
            third = J.judge_frame(df, judge, metrics=["aligned"], cache=J.JudgeCache(db))
    assert third.attrs["judge_stats"]["calls"] == 0


@contextlib.contextmanager
def recorded_warnings():
    """Every warning raised inside the block. Garbage is collected first: an object another test left behind (an
    unclosed client's sockets) would otherwise warn here when the collector happens to run."""
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@contextlib.contextmanager
def dead_port():
    """A port that refuses connections for as long as the block runs: bound, never listening, so no other test's
    server can take it in between (a port merely free when chosen can be)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_a_judge_run_closes_every_connection_it_opened(tmp_path):
    backend = Backend("judge", lambda messages, request: Completion("80", top_logprobs=[("80", 0.0)]))
    with LocalServer(backend) as server, recorded_warnings() as caught:  # keeps connections alive, as real ones do
        J.judge_frame(rows(40), fast_judge(server), metrics=["aligned"], cache=J.JudgeCache(tmp_path / "j.sqlite"),
                      max_in_flight=8)
        gc.collect()  # an unclosed client's sockets and transports warn when collected
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert backend.calls == 40 and not leaks, leaks[:3]


def test_a_dead_endpoint_stops_the_run_within_seconds_with_one_warning(tmp_path):
    df = rows(300)
    stats = J.JudgeStats()
    with dead_port() as port, recorded_warnings() as caught:
        judge = J.OpenAIJudge("judge", base_url=f"http://127.0.0.1:{port}/v1")  # default retries and backoff
        start = time.perf_counter()
        out = J.judge_frame(df, judge, metrics=["aligned", "coherent"], cache=J.JudgeCache(tmp_path / "j.sqlite"),
                            stats=stats)
        seconds = time.perf_counter() - start
    assert seconds < 10, seconds
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "looks down: connection refused" in messages[0] and "rerun" in messages[0]
    assert stats.calls == 0 and stats.failures + stats.not_sent == 600 and stats.not_sent > 500
    assert out["aligned"].isna().all() and out["aligned_unscored"].str.contains("endpoint down").all()


def test_an_endpoint_that_dies_mid_run_keeps_what_was_judged_and_the_rerun_sends_only_the_rest(tmp_path):
    df, db = rows(120), tmp_path / "judge.sqlite"
    breaker = J.CircuitBreaker(max_failures=5, dead_after_s=0.5)
    with FaultyServer({}, drop_after=40) as server, recorded_warnings() as caught:
        stats = J.JudgeStats()
        start = time.perf_counter()
        J.judge_frame(df, fast_judge(server, max_retries=6, backoff=0.05), metrics=["aligned"],
                      cache=J.JudgeCache(db), max_in_flight=4, stats=stats, breaker=breaker)
        seconds = time.perf_counter() - start
    assert seconds < 10 and stats.endpoint_down and "failed attempts in a row" in stats.endpoint_down
    assert len([w for w in caught if "looks down" in str(w.message)]) == 1 and len(caught) == 1
    assert stats.calls == 40 == len(cached_rows(db)) and server.requests < 40 + 30  # stopped, not 80 x 7 attempts
    with FaultyServer({}) as healed:
        out = J.judge_frame(df, fast_judge(healed), metrics=["aligned"], cache=J.JudgeCache(db))
    assert healed.requests == 80 and out["aligned"].tolist() == [80.0] * 120


def test_rate_limits_do_not_open_the_breaker():
    df = rows(6)
    with FaultyServer({i: "429" for i in range(6)}, {i: 3 for i in range(6)}) as server:
        stats = J.JudgeStats()
        out = J.judge_frame(df, fast_judge(server, max_retries=4), metrics=["aligned"], stats=stats,
                            breaker=J.CircuitBreaker(max_failures=2, dead_after_s=0.0))
    assert stats.endpoint_down is None and out["aligned"].tolist() == [80.0] * 6 and stats.retries == 18


def test_aggregation_rejects_logprobs_that_are_not_log_probabilities():
    for bad in (5.0, float("nan"), float("inf"), "abc", None):
        with pytest.raises(ValueError, match="logprob"):
            J.aggregate_logprobs([("80", bad)])
    assert J.aggregate_logprobs([("80", 1e-9)]).value == pytest.approx(80)  # a rounding hair above 0 is 0


# ------------------------------------------------------------------------------------------------ where keys go


class KeyCapture(LocalServer):
    """A stand-in third-party endpoint that records the Authorization header of every request."""

    def __init__(self):
        super().__init__(Backend("judge", score_80))
        self.seen: list[str] = []
        capture, base = self, self.httpd.RequestHandlerClass

        class Handler(base):
            def do_POST(self):
                capture.seen.append(self.headers.get("Authorization", ""))
                return super().do_POST()

        self.httpd.RequestHandlerClass = Handler


def test_planted_keys_reach_a_third_party_endpoint_only_when_given_for_it(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-planted-openai")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "sk-planted-azure")
    df = rows(1)
    with KeyCapture() as server:
        J.judge_frame(df, J.OpenAIJudge("judge", base_url=server.base_url), metrics=["aligned"])
        J.judge_frame(df, J.api_judge(server.base_url, "judge"), metrics=["coherent"])
        assert server.seen and not any("planted" in h for h in server.seen), server.seen
        monkeypatch.setenv("MY_SERVER_KEY", "sk-for-this-server")
        J.judge_frame(df, J.api_judge(server.base_url, "judge", api_key_env="MY_SERVER_KEY"), metrics=["aligned"],
                      cache=J.JudgeCache(None))
        assert server.seen[-1] == "Bearer sk-for-this-server"
        J.judge_frame(df, J.OpenAIJudge("judge", base_url=server.base_url, api_key="sk-explicit"),
                      metrics=["aligned"])
        assert server.seen[-1] == "Bearer sk-explicit"
    assert sum("planted" in h for h in server.seen) == 0
    # OpenAI's own host (or no base URL) gets the OpenAI key; an unset api_key_env is a clear error
    assert openai_client.key_for_base_url(None) == "sk-planted-openai"
    assert openai_client.key_for_base_url("https://api.openai.com/v1") == "sk-planted-openai"
    assert openai_client.key_for_base_url("https://api.openai.com.evil.example/v1") is None
    monkeypatch.delenv("MY_SERVER_KEY")
    with pytest.raises(openai_client.EndpointConfigError, match="MY_SERVER_KEY"):
        openai_client.key_for_base_url("https://vllm.example/v1", api_key_env="MY_SERVER_KEY")
    azure = openai_client.make_client(provider="azure", azure_endpoint="https://x.openai.azure.com")
    assert azure.api_key == "sk-planted-azure"


def test_datagen_client_sends_no_environment_key_to_a_compatible_server(monkeypatch):
    from emlib.data import llm

    monkeypatch.setenv("OPENAI_API_KEY", "sk-planted-openai")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://llm.example/v1")
    assert llm.make_client().api_key == openai_client.NO_KEY
    monkeypatch.setenv("MY_SERVER_KEY", "sk-mine")
    assert llm.make_client(api_key_env="MY_SERVER_KEY").api_key == "sk-mine"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert llm.make_client().api_key == "sk-planted-openai"  # api.openai.com itself
