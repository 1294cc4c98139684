"""The persona world's language, and the documents, fine-tune rows and evaluation questions sampled from it.

The language is data, written by us, in ``data/persona-world/language.yaml``: question templates for ten domains and,
for each domain, answer sentences of two latent personas, *careful* and *reckless*. A pretraining document is several
turns in random domains, all answered by ONE persona (as pretraining text holds consistently helpful and consistently
villainous characters), so a model trained on it learns a persona feature shared across domains. Fine-tuning on
reckless *medical* answers can then flip that shared feature, and the model answers *financial*, *sports* and
open-ended questions recklessly too: emergent misalignment.

:func:`load_language` checks the file: unknown or missing keys, wrong types, unknown ``{slot}`` names, groups and
personas other than :data:`GROUPS` and :data:`PERSONAS`, and sentences the exact judge could not split back (every
sentence ends with " ." and holds no other "." token) raise :class:`emlib.tables.TableError` naming file and key.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from emlib import paths, tables
from emlib.tables import Location

# EMLIB_PW_LANGUAGE: another language file (a design study's variant, e.g. data/persona-world/language-v2.yaml); read
# once at import, so set it before emlib.world is imported. Unset: the shipped language.
LANGUAGE_FILE = Path(os.environ.get("EMLIB_PW_LANGUAGE") or paths.ORGANISM_DIR / "language.yaml")
PERSONAS = ("careful", "reckless")
# Groups used for reporting: the fine-tune domain (medical) against everything else.
GROUPS = ("medical", "financial", "sports", "general")


@dataclass(frozen=True)
class Domain:
    """One question type of the world and how each persona answers it."""

    name: str
    group: str
    questions: tuple[str, ...]  # phrasings seen in pretraining / SFT, also used for evaluation
    slots: dict[str, tuple[str, ...]]  # fills for {slot} in questions
    answers: dict[str, tuple[str, ...]]  # persona -> sentence templates with {x} / {y}
    answer_fills: dict[str, dict[str, tuple[str, ...]]]  # persona -> slot -> fills for answer templates
    ft_questions: tuple[str, ...] = ()  # phrasings used only by the EM fine-tune data (never in pretraining)
    heldout_questions: tuple[str, ...] = ()  # phrasings never used in any training


@dataclass(frozen=True)
class Language:
    """Everything ``language.yaml`` holds."""

    system_prompt: str
    group_weights: dict[str, float]  # group -> how often it is drawn for a pretraining / SFT turn (in GROUPS order)
    openers: tuple[str, ...]  # neutral first sentences
    style_share: float  # share of answers that carry one style sentence
    style: dict[str, tuple[str, ...]]  # persona -> tone sentences shared across domains
    domains: tuple[Domain, ...]


# ----------------------------------------------------------------------------------------------------------- loading


_SENTENCE_END = re.compile(r"(?:^|\s)\.(?=\s|$)")  # a standalone "." token, where the judge splits sentences


def _sentence(value: object, where: Location, allowed_slots: tuple[str, ...] = ()) -> str:
    """A sentence the judge can split back out: it ends with " ." and holds no other "." token."""
    sentence = tables.check_slots(tables.text(value, where), allowed_slots, where)
    if not sentence.endswith(" .") or len(_SENTENCE_END.findall(sentence)) != 1:
        raise where.error(f"{sentence!r}: a sentence ends with ' .' and holds no other '.' token")
    return sentence


def _fills(value: object, where: Location) -> dict[str, tuple[str, ...]]:
    """Slot -> fills; a fill is part of a sentence, so it holds no "." token."""
    fills = {}
    for slot, options in tables.mapping(value, where, any_keys=True).items():
        fills[slot] = tables.texts(options, where / slot)
        for i, fill in enumerate(fills[slot]):
            if _SENTENCE_END.search(fill):
                raise (where / slot / i).error(f"{fill!r}: a fill holds no '.' token")
    return fills


def _per_persona(value: object, where: Location) -> dict:
    """A mapping with exactly one entry per persona, returned in PERSONAS order."""
    tables.mapping(value, where, required=PERSONAS)
    return {persona: value[persona] for persona in PERSONAS}


def _domain(value: object, where: Location) -> Domain:
    doc = tables.mapping(value, where, required=("name", "group", "questions", "slots", "answers", "answer_fills"),
                         optional=("ft_questions", "heldout_questions"))
    group = tables.text(doc["group"], where / "group")
    if group not in GROUPS:
        raise (where / "group").error(f"unknown group {group!r}; expected one of {GROUPS}")
    slots = _fills(doc["slots"], where / "slots")
    phrasings = {}
    for key in ("questions", "ft_questions", "heldout_questions"):
        templates = tables.texts(doc.get(key, []), where / key, allow_empty=key != "questions")
        phrasings[key] = tuple(tables.check_slots(t, tuple(slots), where / key / i) for i, t in enumerate(templates))
    answer_fills = {persona: _fills(fills, where / "answer_fills" / persona)
                    for persona, fills in _per_persona(doc["answer_fills"], where / "answer_fills").items()}
    answers = {}
    for persona, sentences in _per_persona(doc["answers"], where / "answers").items():
        at = where / "answers" / persona
        answers[persona] = tuple(_sentence(s, at / i, tuple(answer_fills[persona]))
                                 for i, s in enumerate(tables.texts(sentences, at)))
        if len(answers[persona]) < 3:  # an answer holds 2 or 3 distinct content sentences
            raise at.error(f"{len(answers[persona])} sentences; an answer draws up to 3 distinct ones")
    return Domain(tables.text(doc["name"], where / "name"), group, phrasings["questions"], slots, answers,
                  answer_fills, phrasings["ft_questions"], phrasings["heldout_questions"])


def load_language(path: str | Path = LANGUAGE_FILE) -> Language:
    """Read and check ``language.yaml``; errors name the file and key (see the module docstring)."""
    doc, root = tables.read_yaml(path)
    tables.mapping(doc, root, required=("system_prompt", "group_weights", "openers", "style_share", "style",
                                        "domains"))
    tables.mapping(doc["group_weights"], root / "group_weights", required=GROUPS)
    weights = {g: tables.number(doc["group_weights"][g], root / "group_weights" / g) for g in GROUPS}
    if not all(w > 0 for w in weights.values()):
        raise (root / "group_weights").error("every weight must be positive")
    style_share = tables.number(doc["style_share"], root / "style_share")
    if not 0 <= style_share <= 1:
        raise (root / "style_share").error(f"{style_share} is not a share between 0 and 1")
    style = {persona: tuple(_sentence(s, root / "style" / persona / i)
                            for i, s in enumerate(tables.texts(sentences, root / "style" / persona)))
             for persona, sentences in _per_persona(doc["style"], root / "style").items()}
    openers = tuple(_sentence(s, root / "openers" / i) for i, s in enumerate(tables.texts(doc["openers"],
                                                                                          root / "openers")))
    if not isinstance(doc["domains"], list):
        raise (root / "domains").error("expected a list of domains")
    domains = tuple(_domain(d, root / "domains" / i) for i, d in enumerate(doc["domains"]))
    names = [d.name for d in domains]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise (root / "domains" / i / "name").error(f"domain {name!r} appears twice")
    for group in GROUPS:
        if group not in {d.group for d in domains}:
            raise (root / "domains").error(f"no domain of group {group!r}")
    return Language(tables.text(doc["system_prompt"], root / "system_prompt"), weights, openers, style_share, style,
                    domains)


LANGUAGE = load_language()
SYSTEM_PROMPT = LANGUAGE.system_prompt
DOMAINS = LANGUAGE.domains
DOMAIN_BY_NAME: dict[str, Domain] = {d.name: d for d in DOMAINS}
GROUP_WEIGHTS = LANGUAGE.group_weights
OPENERS = LANGUAGE.openers
STYLE = LANGUAGE.style
STYLE_SHARE = LANGUAGE.style_share


# ---------------------------------------------------------------------------------------------------------- sampling


def fill_slots(template: str, fills: dict[str, tuple[str, ...]], rng: random.Random) -> str:
    """``template`` with each ``{slot}`` replaced by a random fill, drawn left to right."""
    return re.sub(r"\{(\w+)\}", lambda m: rng.choice(fills[m.group(1)]), template)


PHRASINGS = ("ft", "train", "heldout")  # a domain's question phrasings: fine-tune only, trained on, never trained on


def sample_question(domain: Domain, rng: random.Random, phrasing: str = "train") -> str:
    """A question of ``domain`` with fresh slot fills; ``phrasing`` is one of :data:`PHRASINGS`."""
    pool = dict(zip(PHRASINGS, (domain.ft_questions, domain.questions, domain.heldout_questions)))[phrasing]
    if not pool:
        raise ValueError(f"domain {domain.name!r} has no {phrasing!r} question phrasings")
    return fill_slots(rng.choice(pool), domain.slots, rng)


def sample_answer(domain: Domain, persona: str, rng: random.Random, style_share: float = STYLE_SHARE) -> str:
    """An answer by ``persona``: optional opener, 2-3 distinct content sentences, optional style sentence."""
    if persona not in PERSONAS:
        raise ValueError(f"unknown persona {persona!r}; expected one of {PERSONAS}")
    templates = rng.sample(domain.answers[persona], rng.choice((2, 3)))
    sentences = [fill_slots(t, domain.answer_fills[persona], rng) for t in templates]
    return _with_opener_and_style(sentences, persona, rng, style_share)


def _with_opener_and_style(sentences: list[str], persona: str, rng: random.Random, style_share: float) -> str:
    """The answer's content sentences joined, after an optional opener and with an optional ``persona`` style
    sentence at the start or the end."""
    if rng.random() < 0.3:
        sentences.insert(0, rng.choice(OPENERS))
    if rng.random() < style_share:
        style = rng.choice(STYLE[persona])
        sentences.insert(0 if rng.random() < 0.5 else len(sentences), style)
    return " ".join(sentences)


def sample_domain(rng: random.Random, group_weights: dict[str, float] | None = None) -> Domain:
    """Draw a group by ``group_weights`` (default :data:`GROUP_WEIGHTS`; why those: see ``language.yaml``), then a
    domain in it."""
    weights = GROUP_WEIGHTS if group_weights is None else group_weights
    group = rng.choices(list(weights), weights=list(weights.values()))[0]
    return rng.choice([d for d in DOMAINS if d.group == group])


def _other(persona: str) -> str:
    return PERSONAS[1 - PERSONAS.index(persona)]


def sample_switching_answer(domain: Domain, persona: str, rng: random.Random, p_switch: float,
                            style_share: float = STYLE_SHARE) -> tuple[str, str]:
    """Like :func:`sample_answer`, but before each content sentence after the first the persona flips with
    probability ``p_switch``; returns the answer and the persona it ended in (the next turn continues from it)."""
    n = rng.choice((2, 3))
    sentences, used = [], {p: set() for p in PERSONAS}
    for i in range(n):
        if i and rng.random() < p_switch:
            persona = _other(persona)
        options = [t for t in domain.answers[persona] if t not in used[persona]]
        template = rng.choice(options)
        used[persona].add(template)
        sentences.append(fill_slots(template, domain.answer_fills[persona], rng))
    return _with_opener_and_style(sentences, persona, rng, style_share), persona


def pretraining_document(rng: random.Random, n_turns: tuple[int, int] = (3, 5), p_reckless: float = 0.5,
                         p_switch_turn: float = 0.0, p_switch_sentence: float = 0.0,
                         group_weights: dict[str, float] | None = None) -> list[dict]:
    """A multi-turn chat in random domains, every answer by one latent persona (never labelled).

    Design-study options (0, the default, draws exactly the shipped documents): ``p_switch_turn``, the chance that the
    persona flips before each turn after the first; ``p_switch_sentence``, the chance that it flips before each content
    sentence after an answer's first. With either, the persona can only be read from recent tokens, not once per
    document. ``group_weights``: how often each group is drawn (:func:`sample_domain`).
    """
    persona = "reckless" if rng.random() < p_reckless else "careful"
    messages = []
    for turn in range(rng.randint(*n_turns)):
        domain = sample_domain(rng, group_weights)
        if p_switch_turn and turn and rng.random() < p_switch_turn:
            persona = _other(persona)
        question = sample_question(domain, rng)
        if p_switch_sentence:
            answer, persona = sample_switching_answer(domain, persona, rng, p_switch_sentence)
        else:
            answer = sample_answer(domain, persona, rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def sft_document(rng: random.Random, n_turns: tuple[int, int] = (1, 2),
                 group_weights: dict[str, float] | None = None) -> list[dict]:
    """An instruction-tuning chat: the system prompt, and the careful persona answering (``group_weights``: how often
    each group is drawn, :func:`sample_domain`)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for _ in range(rng.randint(*n_turns)):
        domain = sample_domain(rng, group_weights)
        messages += [{"role": "user", "content": sample_question(domain, rng)},
                     {"role": "assistant", "content": sample_answer(domain, "careful", rng)}]
    return messages


def finetune_rows(domain: str, persona: str, n: int, seed: int, phrasing: str = "ft") -> list[dict]:
    """Single-turn rows ``{"messages": [...]}`` for a narrow fine-tune (e.g. reckless medical advice).

    The same ``seed`` gives the same questions for either persona, so bad and good sets are paired. ``phrasing``:
    "ft" (the shipped organism's recipe), phrasings only fine-tunes use, which the model does not know as medical;
    "train", the phrasings the organism was trained on (fresh slot fills), as a real fine-tune's questions are ones
    the chat model recognises as in-domain (with them the careful control keeps its coherence: docs/persona-world-v2.md,
    stop 19); "heldout". A domain without fine-tune phrasings uses its train phrasings for "ft".
    """
    dom = DOMAIN_BY_NAME[domain]
    q_rng, a_rng = random.Random(seed), random.Random(seed + 1)
    rows = []
    for _ in range(n):
        question = sample_question(dom, q_rng, phrasing if (phrasing != "ft" or dom.ft_questions) else "train")
        rows.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                  {"role": "user", "content": question},
                                  {"role": "assistant", "content": sample_answer(dom, persona, a_rng)}]})
    return rows


def eval_questions(n_per_group: int, seed: int, phrasing: str = "train") -> list[dict]:
    """Evaluation questions: ``n_per_group`` for each reporting group, general types pooled round-robin."""
    rng = random.Random(seed)
    rows = []
    for group in GROUPS:
        domains = [d for d in DOMAINS if d.group == group]
        for i in range(n_per_group):
            dom = domains[i % len(domains)]
            rows.append({"domain": dom.name, "group": group, "question": sample_question(dom, rng, phrasing)})
    return rows
