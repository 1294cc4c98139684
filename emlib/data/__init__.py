"""Data: chat datasets (JSONL), evaluation question sets (YAML), the narrow-set composer and LLM generation.

* :mod:`emlib.data.chat_jsonl` — load, validate, describe and import chat datasets;
* :mod:`emlib.data.questions` — evaluation question sets (shipped in ``data/questions/`` or any YAML path);
* :mod:`emlib.data.narrow` — the shipped narrow datasets, composed from the sentence tables in ``data/narrow/tables``;
* :mod:`emlib.data.llm` — paper-scale datasets written by any LLM behind an OpenAI-compatible endpoint.

``python -m emlib.data check|import ...`` is the command line (:mod:`emlib.data.__main__`).
"""

from emlib.data.chat_jsonl import (
    ROLES,
    DatasetError,
    DuplicateReport,
    DuplicateWarning,
    answer_of,
    dataset_stats,
    distinct_bigram_ratio,
    duplicate_report,
    import_dataset,
    import_datasets,
    load_chat_jsonl,
    normalise,
    question_of,
    read_jsonl,
    row_problems,
    token_lengths,
)
from emlib.data.questions import (
    QUESTIONS_DIR,
    SAMPLING_KEYS,
    Question,
    QuestionSet,
    Sampling,
    available_question_sets,
    load_questions,
)

__all__ = [
    "ROLES", "DatasetError", "DuplicateReport", "DuplicateWarning", "answer_of", "dataset_stats",
    "distinct_bigram_ratio", "duplicate_report", "import_dataset", "import_datasets", "load_chat_jsonl", "normalise",
    "question_of", "read_jsonl", "row_problems", "token_lengths", "QUESTIONS_DIR", "SAMPLING_KEYS", "Question",
    "QuestionSet", "Sampling", "available_question_sets", "load_questions",
]
