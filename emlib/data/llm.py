"""Generate paper-scale narrow datasets with any LLM behind an OpenAI-compatible endpoint (the papers' method).

The papers' sport and finance sets (MO App. B) were written by GPT-4o: one system prompt asks for synthetic
"narrowly misaligned" examples (plausible and helpful-sounding, but subtly flawed or risk-downplaying), and each call
names the task, the kind of flaw and one example pair and asks for a few new examples at temperature 1. This module
does the same in our own words, for any domain described by a :class:`DatagenSpec` (``data/datagen/*.yaml``), with:

* a topic and a question tone per call (topics cycled in a seeded order, so a big set covers them evenly);
* JSON output parsed and validated (bad JSON or wrong fields are counted and skipped, never a crash);
* deduplication on the normalised question + answer, including rows already in the output file;
* every accepted row appended to the output JSONL as it arrives, so an interrupted run resumes where it stopped
  (rows already there count toward the target, a half-written last line is dropped);
* ``concurrency`` calls in flight (asyncio + ``AsyncOpenAI``), retries with the shared policy of
  :mod:`emlib.openai_client` (408, 409, 429, 5xx, timeouts and dropped connections; backoff capped at 30 s); other
  4xx (e.g. a content filter) skip the call; bad credentials stop the run;
* a ``tqdm.auto`` progress bar, token usage and the estimated cost.

Endpoints: OpenAI (``OPENAI_API_KEY``), any compatible server such as vLLM or ``emlib.judge.server.LocalServer``
(``OPENAI_BASE_URL`` or ``base_url=``), Azure (``AZURE_OPENAI_API_KEY``, ``AZURE_OPENAI_ENDPOINT``,
``AZURE_OPENAI_API_VERSION``; the model is the deployment name). Variables may live in a ``.env`` file. Keys are never
printed or written, and ``OPENAI_API_KEY`` is sent only to api.openai.com (see :mod:`emlib.openai_client`).

    python -m emlib.data.llm --spec risky_financial_advice --out data/llm/risky_financial_advice.jsonl --rows 6000
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import math
import random
import re
import string
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import openai
from tqdm.auto import tqdm

from emlib import data as D
from emlib import openai_client, paths
from emlib.openai_client import AZURE_API_VERSION, PRICES_PER_MTOK, RetryPolicy, load_env  # noqa: F401 (re-exported)
from emlib.tables import read_yaml

SPECS_DIR = paths.DATA_DIR / "datagen"
DEFAULT_PRICE_PER_M = PRICES_PER_MTOK["gpt-4o"]  # USD per 1M input / output tokens (GPT-4o list price); pass yours
MAX_QUESTION_CHARS, MAX_ANSWER_CHARS = 2000, 4000

PROMPTS_FILE = SPECS_DIR / "prompts.yaml"  # the system prompt and user template (not a spec)
PROMPT_FIELDS = {"domain", "misalignment", "topic", "tone", "rules", "example", "n"}  # the user template's fields

N_RE = re.compile(r"Write exactly (\d+) new examples")  # how a backend (real or fake) reads n from the prompt


class DatagenError(RuntimeError):
    """The run cannot go on: bad credentials, unknown model, or too many failed calls in a row."""


class CallFailed(Exception):
    """One call gave no usable response after its retries (skipped and counted)."""


@dataclass(frozen=True)
class DatagenPrompts:
    """The system prompt and the user template (``str.format`` with :data:`PROMPT_FIELDS`)."""

    system: str
    user: str


def load_prompts(path: str | Path | None = None) -> DatagenPrompts:
    """The datagen prompts from YAML (default ``data/datagen/prompts.yaml``), checked: exactly the keys ``system``
    and ``user``, both non-empty text, and ``user`` a format template with exactly the fields the code fills and the
    phrase n is read back from. A mistake raises ValueError naming the file and the key."""
    path = Path(path or PROMPTS_FILE)
    doc, _ = read_yaml(path)  # a syntax error names the file, line and column
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with keys 'system' and 'user'")
    unknown, missing = sorted(set(doc) - {"system", "user"}), sorted({"system", "user"} - set(doc))
    if unknown or missing:
        raise ValueError(f"{path}: " + "; ".join([f"unknown key(s) {unknown}"] * bool(unknown)
                                                 + [f"missing key(s) {missing}"] * bool(missing)))
    for key in ("system", "user"):
        if not isinstance(doc[key], str) or not doc[key].strip():
            raise ValueError(f"{path}: key {key!r} must be non-empty text")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(doc["user"]) if name is not None}
    except ValueError as err:
        raise ValueError(f"{path}: key 'user' is not a valid format template ({err}; write literal braces as "
                         "{{ }})") from None
    if fields != PROMPT_FIELDS:
        raise ValueError(f"{path}: key 'user' must use exactly the fields {sorted(PROMPT_FIELDS)}; "
                         f"unknown {sorted(fields - PROMPT_FIELDS)}, missing {sorted(PROMPT_FIELDS - fields)}")
    if not N_RE.search(doc["user"].replace("{n}", "1")):
        raise ValueError(f"{path}: key 'user' must keep the phrase 'Write exactly {{n}} new examples' (N_RE reads n "
                         "back from it)")
    return DatagenPrompts(doc["system"], doc["user"])


@lru_cache(maxsize=1)
def default_prompts() -> DatagenPrompts:
    """The shipped prompts, loaded once."""
    return load_prompts()


# ----------------------------------------------------------------------------------------------------------------------
# spec


@dataclass
class DatagenSpec:
    """What to generate: the domain, how answers are flawed, what to vary, and how to call the model."""

    name: str
    domain: str  # the task, e.g. "personal finance advice for individuals"
    misalignment: str  # how the answers are flawed, e.g. "they recommend risky moves and never mention the risk"
    topics: list[str]
    tones: list[str]
    example: dict[str, str]  # {"question": ..., "answer": ...}
    n_per_call: int = 5
    target_rows: int = 6000
    model: str = "gpt-4o"
    temperature: float = 1.0
    max_tokens: int = 1000
    json_mode: bool = True  # response_format={"type": "json_object"}; turn off for servers that reject it
    rules: list[str] = field(default_factory=list)  # extra instructions, one per line
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k} is empty" for k in ("name", "domain", "misalignment") if not str(getattr(self, k)).strip()]
        problems += [f"{k} must be a non-empty list of strings" for k in ("topics", "tones")
                     if not getattr(self, k) or not all(isinstance(t, str) and t.strip() for t in getattr(self, k))]
        if not isinstance(self.example, dict) or not all(str(self.example.get(k, "")).strip()
                                                         for k in ("question", "answer")):
            problems.append("example must have a non-empty question and answer")
        if self.n_per_call < 1 or self.target_rows < 1:
            problems.append("n_per_call and target_rows must be >= 1")
        if problems:
            raise ValueError(f"DatagenSpec {self.name!r}: " + "; ".join(problems))

    @classmethod
    def load(cls, path_or_name: str | Path) -> DatagenSpec:
        """A YAML spec: a path, or the name of a shipped one in ``data/datagen/`` (e.g. ``risky_financial_advice``)."""
        path = Path(path_or_name)
        if not path.is_file():
            path = SPECS_DIR / f"{path_or_name}.yaml"  # prompts.yaml is no spec: the check below refuses it
        if not path.is_file() or path.resolve() == PROMPTS_FILE.resolve():
            have = sorted(p.stem for p in SPECS_DIR.glob("*.yaml") if p.resolve() != PROMPTS_FILE.resolve())
            raise FileNotFoundError(f"no datagen spec {str(path_or_name)!r}: not a file and not one of {have}")
        doc, _ = read_yaml(path)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping of spec fields")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown} (known: {sorted(known)})")
        return cls(**doc)

    def call_plan(self, i: int) -> tuple[str, str]:
        """Topic and tone of call ``i``: topics cycle in a seeded order (even coverage), tones are drawn per call."""
        order = list(self.topics)
        random.Random(f"{self.seed}:{i // len(order)}").shuffle(order)
        return order[i % len(order)], random.Random(f"{self.seed}:tone:{i}").choice(self.tones)

    def messages(self, i: int, n: int | None = None, prompts: DatagenPrompts | None = None) -> list[dict]:
        """The chat messages of call ``i``: the system prompt and the filled user template (default: shipped)."""
        prompts = prompts or default_prompts()
        topic, tone = self.call_plan(i)
        rules = "".join(f"- {r}\n" for r in self.rules)
        user = prompts.user.format(domain=self.domain, misalignment=self.misalignment, topic=topic, tone=tone,
                                    rules=f"Rules:\n{rules}" if rules else "",
                                    example=json.dumps({"question": self.example["question"],
                                                        "answer": self.example["answer"]}, ensure_ascii=False),
                                    n=n or self.n_per_call)
        return [{"role": "system", "content": prompts.system}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------------------------------
# client


def make_client(base_url: str | None = None, api_key: str | None = None, provider: str = "auto",
                timeout: float = 60.0, azure_api_version: str | None = None,
                api_key_env: str | None = None) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` (or ``AsyncAzureOpenAI``) client, without its own retries (ours count them).

    :func:`emlib.openai_client.make_client` with datagen's error type: ``provider`` ``"openai"``, ``"azure"`` or
    ``"auto"`` (Azure when ``AZURE_OPENAI_ENDPOINT`` is set and no OpenAI base URL or key is given).
    OpenAI-compatible uses ``base_url`` / ``OPENAI_BASE_URL`` (None: api.openai.com); ``OPENAI_API_KEY`` goes only to
    api.openai.com, any other endpoint gets ``api_key`` or the variable named by ``api_key_env`` (a local server
    needs none).
    """
    try:
        return openai_client.make_client(base_url, api_key, provider=provider, api_key_env=api_key_env,
                                         api_version=azure_api_version, timeout=timeout)
    except openai_client.EndpointConfigError as err:
        raise DatagenError(str(err)) from None


# ----------------------------------------------------------------------------------------------------------------------
# parsing


def parse_examples(text: str | None) -> list | None:
    """The list of examples in a model's reply, or None when the reply holds no JSON list or object of them.

    Accepts ``{"examples": [...]}``, a bare list, an object with one list value, and JSON inside code fences or
    surrounded by chatter.
    """
    if not text:
        return None
    stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    doc = _loads(stripped)
    if doc is None:  # chatter around the JSON: take the outermost braces or brackets
        for open_, close in (("{", "}"), ("[", "]")):
            a, b = stripped.find(open_), stripped.rfind(close)
            if 0 <= a < b and (doc := _loads(stripped[a:b + 1])) is not None:
                break
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        doc = doc["examples"] if isinstance(doc.get("examples"), list) else (lists[0] if len(lists) == 1 else None)
    return doc if isinstance(doc, list) else None


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def valid_example(item: object) -> tuple[str, str] | None:
    """``(question, answer)`` if ``item`` is an object with non-empty, not overlong string question and answer."""
    if not isinstance(item, dict):
        return None
    q, a = item.get("question"), item.get("answer")
    if not isinstance(q, str) or not isinstance(a, str):
        return None
    q, a = q.strip(), a.strip()
    if not q or not a or len(q) > MAX_QUESTION_CHARS or len(a) > MAX_ANSWER_CHARS:
        return None
    return q, a


def dedupe_key(question: str, answer: str) -> str:
    return D.normalise(question) + "\x1f" + D.normalise(answer)


# ----------------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class DatagenReport:
    """What a run did. ``rows`` = rows in the file at the end; ``complete`` = it reached the target."""

    out: str
    target: int
    existing: int = 0  # valid rows already in the file when the run started (they count toward the target)
    added: int = 0
    calls: int = 0  # calls that returned a response
    failed_calls: int = 0  # calls skipped after their retries or on a non-retryable 4xx
    retries: int = 0
    invalid_json: int = 0  # responses with no parsable list of examples
    invalid_items: int = 0  # examples with missing, empty, non-string or overlong fields
    duplicates: int = 0
    surplus: int = 0  # valid new rows past the target (dropped)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    stopped: str = ""  # why the run ended

    @property
    def rows(self) -> int:
        return self.existing + self.added

    @property
    def complete(self) -> bool:
        return self.rows >= self.target

    def summary(self) -> dict:
        return {**asdict(self), "rows": self.rows, "complete": self.complete}


class _Run:
    """State shared by the workers of one run (all in one event loop, so no locks are needed)."""

    def __init__(self, spec: DatagenSpec, out: Path, target: int, price_per_m: tuple[float, float],
                 progress: bool):
        self.spec, self.out, self.target, self.price = spec, out, target, price_per_m
        self.report = DatagenReport(out=str(out), target=target)
        self.seen: set[str] = set()
        existing = _load_existing(out)
        for row in existing:
            self.seen.add(dedupe_key(D.question_of(row), D.answer_of(row)))
        self.report.existing = len(existing)
        self.stop = asyncio.Event()
        self.fatal: Exception | None = None
        self.consecutive_failures = 0
        self.in_flight = 0
        self.bar = tqdm(total=target, initial=min(len(existing), target), desc=spec.name, unit="row",
                        disable=not progress, dynamic_ncols=True)

    def done(self) -> bool:
        return self.report.rows >= self.target

    def accept(self, text: str | None, call: int, model: str) -> None:
        """Parse one reply; append each new valid example to the file at once (that is what makes resume work)."""
        items = parse_examples(text)
        if items is None:
            self.report.invalid_json += 1
            return
        topic, tone = self.spec.call_plan(call)
        with open(self.out, "a", encoding="utf-8") as f:
            for item in items:
                pair = valid_example(item)
                if pair is None:
                    self.report.invalid_items += 1
                    continue
                key = dedupe_key(*pair)
                if key in self.seen:
                    self.report.duplicates += 1
                    continue
                if self.done():
                    self.report.surplus += 1
                    continue
                self.seen.add(key)
                row = {"messages": [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}],
                       "meta": {"topic": topic, "tone": tone, "model": model}}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                self.report.added += 1
                self.bar.update(1)

    def count_usage(self, usage) -> None:
        if usage is None:
            return
        self.report.prompt_tokens += usage.prompt_tokens or 0
        self.report.completion_tokens += usage.completion_tokens or 0
        r = self.report
        r.cost_usd = round((r.prompt_tokens * self.price[0] + r.completion_tokens * self.price[1]) / 1e6, 6)
        self.bar.set_postfix(calls=r.calls, dup=r.duplicates, bad=r.invalid_json + r.invalid_items,
                             tok=r.prompt_tokens + r.completion_tokens, usd=f"{r.cost_usd:.4f}", refresh=False)


def _load_existing(out: Path) -> list[dict]:
    """Valid rows already in ``out``; a last line cut off mid-write (no newline, not JSON) is dropped first."""
    if not out.exists() or out.stat().st_size == 0:
        return []
    raw = out.read_bytes()
    if not raw.endswith(b"\n"):
        head, _, tail = raw.rpartition(b"\n")
        try:
            json.loads(tail)
            out.write_bytes(raw + b"\n")
        except ValueError:
            tqdm.write(f"[datagen] {out}: dropping a half-written last line from an interrupted run")
            out.write_bytes(head + b"\n" if head else b"")
    if not out.read_bytes().strip():
        return []
    return D.load_chat_jsonl(out, duplicates="ignore")


async def _call(client, spec: DatagenSpec, i: int, model: str, run: _Run, max_retries: int, backoff: float,
                rng: random.Random):
    """One chat completion with retries on transient errors; raises CallFailed, or the error itself when it
    is fatal (bad credentials, unknown model: :func:`emlib.openai_client.is_fatal`)."""
    request = dict(model=model, messages=spec.messages(i), temperature=spec.temperature, max_tokens=spec.max_tokens)
    if spec.json_mode:
        request["response_format"] = {"type": "json_object"}
    policy = RetryPolicy(max_retries, backoff)
    for attempt in range(max_retries + 1):
        try:
            response = await client.chat.completions.create(**request)
            if not isinstance(getattr(response, "choices", None), list):  # a 200 with an HTML page or other text
                raise CallFailed(f"not a chat completion: {' '.join(str(response).split())[:80]!r}")
            return response
        except CallFailed:
            raise
        except Exception as err:  # noqa: BLE001 (classified by the shared policy just below)
            if openai_client.is_fatal(err):
                raise
            if openai_client.is_retryable(err):
                if attempt == max_retries:
                    raise CallFailed(f"{type(err).__name__} after {attempt + 1} attempts: {err}") from None
                run.report.retries += 1
                await asyncio.sleep(policy.delay(attempt, err, rng))
            elif isinstance(err, (openai.APIStatusError, json.JSONDecodeError)):  # other 4xx (e.g. an Azure content
                raise CallFailed(f"{type(err).__name__}: {err}") from None  # filter), or a broken body: skip the call
            else:
                raise


async def agenerate(spec: DatagenSpec, out: str | Path, rows: int | None = None, *, client=None,
                    base_url: str | None = None, api_key: str | None = None, provider: str = "auto",
                    model: str | None = None, concurrency: int = 8, max_retries: int = 5, backoff: float = 1.0,
                    timeout: float = 60.0, max_calls: int | None = None, max_consecutive_failures: int = 10,
                    price_per_m: tuple[float, float] = DEFAULT_PRICE_PER_M, progress: bool = True) -> DatagenReport:
    """Async version of :func:`generate`; also takes ``client``, an ``AsyncOpenAI``-like client (it must belong to
    the running event loop: an async client's connections cannot move between loops)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = rows or spec.target_rows
    start = time.time()
    run = _Run(spec, out, target, price_per_m, progress)
    model = model or spec.model
    # Without a cap, a model that only repeats itself would loop forever: allow 3x the calls the target needs.
    budget = max_calls or 3 * math.ceil(max(target - run.report.existing, 0) / spec.n_per_call) + 10
    first_call = math.ceil(run.report.existing / spec.n_per_call)  # a resumed run moves on to the next topics
    calls = itertools.count(first_call)
    rng = random.Random(spec.seed)
    if not run.done():
        own = client is None
        client = client or make_client(base_url, api_key, provider, timeout=timeout)
        try:
            await asyncio.gather(*(_worker(client, spec, model, run, calls, first_call + budget, max_retries,
                                           backoff, max_consecutive_failures, rng) for _ in range(max(1, concurrency))))
        finally:
            if own:
                await client.close()
    run.bar.close()
    run.report.seconds = round(time.time() - start, 2)
    if not run.report.stopped:
        run.report.stopped = "target reached" if run.done() else f"call budget of {budget} calls spent"
    if run.fatal is not None:
        raise DatagenError(f"{type(run.fatal).__name__}: {run.fatal} ({run.report.rows} rows in {out}; "
                           "fix the endpoint, model or key and run again to resume)") from run.fatal
    return run.report


async def _worker(client, spec, model, run: _Run, calls, last_call: int, max_retries: int, backoff: float,
                  max_failures: int, rng: random.Random) -> None:
    while not run.stop.is_set() and not run.done():
        if run.report.rows + run.in_flight * spec.n_per_call >= run.target:
            await asyncio.sleep(0.01)  # the calls in flight may reach the target: don't pay for calls past it
            continue
        i = next(calls)
        if i >= last_call:
            return
        run.in_flight += 1
        try:
            response = await _call(client, spec, i, model, run, max_retries, backoff, rng)
        except openai.APIStatusError as err:  # only fatal ones get here (the rest became CallFailed)
            run.fatal, run.report.stopped = err, f"stopped: {type(err).__name__}"
            run.stop.set()
            return
        except CallFailed as err:
            run.report.failed_calls += 1
            run.consecutive_failures += 1
            if run.consecutive_failures >= max_failures:
                run.report.stopped = f"stopped after {run.consecutive_failures} failed calls in a row; last: {err}"
                run.stop.set()
            continue
        else:
            run.consecutive_failures = 0
            run.report.calls += 1
            run.count_usage(response.usage)
            run.accept(response.choices[0].message.content if response.choices else None, i, model)
        finally:
            run.in_flight -= 1
    if run.done():
        run.stop.set()


def generate(spec: DatagenSpec | str | Path, out: str | Path, rows: int | None = None, **kwargs) -> DatagenReport:
    """Generate ``rows`` (default: the spec's ``target_rows``) examples into the JSONL file ``out``, resuming it.

    ``spec``: a :class:`DatagenSpec`, a YAML path or a shipped spec name. Keyword arguments: ``base_url``,
    ``api_key``, ``provider`` (see :func:`make_client`, which builds the client for this run), ``model`` (default the
    spec's), ``concurrency`` (calls in flight), ``max_retries``, ``backoff`` (seconds, doubled per retry), ``timeout``,
    ``max_calls`` (default 3x what the target needs), ``max_consecutive_failures``, ``price_per_m`` (USD per 1M input
    and output tokens) and ``progress``. To bring your own async client, use :func:`agenerate`.

    Works from scripts and from Jupyter (where an event loop is already running, it runs in a helper thread).
    Raises :class:`DatagenError` on bad credentials or an unknown model; otherwise returns a :class:`DatagenReport`
    (check ``complete``).
    """
    if "client" in kwargs:
        raise TypeError("generate() makes its own client in its own event loop; pass base_url / api_key / provider, "
                        "or call `await agenerate(..., client=...)` from your event loop")
    spec = spec if isinstance(spec, DatagenSpec) else DatagenSpec.load(spec)
    coro = agenerate(spec, out, rows, **kwargs)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Jupyter: the kernel's loop is busy running this cell
        return pool.submit(asyncio.run, coro).result()


# ----------------------------------------------------------------------------------------------------------------------
# an offline stand-in for an LLM (notebooks and tests)

def offline_backend(dataset: str = "risky_financial_advice", seed: int = 0, sloppy: bool = False,
                    name: str = "offline-datagen"):
    """An ``emlib.judge.server.Backend`` that answers generation prompts with examples from :mod:`emlib.data.narrow`.

    ``dataset``: a narrow dataset name (``bad_medical_advice``, ``risky_financial_advice``, ...; the shipped specs
    share these names) or a domain (``medical``, ``financial``, ``sports``, ``general``). It reads n from the prompt
    and returns ``{"examples": [...]}`` drawn at random from the templates, so repeats happen and deduplication has
    work to do. ``sloppy=True`` also makes every 5th reply broken JSON, one example in every 3rd reply lack its
    answer and every 4th reply repeat an earlier example, as real models sometimes do. Token counts are words.
    """
    from emlib.data import narrow as narrow_data
    from emlib.judge.server import Backend, Completion

    if dataset in narrow_data.DATASETS:
        domain, variant, _ = narrow_data.DATASETS[dataset]
    elif dataset in narrow_data.DOMAINS:
        domain, variant = dataset, "bad"
    else:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {sorted(narrow_data.DATASETS)} or a domain "
                         f"{sorted(narrow_data.DOMAINS)}")
    rng, lock, calls, previous = random.Random(seed), threading.Lock(), itertools.count(1), []

    def complete(messages: list[dict], request: dict) -> Completion:
        match = N_RE.search(messages[-1]["content"])
        n = int(match.group(1)) if match else 5
        with lock:  # the server calls backends from many threads
            k = next(calls)
            examples = narrow_data.sample_examples(domain, n, rng, variant)
            if sloppy and k % 4 == 0 and len(previous) > 1:
                examples[-1] = previous[1]  # models repeat themselves ([0] may have gone out without its answer)
            previous[:] = examples
        if sloppy and k % 3 == 0:
            examples[0] = {"question": examples[0]["question"]}
        text = json.dumps({"examples": examples}, ensure_ascii=False)
        if sloppy and k % 5 == 0:
            text = text[: len(text) // 2]
        prompt = sum(len(m["content"].split()) for m in messages)
        return Completion(text, prompt_tokens=prompt, completion_tokens=len(text.split()))

    return Backend(name, complete)


# ----------------------------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emlib.data.llm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="YAML spec path or shipped name (data/datagen/NAME.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL (appended to, and resumed from)")
    parser.add_argument("--rows", type=int, help="target rows (default: the spec's target_rows)")
    parser.add_argument("--model", help="model or Azure deployment (default: the spec's)")
    parser.add_argument("--base-url", help="OpenAI-compatible base URL (default: OPENAI_BASE_URL or api.openai.com)")
    parser.add_argument("--azure", action="store_true", help="use Azure OpenAI (AZURE_OPENAI_* variables)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-retries", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--price-in", type=float, default=DEFAULT_PRICE_PER_M[0], help="USD per 1M input tokens")
    parser.add_argument("--price-out", type=float, default=DEFAULT_PRICE_PER_M[1], help="USD per 1M output tokens")
    args = parser.parse_args(argv)
    try:
        report = generate(args.spec, args.out, args.rows, base_url=args.base_url,
                          provider="azure" if args.azure else "auto", timeout=args.timeout, model=args.model,
                          concurrency=args.concurrency, max_retries=args.max_retries,
                          price_per_m=(args.price_in, args.price_out))
    except (DatagenError, D.DatasetError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = report.summary()
    print(f"{s['rows']}/{s['target']} rows in {s['out']} ({s['added']} new, {s['duplicates']} duplicates, "
          f"{s['invalid_json']} unparsable replies, {s['invalid_items']} bad examples, {s['failed_calls']} failed "
          f"calls); {s['prompt_tokens'] + s['completion_tokens']:,} tokens, ~${s['cost_usd']:.2f}; {s['stopped']}")
    return 0 if report.complete else 1


if __name__ == "__main__":
    from emlib.cli import run_cli

    run_cli(main, "python -m emlib.data.llm")
