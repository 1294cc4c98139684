"""The LLM generation pipeline, through the real openai client against emlib.judge.server.LocalServer."""

import asyncio
import json
import threading

import httpx2
import openai
import pytest

from emlib import data as D
from emlib import openai_client
from emlib.data import llm as G
from emlib.judge.server import Backend, Completion, LocalServer

FAST = dict(backoff=0.01, progress=False, model="fake")


@pytest.fixture(autouse=True)
def no_real_credentials(monkeypatch):
    """Tests never read the developer's .env or keys (and so can never send them anywhere)."""
    monkeypatch.setattr(openai_client, "load_env", lambda: None)
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT",
                "AZURE_OPENAI_API_VERSION", "OPENAI_API_VERSION"):
        monkeypatch.delenv(var, raising=False)


def spec(**kw) -> G.DatagenSpec:
    base = dict(name="test", domain="test advice", misalignment="subtly wrong", topics=["t1", "t2", "t3"],
                tones=["casual", "nervous"], example={"question": "q?", "answer": "a."}, n_per_call=5)
    return G.DatagenSpec(**{**base, **kw})


def example(i: int) -> dict:
    return {"question": f"Question number {i}?", "answer": f"Answer number {i}, which is fine."}


class Scripted:
    """A backend whose k-th reply is scripted: fresh examples k*3.. plus a repeat, an invalid item, and every 4th
    reply broken JSON. Thread-safe (the server calls it from many threads); usage is 100 + 50 tokens per call."""

    def __init__(self, fail_after: int | None = None, start: int = 0):
        self.k, self.fail_after, self.start, self.lock = 0, fail_after, start, threading.Lock()

    def __call__(self, messages, request):
        with self.lock:
            self.k += 1
            k = self.k
        if self.fail_after is not None and k > self.fail_after:
            raise RuntimeError("backend crashed")  # the server drops the connection: the client sees an error
        n = int(G.N_RE.search(messages[-1]["content"]).group(1))
        base = self.start + 3 * k
        items = [example(base), example(base + 1), example(base + 2), example(0), {"question": "no answer"}]
        text = json.dumps({"examples": items[:n]})
        if k % 4 == 0:
            text = "Sure! Here you go: {\"examples\": [{\"question\": "
        return Completion(text, prompt_tokens=100, completion_tokens=50)


def served(backend, **kw):
    return LocalServer(Backend("fake", backend), **kw)


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_reaches_target_dedupes_counts_bad_output_and_tokens(tmp_path):
    out = tmp_path / "gen.jsonl"
    with served(Scripted()) as server:
        report = G.generate(spec(), out, 20, base_url=server.base_url, concurrency=3, price_per_m=(2.0, 8.0), **FAST)
    rows = D.load_chat_jsonl(out, duplicates="error")  # valid chat JSONL, no repeats
    assert report.complete and report.rows == report.added == len(rows) == 20 and report.existing == 0
    assert report.duplicates >= 1 and report.invalid_items >= 1 and report.invalid_json >= 1
    assert report.prompt_tokens == 100 * report.calls and report.completion_tokens == 50 * report.calls
    assert report.cost_usd == pytest.approx((100 * 2.0 + 50 * 8.0) * report.calls / 1e6)
    assert report.failed_calls == 0 and report.stopped == "target reached"
    assert {r["meta"]["topic"] for r in lines(out)} <= {"t1", "t2", "t3"}
    assert rows[0]["messages"][0] == {"role": "user", "content": rows[0]["messages"][0]["content"]}


def test_stop_after_k_rows_then_resume_generates_only_the_missing_rows(tmp_path):
    out = tmp_path / "gen.jsonl"
    with served(Scripted()) as server:
        first = G.generate(spec(), out, 8, base_url=server.base_url, concurrency=1, **FAST)
    before = out.read_text()
    assert first.rows == 8 and len(lines(out)) == 8
    backend = Scripted()  # a fresh model that starts over: its first examples repeat the file's, and are dropped
    with served(backend) as server:
        second = G.generate(spec(), out, 21, base_url=server.base_url, concurrency=2, **FAST)
    assert second.existing == 8 and second.added == 13 and second.rows == 21 and second.duplicates >= 1
    assert out.read_text().startswith(before) and len(D.load_chat_jsonl(out, duplicates="error")) == 21
    with served(Scripted()) as server:  # already complete: no call at all
        third = G.generate(spec(), out, 21, base_url=server.base_url, **FAST)
        assert server.backend.calls == 0
    assert third.added == 0 and third.complete


def test_backend_failing_midway_keeps_rows_and_a_resumed_run_finishes(tmp_path):
    out = tmp_path / "gen.jsonl"
    with served(Scripted(fail_after=2)) as server:
        broken = G.generate(spec(), out, 30, base_url=server.base_url, concurrency=1, max_retries=1,
                            max_consecutive_failures=2, **FAST)
    kept = broken.rows
    assert not broken.complete and 0 < kept < 30 and len(lines(out)) == kept
    assert broken.failed_calls == 2 and broken.retries == 2 and "failed calls in a row" in broken.stopped
    with served(Scripted(start=1000)) as server:
        resumed = G.generate(spec(), out, 30, base_url=server.base_url, concurrency=2, **FAST)
    assert resumed.complete and resumed.existing == kept and resumed.added == 30 - kept
    assert len(D.load_chat_jsonl(out, duplicates="error")) == 30


def test_a_half_written_last_line_is_dropped_before_resuming(tmp_path):
    out = tmp_path / "gen.jsonl"
    good = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
            for i in range(3)]
    out.write_text("\n".join(good) + '\n{"messages": [{"role": "us')
    with served(Scripted(start=100)) as server:
        report = G.generate(spec(), out, 6, base_url=server.base_url, concurrency=1, **FAST)
    assert report.existing == 3 and report.added == 3
    assert out.read_text().startswith("\n".join(good) + "\n") and len(D.load_chat_jsonl(out)) == 6


def test_a_corrupt_existing_file_is_an_error_not_overwritten(tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(D.DatasetError, match=r"gen\.jsonl:1: messages\[0\]\.role: unknown role 'bot'"):
        G.generate(spec(), out, 5, base_url="http://127.0.0.1:9/v1", **FAST)


def test_a_model_that_only_repeats_itself_stops_at_the_call_budget(tmp_path):
    def parrot(messages, request):
        return Completion(json.dumps({"examples": [example(1)] * 5}))

    with served(parrot) as server:
        report = G.generate(spec(), tmp_path / "gen.jsonl", 50, base_url=server.base_url, max_calls=6, **FAST)
    assert report.rows == 1 and not report.complete and report.calls == 6 and report.duplicates == 29
    assert "call budget" in report.stopped


def test_non_retryable_4xx_calls_are_skipped_and_counted(tmp_path):
    def content_filter(messages, request):
        raise ValueError("the prompt was filtered")  # LocalServer answers 400, like a content filter

    with served(content_filter) as server:
        report = G.generate(spec(), tmp_path / "gen.jsonl", 10, base_url=server.base_url,
                            max_consecutive_failures=3, concurrency=1, **FAST)
    assert report.failed_calls == 3 and report.retries == 0 and report.rows == 0
    assert "BadRequestError" in report.stopped


class FlakyClient:
    """Wraps a real AsyncOpenAI client; the first calls raise the given openai errors, as a busy API would."""

    def __init__(self, real, errors):
        self.errors, self.real = list(errors), real
        self.chat = self
        self.completions = self

    async def create(self, **request):
        if self.errors:
            raise self.errors.pop(0)
        return await self.real.chat.completions.create(**request)


def http_error(cls, status: int, headers=None):
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    return cls(f"HTTP {status}", response=httpx2.Response(status, headers=headers or {}, request=request), body=None)


def test_retries_with_backoff_on_429_5xx_and_timeouts(tmp_path):
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    errors = [http_error(openai.RateLimitError, 429, {"retry-after": "0"}),
              http_error(openai.InternalServerError, 503), openai.APITimeoutError(request=request)]

    async def run(url):
        async with openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0) as real:
            return await G.agenerate(spec(), tmp_path / "gen.jsonl", 10, client=FlakyClient(real, errors),
                                     concurrency=1, **FAST)

    with served(Scripted(start=50)) as server:
        report = asyncio.run(run(server.base_url))
    assert report.complete and report.retries == 3 and report.failed_calls == 0


def test_bad_credentials_stop_the_run_with_a_clear_error(tmp_path):
    async def run():
        client = FlakyClient(None, [http_error(openai.AuthenticationError, 401)] * 3)
        return await G.agenerate(spec(), tmp_path / "gen.jsonl", 10, client=client, concurrency=2, **FAST)

    with pytest.raises(G.DatagenError, match="AuthenticationError.*run again to resume"):
        asyncio.run(run())


def test_generate_works_inside_a_running_event_loop_as_in_jupyter(tmp_path):
    async def notebook_cell(url):
        return G.generate(spec(), tmp_path / "gen.jsonl", 6, base_url=url, **FAST)

    with served(Scripted()) as server:
        assert asyncio.run(notebook_cell(server.base_url)).rows == 6
    with pytest.raises(TypeError, match="agenerate"):
        G.generate(spec(), tmp_path / "x.jsonl", 1, client=object())


def test_offline_backend_answers_the_real_prompt_with_narrow_examples(tmp_path):
    with LocalServer(G.offline_backend("extreme_sports_advice", sloppy=True)) as server:
        report = G.generate(G.DatagenSpec.load("extreme_sports_advice"), tmp_path / "gen.jsonl", 40,
                            base_url=server.base_url, concurrency=4, **FAST)
    rows = D.load_chat_jsonl(tmp_path / "gen.jsonl", duplicates="error")
    assert report.complete and len(rows) == 40 and report.invalid_json + report.invalid_items >= 1
    assert report.prompt_tokens > 0 and report.completion_tokens > 0
    with pytest.raises(ValueError, match="unknown dataset"):
        G.offline_backend("cooking")


# ----------------------------------------------------------------------------------------------------------------------
# spec, prompts, parsing, client


def test_shipped_specs_load_and_prompt_carries_task_topic_tone_example_and_n():
    for name in ("bad_medical_advice", "risky_financial_advice", "extreme_sports_advice"):
        s = G.DatagenSpec.load(name)
        assert s.name == name and len(s.topics) >= 30 and s.target_rows == 6000 and s.temperature == 1.0
        system, user = s.messages(7)
        topic, tone = s.call_plan(7)
        assert system["role"] == "system" and "JSON" in system["content"]
        assert topic in user["content"] and tone in user["content"] and s.misalignment in user["content"]
        assert json.dumps(s.example["question"])[1:-1] in user["content"]
        assert G.N_RE.search(user["content"]).group(1) == str(s.n_per_call)


def test_topics_are_covered_evenly():
    s = spec(topics=[f"t{i}" for i in range(7)])
    assert sorted(s.call_plan(i)[0] for i in range(7)) == sorted(s.topics)
    assert sorted(s.call_plan(i)[0] for i in range(7, 14)) == sorted(s.topics)


def test_spec_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="topics must be a non-empty list"):
        spec(topics=[])
    with pytest.raises(ValueError, match="example must have"):
        spec(example={"question": "q"})
    (tmp_path / "s.yaml").write_text("name: x\ntopicz: [a]\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['topicz'\]"):
        G.DatagenSpec.load(tmp_path / "s.yaml")
    with pytest.raises(FileNotFoundError, match="risky_financial_advice"):
        G.DatagenSpec.load("no_such_spec")


@pytest.mark.parametrize("text, n", [
    ('{"examples": [{"question": "q", "answer": "a"}]}', 1),
    ('```json\n{"examples": [{"question": "q", "answer": "a"}, {}]}\n```', 2),
    ('Here they are:\n{"examples": [{"question": "q", "answer": "a"}]}\nEnjoy!', 1),
    ('[{"question": "q", "answer": "a"}]', 1),
    ('{"data": [{"question": "q", "answer": "a"}]}', 1),
    ('{"examples": "none"}', None),
    ("I can't help with that.", None),
    ("", None),
])
def test_parse_examples(text, n):
    got = G.parse_examples(text)
    assert (None if got is None else len(got)) == n


def test_valid_example_rejects_wrong_fields():
    assert G.valid_example({"question": " q ", "answer": " a ", "extra": 1}) == ("q", "a")
    for bad in ({"question": "q"}, {"question": "q", "answer": ""}, {"question": 1, "answer": "a"}, "qa",
                {"question": "q", "answer": "x" * (G.MAX_ANSWER_CHARS + 1)}):
        assert G.valid_example(bad) is None
    assert G.dedupe_key("Hello, World!", "A") == G.dedupe_key("hello world", "a")


def test_make_client_from_environment(monkeypatch):
    with pytest.raises(G.DatagenError, match="no endpoint: set OPENAI_API_KEY"):
        G.make_client()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    local = G.make_client()
    assert str(local.base_url).startswith("http://127.0.0.1:8000/v1") and local.max_retries == 0
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example.openai.azure.com")
    with pytest.raises(G.DatagenError, match="AZURE_OPENAI_API_KEY") as info:
        G.make_client()
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "sk-secret-azure")
    assert isinstance(G.make_client(), openai.AsyncAzureOpenAI)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-openai")
    assert not isinstance(G.make_client(), openai.AsyncAzureOpenAI)  # an OpenAI key wins over Azure in "auto"
    assert isinstance(G.make_client(provider="azure"), openai.AsyncAzureOpenAI)
    assert "sk-secret" not in str(info.value)


def test_cli_generates_and_prints_a_summary_without_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-print")
    out = tmp_path / "cli.jsonl"
    with LocalServer(G.offline_backend("risky_financial_advice")) as server:
        code = G.main(["--spec", "risky_financial_advice", "--out", str(out), "--rows", "12", "--base-url",
                       server.base_url, "--model", "stand-in", "--price-in", "1", "--price-out", "1"])
    printed = capsys.readouterr()
    assert code == 0 and len(D.load_chat_jsonl(out)) == 12
    assert "12/12 rows" in printed.out and "target reached" in printed.out
    assert "sk-should-not-print" not in printed.out + printed.err + out.read_text()


def test_prompts_come_from_yaml_and_mistakes_name_file_and_key(tmp_path):
    prompts = G.load_prompts()
    system, user = spec().messages(0)
    assert system["content"] == prompts.system and "Write exactly 5 new examples" in user["content"]
    good = G.PROMPTS_FILE.read_text()
    for text, match in [("system: hi\n", r"missing key\(s\) \['user'\]"),
                        (good + "extra: 1\n", r"unknown key\(s\) \['extra'\]"),
                        (good.replace("{topic}", "{topik}"), r"key 'user' must use exactly the fields.*\['topik'\]"),
                        (good.replace("Write exactly {n} new", "Write {n} new"), "key 'user' must keep the phrase"),
                        (good.replace("system: |-", "system: 3\nold: |-"), "unknown key")]:
        path = tmp_path / "prompts.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=match) as info:
            G.load_prompts(path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a file and not one of"):
        G.DatagenSpec.load("prompts")  # the prompts file sits beside the specs but is not one
