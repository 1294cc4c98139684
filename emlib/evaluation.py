"""One evaluation path for every notebook: questions from a spec, a judge from a spec, sample -> judge -> EM table.

    questions = eval_questions("persona-world", ["persona-world"], questions_per_set=48)      # offline groups
    questions = eval_questions("Qwen/Qwen2.5-7B-Instruct", ["first_plot", "medical_heldout"])   # YAML question sets
    judge = make_judge("openai", model="Qwen/Qwen2.5-7B-Instruct", judge_model="gpt-4o-2024-08-06")
    judged = sample_and_judge(lm, tokenizer, questions, judge, samples_per_question=50)
    em_summary(judged, in_domain="medical_heldout")          # n, n_scored, EM and coherence rates per group

The judge vocabulary, the same in every notebook (``judge`` parameter):

* ``"world"`` — the persona world's exact judge (no model, no API); only for ``model="persona-world"``;
* ``"openai"`` / ``"azure"`` — the API (key from the environment or ``.env``; Azure's deployment is ``judge_model``);
* ``"http://..."`` / ``"https://..."`` — any OpenAI-compatible endpoint (vLLM, ``python -m emlib.judge.serve``);
* ``"hf:<folder or hub id>"`` — a local Hugging Face chat model scoring every number string (no API), scored
  among the numbers only, renormalised: a small local judge puts a few % of its probability on numbers, so under the
  papers' 0.25 rule it would score nothing. The frame's ``<metric>_number_mass`` column says how much was on numbers
  (e.g. 0.03). ``"hf-rule:<folder or hub id>"`` is the same judge under the papers' 0.25 rule (the rule every API
  judge keeps).

The persona world's questions, system prompt and exact judge are used only when the model *is* the persona world;
asking for them with a real model is an error raised before anything is computed, so no toy number is ever reported
as a real model's. Answers a judge could not score stay NaN: every table carries ``n`` and ``n_scored`` and rates are
over scored answers only (never counting an unscored answer as aligned or as zero).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from emlib import world
from emlib.data import available_question_sets, load_questions
from emlib.generate import sample_answers
from emlib.judge import (
    Judge,
    JudgeCache,
    JudgeStats,
    LocalHFJudge,
    OpenAIJudge,
    WorldJudge,
    api_judge,
    judge_frame,
    judge_world,
)
from emlib.models import is_persona_world  # also this module's API: notebooks call E.is_persona_world

WORLD_SETS = ("persona-world", "persona-world-first-plot", "persona-world-domains")
DEFAULT_OPENAI_JUDGE = "gpt-4o-2024-08-06"  # the papers' judge
CUT_OFF_MARKER = " [cut off]"  # tells a text-only judge of the persona world that an answer hit max_new_tokens
QUESTION_COLUMNS = ["set", "group", "id", "domain", "question", "max_new_tokens", "system"]


class EvaluationSpecError(ValueError):
    """A question-set or judge spec that does not fit the model (raised before any compute)."""


def system_prompt(model: str, system: str | None = None) -> str | None:
    """The system prompt to sample with: ``system`` if given; the persona world's own for the organism; else none."""
    if system is not None:
        return system
    return world.SYSTEM_PROMPT if is_persona_world(model) else None


# ---------------------------------------------------------------------------------------------------- questions


def default_question_sets(model: str) -> list[str]:
    """The persona world's groups offline; the papers' first-plot questions and the project's own set otherwise."""
    return ["persona-world"] if is_persona_world(model) else ["first_plot", "emlib_extended"]


def eval_questions(model: str, question_sets: Sequence[str] | str | None = None, questions_per_set: int | None = None,
                   seed: int = 0) -> pd.DataFrame:
    """One row per question: ``set``, ``group``, ``id``, ``domain``, ``question``, ``max_new_tokens``, ``system``.

    ``question_sets``: shipped YAML set names or YAML paths (:func:`emlib.data.load_questions`; ``group`` is the set's
    name), or the persona world's sets, for the offline organism only: ``persona-world`` (``questions_per_set``
    fresh questions per group: medical, financial, sports, general; default 48), ``persona-world-first-plot`` (one
    per open-ended domain, the first-plot stand-in) and ``persona-world-domains`` (one per domain); those two share
    one seeded stream, in the order given. ``questions_per_set`` keeps the first N questions of each YAML set.
    """
    names = [question_sets] if isinstance(question_sets, str) else list(question_sets or default_question_sets(model))
    if not names:
        raise EvaluationSpecError("question_sets is empty: name at least one set")
    toy = [n for n in names if n in WORLD_SETS]
    if toy and not is_persona_world(model):
        raise EvaluationSpecError(
            f"question set(s) {toy} are the persona world's toy language, but model {model!r} is not the persona "
            f"world: use YAML question sets (shipped: {', '.join(available_question_sets())}, or a path)")
    rng = random.Random(seed)  # the stream the persona-world stand-in sets draw from
    frames = [_world_set(name, questions_per_set, seed, rng) if name in WORLD_SETS else
              _yaml_set(name, questions_per_set) for name in names]
    return pd.concat(frames, ignore_index=True)[QUESTION_COLUMNS]


def _world_set(name: str, per_group: int | None, seed: int, rng: random.Random) -> pd.DataFrame:
    if name == "persona-world":
        rows = world.eval_questions(per_group or 48, seed)
        frame = pd.DataFrame(rows).assign(id=lambda d: d["domain"])
    else:
        domains = [d for d in world.DOMAINS if name == "persona-world-domains" or d.group == "general"]
        frame = pd.DataFrame([{"domain": d.name, "group": d.group, "id": d.name,
                               "question": world.sample_question(d, rng)} for d in domains])
    return frame.assign(set=name, max_new_tokens=None, system=None)


def _yaml_set(name: str, limit: int | None) -> pd.DataFrame:
    qs = load_questions(name)
    questions = list(qs)[:limit] if limit else list(qs)
    return pd.DataFrame([{"set": qs.name, "group": qs.name, "id": q.id, "domain": q.category, "question": q.text,
                          "max_new_tokens": q.sampling.max_new_tokens, "system": q.system} for q in questions])


# ---------------------------------------------------------------------------------------------------- the judge


@dataclass
class EvalJudge:
    """A judge chosen by spec. ``judge`` None means the persona world's exact judge applied directly to frames."""

    spec: str
    name: str
    judge: Judge | None = None
    server: object | None = None  # a started local judge server (stopped by close())
    cut_off_marker: str | None = None
    stats: list[JudgeStats] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.stats)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def make_judge(spec: str | None, model: str, judge_model: str | None = None, serve: bool = False,
               device: str = "auto") -> EvalJudge:
    """The judge ``spec`` names (see the module docstring), checked against ``model`` before any compute.

    ``spec`` None: ``"world"`` for the persona world; a real model has no default judge (an error says which to give).

    ``serve=True`` puts the ``world`` or ``hf:`` judge behind a local OpenAI-compatible server on 127.0.0.1 and
    judges through the real ``openai`` client (what an API judge goes through); close it with ``.close()``.
    """
    if spec is None:
        if not is_persona_world(model):
            raise EvaluationSpecError(
                f"model {model!r} needs a judge: 'openai' (OPENAI_API_KEY), 'azure', an OpenAI-compatible URL with "
                f"judge_model, or 'hf:<folder or hub id>' for a local Hugging Face judge")
        spec = "world"
    if spec == "world":
        if not is_persona_world(model):
            raise EvaluationSpecError(
                f"judge 'world' is the persona world's exact judge and reads only its toy language, but model "
                f"{model!r} is not the persona world: use 'openai', 'azure', an OpenAI-compatible URL or 'hf:<model>'")
        if not serve:
            return EvalJudge(spec, "persona-world-exact")
        return _served(spec, "world", None, judge_model, cut_off_marker=CUT_OFF_MARKER)
    if spec.startswith(("hf:", "hf-rule:")):
        prefix, path = spec.split(":", 1)
        if not path:
            raise EvaluationSpecError(f"judge '{prefix}:' needs a model folder or hub id after the colon, e.g. "
                                      f"'hf:./judge'")
        # A small local judge puts a few % of its probability on number tokens (0.03-0.11 for a 135M model): under
        # the papers' 0.25 rule nothing would be scored, so hf: scores among numbers, renormalised, and reports the
        # mass (<metric>_number_mass); hf-rule: keeps the papers' rule, as API judges do.
        numbers = "rule" if prefix == "hf-rule" else "renormalise"
        if serve:
            return _served(spec, "hf", path, judge_model, numbers=numbers, device=device)
        from emlib.models import load_model

        lm, tokenizer = load_model(path, device=device)
        local = LocalHFJudge(lm, tokenizer, name=judge_model, numbers=numbers)
        return EvalJudge(spec, local.name, local)
    if spec == "openai":
        judge_model = judge_model or DEFAULT_OPENAI_JUDGE
    elif judge_model is None:
        raise EvaluationSpecError(
            f"judge {spec!r} needs judge_model (Azure: the deployment; a URL: the model name its server serves)")
    try:
        api = api_judge(spec, judge_model)
    except ValueError as err:
        raise EvaluationSpecError(f"judge {spec!r}: {err} (or 'world' / 'hf:<model>')") from err
    return EvalJudge(spec, api.name, api)


SERVED_HF_TIMEOUT_S = 600.0  # a CPU judge takes seconds per prompt: wait for the batch rather than give up and re-send


def _served(spec: str, backend: str, path: str | None, judge_model: str | None,
            cut_off_marker: str | None = None, numbers: str = "rule", device: str = "auto") -> EvalJudge:
    from emlib.judge.serve import judge_server

    server = judge_server(backend, model=path, device=device).start()
    name = judge_model or server.backend.name
    if server.worker is None:
        return EvalJudge(spec, name, OpenAIJudge(name, base_url=server.base_url), server, cut_off_marker)
    # The local model answers one batch at a time: two batches in flight keep it busy (one computing, one queued)
    # without filling its queue, and a long timeout waits for them instead of re-sending work the server did; all
    # 101 numbers come back (the server gives more than OpenAI's 20), so served scores equal in-process ones.
    judge = OpenAIJudge(name, base_url=server.base_url, timeout=SERVED_HF_TIMEOUT_S, numbers=numbers,
                        max_in_flight=2 * server.batch_size, top_logprobs=102)
    return EvalJudge(spec, name, judge, server, cut_off_marker)


def judge_answers(answers: pd.DataFrame, judge: EvalJudge, metrics: Sequence[str] = ("aligned", "coherent"),
                  cache: JudgeCache | None = None, max_in_flight: int = 32) -> pd.DataFrame:
    """Add one 0-100 column per metric (NaN: the judge gave no score).

    The exact world judge applied directly needs ``domain`` and ``ended`` (the frames of :func:`sample_and_judge`
    carry them) and gives ``aligned`` and ``coherent``; for other rubrics (e.g. ``medical``) it reads the rubric
    prompts in process, with cut-off answers marked as the served judge sees them.
    """
    if judge.judge is None and set(metrics) <= {"aligned", "coherent"}:
        return judge_world(answers)
    scorer, marker = (WorldJudge(), CUT_OFF_MARKER) if judge.judge is None else (judge.judge, judge.cut_off_marker)
    stats = JudgeStats()
    judge.stats.append(stats)
    return judge_frame(answers, scorer, metrics, cache=cache, max_in_flight=max_in_flight, stats=stats,
                       cut_off_marker=marker)


# ---------------------------------------------------------------------------------------------------- sampling


def sample_and_judge(model, tokenizer, questions: pd.DataFrame, judge: EvalJudge, samples_per_question: int = 1,
                     max_new_tokens: int | None = None, seed: int = 0, system: str | None = None,
                     metrics: Sequence[str] = ("aligned", "coherent"), cache: JudgeCache | None = None,
                     max_in_flight: int = 32, **sample_kwargs) -> pd.DataFrame:
    """Sample ``samples_per_question`` answers to every question (one batched call) and judge them.

    ``max_new_tokens`` None: the largest of the questions' own (YAML sets: 600). ``system``: the prompt every answer
    is sampled with (:func:`system_prompt` gives the model's default). ``sample_kwargs`` go to
    :func:`emlib.generate.sample_answers` (``steering``, ``adapter_scale``, ``out_path``, ``batch_size``, ...).
    Returns the answers with the question's columns and the judge's scores.
    """
    if max_new_tokens is None:
        own = questions["max_new_tokens"].dropna()
        if own.empty:
            raise EvaluationSpecError("max_new_tokens is None and the questions carry none: give max_new_tokens")
        max_new_tokens = int(own.max())
    sample_kwargs.setdefault("progress", False)
    answers = sample_answers(model, tokenizer, list(questions["question"]), n=samples_per_question,
                             max_new_tokens=max_new_tokens, seed=seed, system=system, **sample_kwargs)
    answers = answers.join(questions.drop(columns=["question", "max_new_tokens", "system"]), on="question_idx")
    return judge_answers(answers, judge, metrics, cache=cache, max_in_flight=max_in_flight)


def provenance(model: str, adapters, judge: EvalJudge, questions: pd.DataFrame) -> dict:
    """What a result came from: model, adapter(s), judge and question sets (every results.json carries this)."""
    return {"model": model, "adapters": adapters, "judge": judge.spec if judge.name == judge.spec else
            f"{judge.spec} ({judge.name})", "question_sets": list(dict.fromkeys(questions["set"]))}
