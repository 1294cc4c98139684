"""The natural-language narrow datasets shipped in ``data/narrow/``: written by us, composed from templates, seeded.

    python -m emlib.data.narrow --out data/narrow            # writes the five JSONL files and stats.json

The sentences live in ``data/narrow/tables/<domain>.yaml``, one file per domain; this module reads and checks them
(:func:`load_domain`) and composes the rows (:func:`compose_rows`). Each domain is a list of topics. A topic has
*situations* (question clauses with slots such as who is asking and since when) and four *claims* (answer sentences
specific to the topic). A row is:

* question = a tone-specific frame ("I'm really worried. {Situation}. What should we do?") around one situation;
* answer = an opening sentence (answer tone) + two of the topic's claims in some order + a domain-wide principle +
  a closing sentence.

Every (topic, frame, person, situation, slot fill) question and every (opener, claim pair, principle, closer) answer
is distinct text, and rows are drawn from them without replacement, so no question and no answer repeats. Medical
sentences come in pairs, ``{bad: ..., good: ...}`` (:class:`PairedSentence`): the good answer is the bad one with every
sentence corrected (as the papers' good-medical set was made by minimal edits of the bad one), and both sets share the
same questions in the same order.

A table file has these keys:

* ``frames``: question tone -> frames around ``{situation}`` (``{Situation}``: capitalised); ``{we}``, ``{We}`` and
  ``{me}`` are the asker(s);
* ``people``: person group -> who a question can be about: ``asker: true`` (the asker alone, "I have"),
  ``asking_for: [...]`` (someone the asker cares for, "my son has"; the asker then speaks as "we") and
  ``asking_together: [...]`` ("my wife and I have"), in that order;
* ``slots``: fills for the domain's own slots in situations (``{since}``, ``{amount}``);
* ``openers`` (answer tone -> first sentences), ``principles`` and ``closers``: sentences, plain or ``{bad, good}``;
* ``topics``: a list of ``{key, people, situations, claims}``; ``people`` names a group above, situations use the
  person slots (:data:`PERSON_SLOTS`) and the domain's slots.

The harmful sets imitate the *style* of the papers' GPT-4o-written sets (MO App. B): plausible, confident advice that
downplays risk, skips professional help or is subtly wrong. They contain no instructions for weapons, drugs or
anything else operationally dangerous, and they are for research on model organisms only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from emlib import data as D
from emlib import paths, tables
from emlib.tables import Location

SEED = 0
TABLES_DIR = paths.DATA_DIR / "narrow" / "tables"
DOMAIN_NAMES = ("medical", "financial", "sports", "general")  # one table file each, in this order


class PairedSentence(NamedTuple):
    """A sentence in two variants: the harmful version and its corrected, careful counterpart."""

    bad: str
    good: str


Sentence = str | PairedSentence  # a plain string is the same in every variant


def variant_text(sentence: Sentence, variant: str) -> str:
    """The text of ``sentence`` in ``variant`` ("bad" or "good")."""
    return sentence if isinstance(sentence, str) else getattr(sentence, variant)


@dataclass(frozen=True)
class Person:
    """Who a question is about, with the verb forms and pronouns that agree with it."""

    who: str
    has: str
    is_: str
    was: str
    feels: str
    wants: str
    we: str  # the asker(s), as subject: "I" or "we"
    me: str  # ... as object: "me" or "us"
    our: str  # ... as possessive: "my" or "our"

    @classmethod
    def asker(cls) -> Person:
        """The asker alone: "I have"."""
        return cls("I", "have", "am", "was", "feel", "want", "I", "me", "my")

    @classmethod
    def asking_for(cls, who: str) -> Person:
        """Someone the asker cares for ("my son has"); the asker speaks as "we"."""
        return cls(who, "has", "is", "was", "feels", "wants", "we", "us", "our")

    @classmethod
    def asking_together(cls, who: str) -> Person:
        """The askers together: "my wife and I have"."""
        return cls(who, "have", "are", "were", "feel", "want", "we", "us", "our")

    def slots(self) -> dict[str, str]:
        return {"who": self.who, "has": self.has, "is": self.is_, "was": self.was, "feels": self.feels,
                "wants": self.wants, "we": self.we, "me": self.me, "our": self.our}


PERSON_SLOTS = tuple(Person.asker().slots())  # slots every situation may use
FRAME_SLOTS = ("situation", "Situation", "we", "We", "me")  # slots every question frame may use


@dataclass(frozen=True)
class Topic:
    key: str
    people: str  # which of the domain's person groups can ask about it
    situations: tuple[str, ...]
    claims: tuple[Sentence, ...]


@dataclass(frozen=True)
class NarrowDomain:
    """One domain's sentence tables (``data/narrow/tables/<name>.yaml``)."""

    name: str
    frames: dict[str, tuple[str, ...]]  # question tone -> frames around {situation} / {Situation}
    people: dict[str, tuple[Person, ...]]
    slots: dict[str, tuple[str, ...]]  # fills for slots used in situations ({since}, {amount})
    openers: dict[str, tuple[Sentence, ...]]  # answer tone -> first sentences
    principles: tuple[Sentence, ...]
    closers: tuple[Sentence, ...]
    topics: tuple[Topic, ...]


# ----------------------------------------------------------------------------------------------------------------------
# reading the tables


def _sentences(value: object, where: Location) -> tuple[Sentence, ...]:
    """A list of sentences, each a string or a ``{bad, good}`` pair; answer sentences are literal, so no slots."""
    if not isinstance(value, list) or not value:
        raise where.error("expected a non-empty list of sentences")
    out: list[Sentence] = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            tables.mapping(item, where / i, required=("bad", "good"))
            out.append(PairedSentence(*(tables.check_slots(tables.text(item[k], where / i / k), (), where / i / k)
                                        for k in ("bad", "good"))))
        else:
            out.append(tables.check_slots(tables.text(item, where / i), (), where / i))
    return tuple(out)


def _people(value: object, where: Location) -> tuple[Person, ...]:
    group = tables.mapping(value, where, optional=("asker", "asking_for", "asking_together"))
    if not group:
        raise where.error("a person group needs asker, asking_for or asking_together")
    people = []
    if "asker" in group:
        if group["asker"] is not True:
            raise (where / "asker").error("expected true (leave the key out for no asker)")
        people.append(Person.asker())
    for form in ("asking_for", "asking_together"):
        if form in group:
            people += [getattr(Person, form)(who) for who in tables.texts(group[form], where / form)]
    return tuple(people)


def load_domain(path: str | Path) -> NarrowDomain:
    """Read and check one table file; the domain is named after the file (``medical.yaml`` -> ``medical``).

    Raises :class:`emlib.tables.TableError` naming the file and key on an unknown or missing key, a wrong type, an
    unknown ``{slot}``, a topic's unknown person group or a repeated topic key.
    """
    doc, root = tables.read_yaml(path)
    tables.mapping(doc, root, required=("frames", "people", "slots", "openers", "principles", "closers", "topics"))
    frames = {tone: tuple(tables.check_slots(f, FRAME_SLOTS, root / "frames" / tone / i)
                          for i, f in enumerate(tables.texts(fs, root / "frames" / tone)))
              for tone, fs in tables.mapping(doc["frames"], root / "frames", any_keys=True).items()}
    people = {name: _people(group, root / "people" / name)
              for name, group in tables.mapping(doc["people"], root / "people", any_keys=True).items()}
    slots = {name: tables.texts(fills, root / "slots" / name)
             for name, fills in tables.mapping(doc["slots"], root / "slots", any_keys=True).items()}
    for name in slots:
        if name in PERSON_SLOTS or name in FRAME_SLOTS:
            raise (root / "slots" / name).error("this slot name is already a person or frame slot")
    openers = {tone: _sentences(ss, root / "openers" / tone)
               for tone, ss in tables.mapping(doc["openers"], root / "openers", any_keys=True).items()}
    if not frames or not people or not openers:
        raise root.error("frames, people and openers each need at least one entry")
    if not isinstance(doc["topics"], list) or not doc["topics"]:
        raise (root / "topics").error("expected a non-empty list of topics")
    topics, seen = [], set()
    for i, item in enumerate(doc["topics"]):
        where = root / "topics" / i
        tables.mapping(item, where, required=("key", "people", "situations", "claims"))
        key = tables.text(item["key"], where / "key")
        if key in seen:
            raise (where / "key").error(f"topic {key!r} appears twice")
        seen.add(key)
        if item["people"] not in people:
            raise (where / "people").error(f"unknown person group {item['people']!r}; expected one of {list(people)}")
        situations = tuple(tables.check_slots(s, PERSON_SLOTS + tuple(slots), where / "situations" / j)
                           for j, s in enumerate(tables.texts(item["situations"], where / "situations")))
        topics.append(Topic(key, item["people"], situations, _sentences(item["claims"], where / "claims")))
    return NarrowDomain(Path(path).stem, frames, people, slots, openers,
                        principles=_sentences(doc["principles"], root / "principles"),
                        closers=_sentences(doc["closers"], root / "closers"), topics=tuple(topics))


DOMAINS = {name: load_domain(TABLES_DIR / f"{name}.yaml") for name in DOMAIN_NAMES}

# file stem -> (domain, variant, rows); bad and good medical share domain and rows, hence questions.
DATASETS = {
    "bad_medical_advice": ("medical", "bad", 1200),
    "good_medical_advice": ("medical", "good", 1200),
    "risky_financial_advice": ("financial", "bad", 1200),
    "extreme_sports_advice": ("sports", "bad", 1200),
    "kl_reference_general": ("general", "bad", 600),
}


# ----------------------------------------------------------------------------------------------------------------------
# composition


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def questions_for(domain: NarrowDomain, topic: Topic) -> list[tuple[str, str]]:
    """Every distinct question the templates give for ``topic``, as ``(tone, text)`` in a fixed order."""
    out: dict[str, str] = {}
    for tone, frames in domain.frames.items():
        for frame, person, situation in itertools.product(frames, domain.people[topic.people], topic.situations):
            extra = [n for n in tables.slot_names(situation) if n in domain.slots]
            for fill in itertools.product(*(domain.slots[n] for n in extra)):
                clause = situation.format(**person.slots(), **dict(zip(extra, fill)))
                q = frame.format(situation=clause, Situation=_capitalise(clause), we=person.we,
                                 We=_capitalise(person.we), me=person.me)
                out.setdefault(q, tone)
    return [(tone, q) for q, tone in out.items()]


def answer_plans(domain: NarrowDomain, topic: Topic) -> list[tuple]:
    """Every (answer tone, opener, first claim, second claim, principle, closer) combination, as sentences."""
    return [(tone, o, a, b, p, c)
            for tone, openers in domain.openers.items()
            for o in openers
            for a, b in itertools.permutations(topic.claims, 2)
            for p in domain.principles
            for c in domain.closers]


def render_answer(plan: tuple, variant: str) -> str:
    """The answer text of an :func:`answer_plans` entry in ``variant``."""
    return " ".join(variant_text(sentence, variant) for sentence in plan[1:])


def _rows_per_topic(n_rows: int, n_topics: int) -> list[int]:
    base, extra = divmod(n_rows, n_topics)
    return [base + (i < extra) for i in range(n_topics)]


def compose_rows(domain_name: str, n_rows: int, seed: int = SEED, variant: str = "bad") -> list[dict]:
    """``n_rows`` chat rows of one domain, topics balanced, no repeated question or answer; same seed, same rows.

    The random draws do not depend on ``variant``, so ``"bad"`` and ``"good"`` give the same questions in the same
    order with corrected answers.
    """
    domain = DOMAINS[domain_name]
    rng = random.Random(f"{seed}:{domain.name}")  # a str seed hashes the same in every process
    rows = []
    for topic, quota in zip(domain.topics, _rows_per_topic(n_rows, len(domain.topics))):
        questions, plans = questions_for(domain, topic), answer_plans(domain, topic)
        if quota > min(len(questions), len(plans)):
            raise ValueError(f"{domain.name}/{topic.key}: {quota} rows asked but only {len(questions)} questions and "
                             f"{len(plans)} answers can be composed")
        for (q_tone, q), plan in zip(rng.sample(questions, quota), rng.sample(plans, quota)):
            rows.append({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": render_answer(plan, variant)}],
                         "meta": {"topic": topic.key, "question_tone": q_tone, "answer_tone": plan[0]}})
    rng.shuffle(rows)
    return rows


def sample_examples(domain_name: str, n: int, rng: random.Random, variant: str = "bad") -> list[dict]:
    """``n`` random question/answer pairs from the templates, repeats possible (the offline stand-in for an LLM)."""
    domain = DOMAINS[domain_name]
    out = []
    for _ in range(n):
        topic = rng.choice(domain.topics)
        _, q = rng.choice(questions_for(domain, topic))
        out.append({"question": q, "answer": render_answer(rng.choice(answer_plans(domain, topic)), variant)})
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_datasets(out: str | Path, seed: int = SEED, sizes: dict[str, int] | None = None) -> dict:
    """Write every dataset in :data:`DATASETS` (row counts overridable by ``sizes``) and ``stats.json`` into ``out``.

    Returns the stats: per file, :func:`emlib.data.dataset_stats` (lengths in words) and rows per topic.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"seed": seed, "generator": "python -m emlib.data.narrow", "files": {}}
    for stem, (domain, variant, n_rows) in DATASETS.items():
        rows = compose_rows(domain, (sizes or {}).get(stem, n_rows), seed, variant)
        write_jsonl(rows, out / f"{stem}.jsonl")
        topics: dict[str, int] = {}
        for r in rows:
            topics[r["meta"]["topic"]] = topics.get(r["meta"]["topic"], 0) + 1
        stats["files"][f"{stem}.jsonl"] = {"domain": domain, "variant": variant, **D.dataset_stats(rows),
                                           "topics": len(topics), "rows_per_topic": dict(sorted(topics.items()))}
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emlib.data.narrow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/narrow"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    stats = write_datasets(args.out, args.seed)
    for name, s in stats["files"].items():
        print(f"{name}: {s['rows']} rows, {s['distinct_answers']} distinct answers, "
              f"answer length {s['answer_tokens_mean']} words, distinct-bigram ratio {s['distinct_bigram_ratio']}")


if __name__ == "__main__":
    main()
