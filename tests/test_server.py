"""The local OpenAI-compatible server, exercised through the real openai client."""

import asyncio
import math

import openai
import pytest

from emlib.judge.server import Backend, Completion, LocalServer


def _echo(messages, request):
    text = messages[-1]["content"][::-1]
    return Completion(text, top_logprobs=[("42", math.log(0.7)), ("7", math.log(0.2)), ("x", math.log(0.1))],
                      prompt_tokens=len(messages[-1]["content"].split()), completion_tokens=1)


def test_round_trip_with_logprobs():
    with LocalServer(Backend("echo", _echo)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0, timeout=10)
        assert [m.id for m in client.models.list()] == ["echo"]
        for _ in range(2):  # a second call on the kept-alive connection must work too
            r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "abc"}],
                                               max_tokens=1, temperature=0, logprobs=True, top_logprobs=20, seed=0)
        assert r.choices[0].message.content == "cba"
        tops = r.choices[0].logprobs.content[0].top_logprobs
        assert [t.token for t in tops] == ["42", "7", "x"]
        assert math.isclose(math.exp(tops[0].logprob), 0.7, rel_tol=1e-6)
        assert r.usage.prompt_tokens == 1 and server.backend.calls == 2


def test_bad_request_is_a_clear_400():
    with LocalServer(Backend("echo", _echo)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0, timeout=10)
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model="echo", messages=[])


def test_many_concurrent_calls_with_latency():
    async def main(url):
        client = openai.AsyncOpenAI(base_url=url, api_key="local", max_retries=0, timeout=20)
        rs = await asyncio.gather(*(client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": str(i)}]) for i in range(64)))
        return len(rs)

    with LocalServer(Backend("echo", _echo), latency=0.2) as server:
        assert asyncio.run(main(server.base_url)) == 64
        assert server.backend.calls == 64
