"""The one home of emlib's OpenAI plumbing, shared by the judge (:mod:`emlib.judge`) and LLM dataset generation
(:mod:`emlib.data.llm`): reading ``.env``, which API key goes to which endpoint, the client factory (OpenAI, Azure
OpenAI, any OpenAI-compatible base URL such as vLLM or :class:`emlib.judge.server.LocalServer`), the retry policy,
a circuit breaker for dead endpoints, list prices and the Azure API version.

**Where keys go.** A key is sent only where it belongs: ``OPENAI_API_KEY`` only to OpenAI's own host
(``api.openai.com``), ``AZURE_OPENAI_API_KEY`` only to the Azure endpoint. Any other base URL gets a key only when
one is given for it explicitly: the ``api_key`` parameter, or ``api_key_env`` naming the environment variable that
holds it (e.g. ``api_key_env="MY_SERVER_KEY"``). Local servers need none. So a key in the environment or ``.env``
can never leak to a third-party or mistyped endpoint.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from emlib import paths

OPENAI_HOST = "api.openai.com"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # endpoints on this machine: no key needed, and they cost nothing
AZURE_API_VERSION = "2024-12-01-preview"  # the version the reference repository's judge used
NO_KEY = "not-needed"  # the openai client insists on some key; key-less endpoints get this placeholder

# USD per million (input, output) tokens, list prices as of 2025; check current pricing and pass your own `prices`.
# The Batch API bills half of these.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-2024-08-06": (2.50, 10.00), "gpt-4o-2024-11-20": (2.50, 10.00), "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60), "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40),
}


class EndpointConfigError(ValueError):
    """The endpoint cannot be set up: no key for OpenAI, no endpoint or key for Azure, an unknown provider."""


# ---------------------------------------------------------------------------------------------------- environment


def load_env() -> None:
    """Read ``.env`` into the environment, never overriding variables that are already set.

    The search rule: the nearest ``.env`` from the working directory upwards (python-dotenv's ``find_dotenv``), then
    the repository root's ``.env``; a variable found in the first wins. Without python-dotenv this does nothing.
    """
    try:
        from dotenv import find_dotenv, load_dotenv
    except ImportError:
        return
    for candidate in (find_dotenv(usecwd=True), paths.REPO_ROOT / ".env"):
        if candidate and Path(candidate).is_file():
            load_dotenv(candidate, override=False)


def host_of(base_url: str | None) -> str:
    """The host a base URL points at (OpenAI's own when there is none)."""
    return (urlparse(base_url).hostname or "") if base_url else OPENAI_HOST


def is_local(base_url: str | None) -> bool:
    """True for an endpoint on this machine (it needs no key and costs nothing)."""
    return host_of(base_url) in LOCAL_HOSTS


def key_for_base_url(base_url: str | None, api_key: str | None = None, api_key_env: str | None = None) -> str | None:
    """The key to send to an OpenAI-compatible ``base_url`` (None: api.openai.com), following the rule above.

    ``api_key`` wins; then ``api_key_env`` (the variable must be set); then, only for OpenAI's own host,
    ``OPENAI_API_KEY``. Any other host gets None (no key).
    """
    if api_key:
        return api_key
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            raise EndpointConfigError(f"api_key_env={api_key_env!r}: that environment variable is not set "
                                      "(environment or .env)")
        return value
    return os.environ.get("OPENAI_API_KEY") if host_of(base_url) == OPENAI_HOST else None


# ---------------------------------------------------------------------------------------------------- the client


def make_client(base_url: str | None = None, api_key: str | None = None, *, provider: str = "auto",
                api_key_env: str | None = None, azure_endpoint: str | None = None, api_version: str | None = None,
                timeout: float = 60.0, sync: bool = False):
    """An ``openai`` client without retries of its own (callers retry with :class:`RetryPolicy` and count them).

    ``provider``: ``"openai"`` (OpenAI or any compatible ``base_url``, default ``OPENAI_BASE_URL``, else
    api.openai.com), ``"azure"`` (``azure_endpoint`` / ``AZURE_OPENAI_ENDPOINT``, ``api_version`` /
    ``AZURE_OPENAI_API_VERSION`` / ``OPENAI_API_VERSION`` / :data:`AZURE_API_VERSION`; the model is the deployment
    name) or ``"auto"`` (Azure when ``azure_endpoint`` is given, or when ``AZURE_OPENAI_ENDPOINT`` is set and no
    OpenAI base URL or key is). Keys follow the module's rule. Async by default (``sync=True``: a blocking client);
    an async client belongs to the event loop it is used in, so make one per loop.
    """
    import openai

    load_env()
    env = os.environ
    if provider not in ("auto", "openai", "azure"):
        raise EndpointConfigError(f"provider must be 'auto', 'openai' or 'azure', not {provider!r}")
    openai_given = base_url or env.get("OPENAI_BASE_URL") or api_key or api_key_env or env.get("OPENAI_API_KEY")
    if provider == "azure" or azure_endpoint or (provider == "auto" and not openai_given
                                                 and env.get("AZURE_OPENAI_ENDPOINT")):
        endpoint = azure_endpoint or env.get("AZURE_OPENAI_ENDPOINT")
        key = api_key or (env.get(api_key_env) if api_key_env else env.get("AZURE_OPENAI_API_KEY"))
        if not endpoint or not key:
            raise EndpointConfigError(f"Azure needs AZURE_OPENAI_ENDPOINT and {api_key_env or 'AZURE_OPENAI_API_KEY'}"
                                      " (environment or .env)")
        version = api_version or env.get("AZURE_OPENAI_API_VERSION") or env.get("OPENAI_API_VERSION")
        cls = openai.AzureOpenAI if sync else openai.AsyncAzureOpenAI
        return cls(azure_endpoint=endpoint, api_key=key, api_version=version or AZURE_API_VERSION, max_retries=0,
                   timeout=timeout)
    base_url = base_url or env.get("OPENAI_BASE_URL") or None
    key = key_for_base_url(base_url, api_key, api_key_env)
    if not key and host_of(base_url) == OPENAI_HOST:
        raise EndpointConfigError("no endpoint: set OPENAI_API_KEY (and OPENAI_BASE_URL for vLLM or another "
                                  "compatible server), or AZURE_OPENAI_API_KEY and AZURE_OPENAI_ENDPOINT, in the "
                                  "environment or .env")
    cls = openai.OpenAI if sync else openai.AsyncOpenAI
    return cls(base_url=base_url, api_key=key or NO_KEY, max_retries=0, timeout=timeout)


# ---------------------------------------------------------------------------------------------------- retries


def is_retryable(err: BaseException) -> bool:
    """Worth retrying: connection drops and time-outs, 408, 409, 429 and 5xx.

    This is the openai SDK's own retry list (its documentation: "connection errors, 408 Request Timeout, 409
    Conflict, 429 Rate Limit, and >=500 Internal errors"); the judge used it, datagen lacked 408/409, which are as
    transient as a 429. Bad requests, auth and unknown models are not retried.
    """
    import openai

    if isinstance(err, (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError,
                        openai.InternalServerError)):
        return True
    return isinstance(err, openai.APIStatusError) and (err.status_code >= 500 or err.status_code in (408, 409))


def is_fatal(err: BaseException) -> bool:
    """Errors no later call can fix: bad credentials, no permission, unknown model or deployment."""
    import openai

    return isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError))


def is_connection_refused(err: BaseException) -> bool:
    """True when nothing listens at the endpoint (the error or one of its causes is ConnectionRefusedError)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, ConnectionRefusedError) or "connection refused" in str(err).lower():
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def backoff_delay(attempt: int, err: BaseException | None = None, base: float = 0.5, cap: float = 30.0,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt``: the server's Retry-After if given, else base * 2^attempt, jittered
    to 50-100%; never more than ``cap``."""
    response = getattr(err, "response", None)
    retry_after = response.headers.get("retry-after") if response is not None else None
    try:
        if retry_after is not None:
            return min(cap, max(0.0, float(retry_after)))
    except ValueError:  # an HTTP date: fall back to exponential
        pass
    return min(cap, base * 2 ** attempt) * (0.5 + (rng or random).random() / 2)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient error (:func:`is_retryable`).

    ``backoff_max`` is 30 s for everyone (datagen used 60 s): a longer wait buys nothing against a rate limit that
    sends Retry-After (honoured up to the cap), and a dead endpoint is what the :class:`CircuitBreaker` is for, so
    capping lower keeps a failing call from holding a run for minutes.
    """

    max_retries: int = 6
    backoff: float = 0.5
    backoff_max: float = 30.0

    def delay(self, attempt: int, err: BaseException | None = None, rng: random.Random | None = None) -> float:
        return backoff_delay(attempt, err, self.backoff, self.backoff_max, rng)


# ---------------------------------------------------------------------------------------------------- circuit breaker


@dataclass
class CircuitBreaker:
    """Stops a run from calling an endpoint that is dead, shared by all calls of one run (one event loop).

    It opens after ``max_refused`` connections refused in a row (nothing listens: no point retrying), or after
    ``max_failures`` failed attempts in a row (time-outs, 5xx, malformed replies) with no success for
    ``dead_after_s`` seconds. Rate limits (429) do not count: the endpoint is alive. Once open, every call stops at
    its next attempt and retry waits end at once (:meth:`sleep`).
    """

    max_refused: int = 3
    max_failures: int = 10
    dead_after_s: float = 20.0
    reason: str | None = None
    failures: int = 0
    refused: int = 0
    _last_success: float = field(default=0.0, repr=False)
    _opened: asyncio.Event | None = field(default=None, repr=False)

    @property
    def is_open(self) -> bool:
        return self.reason is not None

    def _event(self) -> asyncio.Event:
        if self._opened is None:
            self._opened = asyncio.Event()
        return self._opened

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def record_success(self) -> None:
        self.failures = self.refused = 0
        self._last_success = self._now()

    def record_failure(self, err: BaseException) -> None:
        """Count one failed attempt; opens the breaker when the endpoint looks dead."""
        import openai

        if isinstance(err, openai.RateLimitError):
            return
        if not self._last_success:
            self._last_success = self._now()  # the clock starts at the first failure of a run with no success yet
        self.failures += 1
        self.refused = self.refused + 1 if is_connection_refused(err) else 0
        if self.refused >= self.max_refused:
            self.open(f"connection refused {self.refused} times in a row ({type(err).__name__})")
        elif self.failures >= self.max_failures and self._now() - self._last_success >= self.dead_after_s:
            self.open(f"{self.failures} failed attempts in a row and no reply for {self.dead_after_s:.0f} s "
                      f"(last: {type(err).__name__}: {str(err)[:120]})")

    def open(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._event().set()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the breaker opens meanwhile."""
        try:
            await asyncio.wait_for(self._event().wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------------------------------------------- prices


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int,
                  prices: Mapping[str, tuple[float, float]] | None = None) -> float | None:
    """USD for the tokens at the model's per-million prices (None when the model has no known price)."""
    price = (prices or PRICES_PER_MTOK).get(model)
    return None if price is None else (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6

