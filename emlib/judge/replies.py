"""What a judge backend returns for one prompt, and the checks every reply passes before it is scored or cached.

A reply is the judge's top first-token alternatives as (token, logprob) pairs plus token usage. Endpoints break in
many ways (an HTML error page with status 200, truncated JSON, an empty ``choices``, a logprob that is a string,
null, positive or NaN), so a reply is checked where it is parsed: :func:`reply_from_completion` turns any of these
into :class:`InvalidReply` with the reason, which the caller retries and finally reports, and never stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Alternatives = list[tuple[str, float]]  # (token or number string, logprob), best first


class InvalidReply(ValueError):
    """A judge reply that cannot be scored (malformed body, no choices, a logprob that is not a number <= 0)."""


class RetriesExhausted(RuntimeError):
    """A transient error or invalid reply outlasted every retry; the row stays unscored and uncached."""


class EndpointDown(RuntimeError):
    """The run's circuit breaker is open: the endpoint looks dead, so this prompt was not (or no longer) sent."""


@dataclass
class Reply:
    """What a judge backend returns for one prompt: the top alternatives for the score, and token usage."""

    alternatives: Alternatives
    prompt_tokens: int = 0
    completion_tokens: int = 0


def checked_logprob(token: object, value: object) -> float:
    """``value`` as a log-probability: a finite number <= 0 (a rounding hair above 0 reads as 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidReply(f"token {token!r}: logprob {value!r} is not a number")
    x = float(value)
    if not math.isfinite(x) or x > 1e-6:
        raise InvalidReply(f"token {token!r}: logprob {value!r} is not a finite number <= 0")
    return min(x, 0.0)


def checked_alternatives(pairs: Any) -> Alternatives:
    """A non-empty list of (str, logprob) pairs, each checked; raises :class:`InvalidReply` otherwise."""
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise InvalidReply(f"no alternatives ({type(pairs).__name__})")
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise InvalidReply(f"alternative {pair!r} is not a (token, logprob) pair")
        out.append((pair[0], checked_logprob(pair[0], pair[1])))
    return out


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` for the openai client's objects, ``obj[name]`` for plain JSON (Batch API output)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def reply_from_completion(response: Any) -> Reply:
    """Top alternatives of the first output token (or the text itself, for endpoints without logprobs), checked.

    ``response`` is an openai ``ChatCompletion`` or the same as plain JSON. Raises :class:`InvalidReply` naming
    what is wrong: not a chat completion (e.g. an HTML page), no choices, or a bad token or logprob.
    """
    if isinstance(response, (str, bytes)):
        text = response.decode(errors="replace") if isinstance(response, bytes) else response
        raise InvalidReply(f"not a chat completion but text: {' '.join(text.split())[:80]!r}")
    choices = _field(response, "choices")
    if not isinstance(choices, list):
        raise InvalidReply(f"not a chat completion (no 'choices' list, got {type(response).__name__})")
    if not choices:
        raise InvalidReply("empty 'choices'")
    choice = choices[0]
    logprobs = _field(choice, "logprobs")
    content = _field(logprobs, "content") if logprobs is not None else None
    if content:
        first = content[0]
        tops = _field(first, "top_logprobs") or []
        pairs = ([(_field(t, "token"), _field(t, "logprob")) for t in tops]
                 or [(_field(first, "token"), _field(first, "logprob"))])
    else:
        text = _field(_field(choice, "message"), "content")
        if text is not None and not isinstance(text, str):
            raise InvalidReply(f"message content is {type(text).__name__}, not text")
        pairs = [((text or "").strip(), 0.0)]
    alternatives = checked_alternatives(pairs)
    usage = _field(response, "usage")
    usage_of = (lambda name: _count(_field(usage, name))) if usage is not None else (lambda name: 0)
    return Reply(alternatives, usage_of("prompt_tokens"), usage_of("completion_tokens"))
