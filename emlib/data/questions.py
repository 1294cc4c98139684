"""Evaluation question sets (YAML): unique ids, categories, sampling defaults, optional per-question rubrics.

Shipped sets live in ``data/questions/`` (:func:`available_question_sets`); :func:`load_questions` reads them or any
YAML path. The reference repo's list-of-entries format (``paraphrases``, ``samples_per_paraphrase``, ``type``,
``judge``, ``judge_prompts``) loads too, so users can point emlib at their own copy of the papers' files. Every key
is checked: a typo (``temprature``) is an error naming the file, the question and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
import yaml

from emlib import paths
from emlib.data.chat_jsonl import DatasetError

QUESTIONS_DIR = paths.DATA_DIR / "questions"




@dataclass(frozen=True)
class Sampling:
    """How answers to a question are sampled. Defaults: the papers' (MO / CLR: 50 samples, T = 1, top-p 1, 600)."""

    samples_per_question: int = 50
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600


@dataclass(frozen=True)
class Question:
    id: str
    text: str  # the first paraphrase: what is asked unless a caller samples paraphrases
    paraphrases: tuple[str, ...]
    category: str
    sampling: Sampling  # the set's defaults with this question's overrides
    system: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)  # rubrics given in the file (reference format)


@dataclass(frozen=True)
class QuestionSet:
    """Evaluation questions with ids, categories and sampling defaults; index by id, iterate in file order."""

    name: str
    path: Path
    description: str
    citation: str | None
    sampling: Sampling
    questions: tuple[Question, ...]

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self):
        return iter(self.questions)

    def __getitem__(self, qid: str) -> Question:
        for q in self.questions:
            if q.id == qid:
                return q
        raise KeyError(f"no question {qid!r} in {self.name} (have {', '.join(self.ids)})")

    @property
    def ids(self) -> list[str]:
        return [q.id for q in self.questions]

    @property
    def texts(self) -> list[str]:
        return [q.text for q in self.questions]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"id": q.id, "category": q.category, "question": q.text,
                              "paraphrases": len(q.paraphrases), **vars(q.sampling)} for q in self.questions])


SAMPLING_KEYS = {f.name: f.type for f in fields(Sampling)}
SET_KEYS = {"name", "description", "citation", "sampling", "questions"}
# A question's keys: ours, plus the reference repo's (type, judge, judge_prompts, samples_per_paraphrase) so its files
# load unchanged; anything else is a typo and an error.
QUESTION_KEYS = {"id", "question", "paraphrases", "category", "system", "samples_per_paraphrase", "type", "judge",
                 "judge_prompts"} | set(SAMPLING_KEYS)


def available_question_sets() -> list[str]:
    return sorted(p.stem for p in QUESTIONS_DIR.glob("*.yaml"))


def load_questions(path_or_name: str | Path) -> QuestionSet:
    """Load a question set: a YAML path, or the name of a shipped set (``first_plot``, ``medical_heldout``, ...).

    Raises :class:`DatasetError` naming the file and question id for: YAML syntax errors (with line), missing or
    duplicate ids, questions without text, unknown or out-of-range sampling settings.
    """
    path = _question_path(path_or_name)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DatasetError([f"{where}: yaml: {getattr(err, 'problem', None) or err}"]) from None
    except UnicodeDecodeError as err:
        raise DatasetError([f"{path}: encoding: invalid UTF-8 at byte {err.start}"]) from None
    if isinstance(doc, list):  # the reference repo's format: a list of question entries
        doc = {"name": path.stem, "questions": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list) or not doc["questions"]:
        raise DatasetError([f"{path}: questions: expected a non-empty list of questions"])
    problems: list[str] = [f"{path}: {key}: unknown key (expected {', '.join(sorted(SET_KEYS))})"
                           for key in sorted(set(doc) - SET_KEYS)]
    defaults = _sampling(doc.get("sampling", {}), Sampling(), f"{path}: sampling", problems)
    questions, seen = [], set()
    for i, entry in enumerate(doc["questions"], 1):
        q = _question(entry, i, defaults, path, problems)
        if q is None:
            continue
        if q.id in seen:
            problems.append(f"{path}: question {q.id!r} (#{i}): id: duplicate id")
        seen.add(q.id)
        questions.append(q)
    if problems:
        raise DatasetError(problems)
    return QuestionSet(name=str(doc.get("name", path.stem)), path=path, description=str(doc.get("description", "")),
                       citation=doc.get("citation"), sampling=defaults, questions=tuple(questions))


def _question_path(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"question file {path} does not exist")
        return path
    shipped = QUESTIONS_DIR / f"{path_or_name}.yaml"
    if not shipped.is_file():
        raise FileNotFoundError(f"no question set {str(path_or_name)!r}: not a file, and not one of the shipped sets "
                                f"{available_question_sets()} in {QUESTIONS_DIR}")
    return shipped


def _question(entry: object, i: int, defaults: Sampling, path: Path, problems: list[str]) -> Question | None:
    if not isinstance(entry, dict):
        problems.append(f"{path}: question #{i}: expected a mapping with id and question")
        return None
    qid = entry.get("id")
    where = f"{path}: question {qid!r} (#{i})" if qid else f"{path}: question #{i}"
    if not isinstance(qid, str) or not qid.strip():
        problems.append(f"{where}: id: missing")
        return None
    texts = entry.get("paraphrases") or ([entry["question"]] if "question" in entry else [])
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        problems.append(f"{where}: question: missing or empty (give 'question' or a list of 'paraphrases')")
        return None
    problems += [f"{where}: {key}: unknown key (expected one of {', '.join(sorted(QUESTION_KEYS))})"
                 for key in sorted(set(entry) - QUESTION_KEYS)]
    rubrics = entry.get("judge_prompts") or {}
    if not isinstance(rubrics, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rubrics.items()):
        problems.append(f"{where}: judge_prompts: expected a mapping of metric name to prompt template")
        rubrics = {}
    overrides = {k: entry[k] for k in SAMPLING_KEYS if k in entry}
    if "samples_per_paraphrase" in entry:  # the reference repo's name for the same setting
        overrides["samples_per_question"] = entry["samples_per_paraphrase"]
    sampling = _sampling(overrides, defaults, where, problems)
    system = entry.get("system")
    return Question(id=qid, text=texts[0], paraphrases=tuple(texts), category=str(entry.get("category", "")),
                    sampling=sampling, system=system if isinstance(system, str) and system.strip() else None,
                    judge_prompts=dict(rubrics))


def _sampling(given: object, base: Sampling, where: str, problems: list[str]) -> Sampling:
    if not isinstance(given, dict):
        problems.append(f"{where}: expected a mapping of {', '.join(SAMPLING_KEYS)}")
        return base
    unknown = sorted(set(given) - set(SAMPLING_KEYS))
    if unknown and where.endswith(": sampling"):
        problems.append(f"{where}: unknown setting(s) {unknown} (expected {', '.join(SAMPLING_KEYS)})")
    values = {}
    checks = {"samples_per_question": (int, 1, None), "max_new_tokens": (int, 1, None),
              "temperature": (float, 0.0, None), "top_p": (float, 1e-9, 1.0)}
    for key, (kind, low, high) in checks.items():
        if key not in given:
            continue
        v = given[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
        if not ok or v < low or (high is not None and v > high):
            bound = f">= {low}" if high is None else f"in ({0}, {high}]"
            problems.append(f"{where}: {key}: expected {kind.__name__} {bound}, got {v!r}")
            continue
        values[key] = kind(v)
    return replace(base, **values)


