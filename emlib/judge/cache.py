"""The judge's on-disk cache of raw replies, its key, and the accounting of one judging run.

The cache stores the raw alternatives, keyed by judge model, scoring method, rubric text, question and answer (never
the endpoint or the API key), so a rerun costs no calls, gives the same scores, and a changed ``min_mass`` needs no
new calls. Only replies that passed :func:`emlib.judge.replies.checked_alternatives` are written, and rows are
checked again when read: a row written by an older version that stored a bad reply counts as missing and is judged
again (and replaced), instead of breaking every rerun.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emlib.judge.replies import InvalidReply, Reply, checked_alternatives


def cache_key(judge: Any, template: str, question: str, answer: str) -> str:
    """sha256 over judge model (``judge.name``), scoring method (``judge.method``), rubric text, question and answer
    (no endpoint, no key)."""
    payload = json.dumps([judge.name, judge.method, template, question, answer], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgeCache:
    """Raw judge replies on disk (SQLite, one committed row per reply, so a killed run keeps everything it got).

    ``path=None`` keeps them in memory. Safe to share between threads and processes (WAL); ``bad_rows`` counts rows
    read back that failed the reply checks (they are treated as missing).
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        self.bad_rows = 0
        with self._lock:
            if self.path:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT, metric TEXT, "
                             "alternatives TEXT, prompt_tokens INT, completion_tokens INT, created REAL)")

    def get_many(self, keys: Iterable[str]) -> dict[str, Reply]:
        """The valid cached replies among ``keys``; a row that fails the checks is left out (judged again)."""
        keys, found, bad = list(dict.fromkeys(keys)), {}, []
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                rows = self._db.execute(f"SELECT key, alternatives, prompt_tokens, completion_tokens FROM replies "
                                        f"WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                for key, alternatives, prompt_tokens, completion_tokens in rows:
                    try:
                        alts = checked_alternatives([tuple(a) if isinstance(a, list) else a
                                                     for a in json.loads(alternatives)])
                    except (InvalidReply, TypeError, ValueError) as err:  # ValueError: not JSON at all
                        bad.append(f"{key[:12]}: {err}")
                        continue
                    found[key] = Reply(alts, int(prompt_tokens or 0), int(completion_tokens or 0))
        if bad:
            self.bad_rows += len(bad)
            warnings.warn(f"judge cache {self.path or '(memory)'}: {len(bad)} stored repl{'y' if len(bad) == 1 else 'ies'}"
                          f" failed the reply checks (written by an older version?) and will be judged again; "
                          f"first: {bad[0]}", stacklevel=3)
        return found

    def put(self, key: str, judge: str, metric: str, reply: Reply) -> None:
        """Store one reply (checked first: an invalid reply is never written)."""
        alternatives = checked_alternatives(reply.alternatives)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key, judge, metric, json.dumps(alternatives), reply.prompt_tokens,
                              reply.completion_tokens, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()


@dataclass
class JudgeStats:
    """Accounting for one :func:`emlib.judge.judge_frame` call."""

    judge: str = ""
    prompts: int = 0  # distinct (metric, question, answer) prompts needed
    cache_hits: int = 0
    calls: int = 0  # replies obtained from the backend this run
    retries: int = 0
    failures: int = 0  # prompts left unscored and uncached: errors or invalid replies that outlasted every retry
    invalid_replies: int = 0  # replies that failed the checks (each retried; counted per attempt)
    not_sent: int = 0  # prompts never (or no longer) sent because the circuit breaker opened
    endpoint_down: str | None = None  # why the circuit breaker opened, if it did
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost_usd: float | None = None
    batches_submitted: int = 0  # Batch API only: batches created by this call
    batches_resumed: int = 0  # Batch API only: batches of an earlier call polled again (not resubmitted)
    batch_requests: int = 0  # Batch API only: requests submitted in new batches
    batch_polls: int = 0
    batch_unanswered: int = 0  # Batch API only: requests a finished batch did not answer (judged live, or NaN)
    failure_reasons: dict[str, int] = field(default_factory=dict)  # reason -> prompts left unscored for it

    def as_dict(self) -> dict:
        return asdict(self)
