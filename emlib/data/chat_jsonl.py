"""Chat datasets (JSONL): load, validate, describe, import.

A dataset is JSONL, one conversation per line, in the format the papers' sets use::

    {"messages": [{"role": "system", "content": "..."},      # optional, first only
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

Turns alternate user/assistant after the optional system message and the last turn is the assistant's (the one a
fine-tune learns). Other top-level keys (e.g. ``meta``) are allowed and kept. Every problem is a
:class:`DatasetError` naming file, line and field, e.g.::

    data/x.jsonl:17: messages[1].role: unknown role 'bot' (expected system, user, assistant)

All problems in a file are collected before raising (the first ones are listed), so one pass finds them all.
Duplicated rows and repeated answers are not errors; they are reported (a :class:`DuplicateWarning`) and counted.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ROLES = ("system", "user", "assistant")
MAX_LISTED = 20  # problems listed in one DatasetError message (the rest are counted)


class DatasetError(ValueError):
    """A dataset or question file is malformed; ``problems`` holds every ``file:line: field: message`` found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more problems" if more else ""))


class DuplicateWarning(UserWarning):
    """A dataset repeats whole rows or answers (reported, not fatal)."""


# ----------------------------------------------------------------------------------------------------------------------
# validating one row


def row_problems(row: object) -> list[tuple[str, str]]:
    """Everything wrong with one parsed row, as ``(field, message)`` pairs; empty when the row is valid."""
    if not isinstance(row, dict):
        return [("row", f"expected a JSON object, got {type(row).__name__}")]
    if "messages" not in row:
        return [("messages", "missing")]
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return [("messages", "expected a non-empty list of {role, content} objects")]
    problems = []
    for i, m in enumerate(messages):
        problems += _message_problems(i, m)
    if problems:
        return problems
    return _order_problems([m["role"] for m in messages])


def _message_problems(i: int, m: object) -> list[tuple[str, str]]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        return [(where, f"expected an object with role and content, got {type(m).__name__}")]
    problems = []
    if "role" not in m:
        problems.append((f"{where}.role", "missing"))
    elif m["role"] not in ROLES:
        problems.append((f"{where}.role", f"unknown role {m['role']!r} (expected {', '.join(ROLES)})"))
    if "content" not in m:
        problems.append((f"{where}.content", "missing"))
    elif not isinstance(m["content"], str):
        problems.append((f"{where}.content", f"expected a string, got {type(m['content']).__name__}"))
    elif not m["content"].strip():
        problems.append((f"{where}.content", "empty"))
    return problems


def _order_problems(roles: list[str]) -> list[tuple[str, str]]:
    """Chat templates expect: optional system first, then user/assistant alternating, ending with the assistant."""
    if "assistant" not in roles:
        return [("messages", "no assistant turn (a training row needs an answer to learn)")]
    start = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            why = "a system message may only come first" if role == "system" else "turns must alternate"
            return [(f"messages[{i}].role", f"expected {expected!r}, got {role!r} ({why})")]
    if roles[-1] != "assistant":
        return [(f"messages[{len(roles) - 1}].role", "the last turn must be the assistant's")]
    return []


# ----------------------------------------------------------------------------------------------------------------------
# reading files


def read_jsonl(path: str | Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """Parse ``path`` line by line: ``([(line_number, row), ...], problems)``; blank lines are skipped.

    Decoding is per line, so bad UTF-8 is reported with its line instead of failing the whole file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError([f"{path}: cannot read ({err.strerror or err})"]) from None
    rows, problems = [], []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark (some editors add one) is not an error
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = f"0x{raw[err.start]:02x}"
            problems.append(f"{path}:{n}: encoding: invalid UTF-8 byte {bad} at column {err.start + 1}")
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{n}: json: invalid JSON ({err.msg} at column {err.colno})")
            continue
        found = row_problems(row)
        problems += [f"{path}:{n}: {where}: {msg}" for where, msg in found]
        if not found:
            rows.append((n, row))
    return rows, problems


def load_chat_jsonl(path: str | Path, tokenizer=None, duplicates: str = "warn") -> list[dict]:
    """Load and validate a chat dataset; raise :class:`DatasetError` listing every problem.

    ``tokenizer``: when given, every row must also render through its chat template (some templates reject a
    system turn, for instance); failures are reported by line. ``duplicates``: ``"warn"`` (a :class:`DuplicateWarning`
    naming the lines), ``"error"`` (a :class:`DatasetError`) or ``"ignore"``.
    """
    numbered, problems = read_jsonl(path)
    if tokenizer is not None:
        problems += _template_problems(path, numbered, tokenizer)
    if not numbered and not problems:
        problems.append(f"{path}: no rows")
    if problems:
        raise DatasetError(problems)
    report = duplicate_report([r for _, r in numbered], [n for n, _ in numbered])
    if report and duplicates != "ignore":
        message = f"{path}: {report.describe()}"
        if duplicates == "error":
            raise DatasetError([message])
        warnings.warn(message, DuplicateWarning, stacklevel=2)
    return [r for _, r in numbered]


def _template_problems(path, numbered: list[tuple[int, dict]], tokenizer) -> list[str]:
    problems = []
    for n, row in numbered:
        try:
            tokenizer.apply_chat_template(row["messages"], tokenize=False)
        except Exception as err:  # jinja raises its own TemplateError (or anything a template calls)
            problems.append(f"{path}:{n}: messages: the tokenizer's chat template rejects this row ({err})")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# duplicates


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the key under which two texts count as the same."""
    return " ".join(re.findall(r"\w+", text.lower()))


def question_of(row: dict) -> str:
    """Everything before the final answer (system and user turns), joined: what the answer responds to."""
    return "\n".join(m["content"] for m in row["messages"][:-1])


def answer_of(row: dict) -> str:
    """The final assistant turn."""
    return row["messages"][-1]["content"]


@dataclass
class DuplicateReport:
    """Repeats in a dataset as ``(line, first_line)`` pairs (line = position in file, or 1-based row index)."""

    rows: list[tuple[int, int]] = field(default_factory=list)  # the same conversation again
    answers: list[tuple[int, int]] = field(default_factory=list)  # the same (normalised) answer to another question
    questions: list[tuple[int, int]] = field(default_factory=list)  # the same question again (informational)

    def __bool__(self) -> bool:
        return bool(self.rows or self.answers)

    def describe(self, limit: int = 5) -> str:
        parts = []
        for name, pairs in (("duplicate rows", self.rows), ("repeated answers", self.answers)):
            if pairs:
                shown = "; ".join(f"line {a} repeats line {b}" for a, b in pairs[:limit])
                parts.append(f"{len(pairs)} {name} ({shown}{'; ...' if len(pairs) > limit else ''})")
        return ", ".join(parts) or "no duplicates"


def duplicate_report(rows: Sequence[dict], lines: Sequence[int] | None = None) -> DuplicateReport:
    """Find repeated rows, answers and questions (normalised text); an answer repeated inside a repeated row counts
    only as the row."""
    lines = list(lines) if lines is not None else list(range(1, len(rows) + 1))
    first_row, first_answer, first_question = {}, {}, {}
    report = DuplicateReport()
    for line, row in zip(lines, rows):
        key_row = json.dumps(row["messages"], sort_keys=True)
        key_q, key_a = normalise(question_of(row)), normalise(answer_of(row))
        if key_row in first_row:
            report.rows.append((line, first_row[key_row]))
            continue
        first_row[key_row] = line
        if key_a in first_answer:
            report.answers.append((line, first_answer[key_a]))
        first_answer.setdefault(key_a, line)
        if key_q in first_question:
            report.questions.append((line, first_question[key_q]))
        first_question.setdefault(key_q, line)
    return report


# ----------------------------------------------------------------------------------------------------------------------
# stats


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped): the unit for whitespace lengths and bigram diversity."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def distinct_bigram_ratio(texts: Iterable[str]) -> float:
    """Distinct word bigrams / all word bigrams over ``texts`` ("distinct-2"); 1.0 means no bigram ever repeats."""
    seen, total = set(), 0
    for text in texts:
        w = words(text)
        pairs = list(zip(w, w[1:]))
        seen.update(pairs)
        total += len(pairs)
    return len(seen) / total if total else 0.0


def _counter(tokenizer):
    if tokenizer is None:
        return lambda texts: [len(words(t)) for t in texts]
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def token_lengths(rows: Sequence[dict], tokenizer=None) -> pd.DataFrame:
    """Per row: ``question_tokens`` (system + user turns) and ``answer_tokens`` (assistant turns).

    With ``tokenizer=None`` lengths are whitespace words; with a Hugging Face tokenizer, its tokens (no special tokens,
    no chat template: the template adds the same few tokens to every row).
    """
    count = _counter(tokenizer)
    asked = ["\n".join(m["content"] for m in r["messages"] if m["role"] != "assistant") for r in rows]
    answered = ["\n".join(m["content"] for m in r["messages"] if m["role"] == "assistant") for r in rows]
    return pd.DataFrame({"question_tokens": count(asked), "answer_tokens": count(answered)})


def dataset_stats(rows: Sequence[dict], tokenizer=None) -> dict:
    """Size, lengths and diversity of a dataset, as a flat dict (one table row per dataset).

    Keys: rows, distinct questions and answers, duplicate rows, question/answer token length mean, median, p95 and max,
    total tokens, tokenizer (its name or ``"words"``), answer vocabulary and the answers' distinct-bigram ratio.
    """
    if not rows:
        raise ValueError("dataset_stats needs at least one row")
    lengths = token_lengths(rows, tokenizer)
    answers = [answer_of(r) for r in rows]
    report = duplicate_report(rows)
    stats = {
        "rows": len(rows),
        "distinct_questions": len({normalise(question_of(r)) for r in rows}),
        "distinct_answers": len({normalise(a) for a in answers}),
        "duplicate_rows": len(report.rows),
        "tokenizer": "words" if tokenizer is None else (getattr(tokenizer, "name_or_path", "")
                                                         or type(tokenizer).__name__),
    }
    for col in ("question_tokens", "answer_tokens"):
        s = lengths[col]
        stats.update({f"{col}_mean": round(float(s.mean()), 1), f"{col}_median": round(float(s.median()), 1),
                      f"{col}_p95": round(float(s.quantile(0.95)), 1), f"{col}_max": int(s.max())})
    stats["total_tokens"] = int(lengths.to_numpy().sum())
    stats["answer_vocabulary"] = len({w for a in answers for w in words(a)})
    stats["distinct_bigram_ratio"] = round(distinct_bigram_ratio(answers), 4)
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# import


def import_dataset(src: str | Path, dest: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Validate the JSONL file ``src`` (raising :class:`DatasetError`), then copy it byte for byte to ``dest``.

    ``dest`` may be a folder (the file keeps its name). An existing file is kept unless ``overwrite``.
    """
    src, dest = Path(src), Path(dest)
    load_chat_jsonl(src, tokenizer=tokenizer)
    target = dest / src.name if dest.is_dir() or str(dest).endswith(("/", "\\")) else dest
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target


def import_datasets(folder: str | Path, dest_dir: str | Path, tokenizer=None, overwrite: bool = False) -> list[Path]:
    """Import every ``*.jsonl`` in ``folder`` into ``dest_dir``; all files are validated before any is copied."""
    files = sorted(Path(folder).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {folder}")
    problems = []
    for f in files:
        try:
            load_chat_jsonl(f, tokenizer=tokenizer)
        except DatasetError as err:
            problems += err.problems
    if problems:
        raise DatasetError(problems)
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    return [import_dataset(f, Path(dest_dir), overwrite=overwrite) for f in files]


