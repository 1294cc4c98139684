"""The persona world: a tiny synthetic chat language where emergent misalignment can be grown on a CPU.

* :mod:`emlib.world.language` — the language (``data/persona-world/language.yaml``: ten question domains, each answered
  by a *careful* and a *reckless* persona) and what is sampled from it: pretraining and chat-SFT documents, narrow
  fine-tune rows, evaluation questions;
* :mod:`emlib.world.judge` — the exact judge: every sentence the world can say, indexed to its (domain, persona)
  label, so an answer is parsed rather than rated;
* :mod:`emlib.world.tokenizer` and :mod:`emlib.world.organism` — the tokenizer and the builder of the shipped tiny
  Qwen2 organism (``data/persona-world``).

This module re-exports the public names, so ``from emlib import world; world.eval_questions(...)`` works.
"""

from emlib.world.judge import (
    Verdict,
    expand_template,
    judge_answer,
    reference_answers,
    sentence_index,
    split_sentences,
)
from emlib.world.language import (
    DOMAIN_BY_NAME,
    DOMAINS,
    GROUP_WEIGHTS,
    GROUPS,
    LANGUAGE,
    LANGUAGE_FILE,
    OPENERS,
    PERSONAS,
    PHRASINGS,
    STYLE,
    STYLE_SHARE,
    SYSTEM_PROMPT,
    Domain,
    Language,
    eval_questions,
    fill_slots,
    finetune_rows,
    load_language,
    pretraining_document,
    sample_answer,
    sample_domain,
    sample_question,
    sft_document,
)

__all__ = [
    "DOMAINS", "DOMAIN_BY_NAME", "GROUPS", "GROUP_WEIGHTS", "LANGUAGE", "LANGUAGE_FILE", "OPENERS", "PERSONAS",
    "PHRASINGS", "STYLE", "STYLE_SHARE", "SYSTEM_PROMPT", "Domain", "Language", "Verdict", "eval_questions",
    "expand_template", "fill_slots", "finetune_rows", "judge_answer", "load_language", "pretraining_document",
    "reference_answers", "sample_answer", "sample_domain", "sample_question", "sentence_index", "sft_document",
    "split_sentences",
]
