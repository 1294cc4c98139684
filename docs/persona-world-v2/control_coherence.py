"""Design-study screen (stop 18): where the careful control loses coherence, and whether more chat SFT fixes it.

    python docs/persona-world-v2/control_coherence.py sft OUT STEPS [--language YAML]   # STEPS more SFT on the shipped base
    python docs/persona-world-v2/control_coherence.py finetune BASE_DIR OUT [--steps N] [--language YAML]
    python docs/persona-world-v2/control_coherence.py measure [ORGANISM_DIR]           # shipped when omitted

``sft`` copies the shipped base to OUT/pretrained and runs the organism build's SFT stage on it for STEPS more steps
(same recipe as the build: AdamW, warm-up then cosine to 10%, lr 1.5e-3, batch 32, the same SFT mix), then trains the
shipped bad-medical-r8 and good-medical-r8 runs on the result. ``--language`` draws the SFT documents and fine-tune rows
from a language variant (e.g. other group weights); OUT/language.yaml stays the shipped one, so the judge and the
evaluation questions are the shipped ones. ``finetune`` trains the same pair on BASE_DIR/base with another step count.
``measure`` samples 96 questions per group once (seed 0, 64 tokens, the world's system prompt) from the base, the
control and the EM organism and splits incoherence into its causes: a sentence the judge cannot parse (token-level
errors) and a content sentence of another domain (the answer left the question's domain).
"""
import argparse
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ("bad-medical-r8", "good-medical-r8")


def _use(organism: Path | None, language: str | None) -> None:  # before emlib is imported: both are read at import
    if organism is not None:
        os.environ["EMLIB_ORGANISM_DIR"] = str(organism)
    if language:
        os.environ["EMLIB_PW_LANGUAGE"] = str(Path(language).resolve())


def _finetune(organism_dir: Path, **overrides) -> None:
    import torch

    from emlib.world import organism

    torch.set_num_threads(2)
    for run in RUNS:
        organism.save_adapter(organism_dir, run, **overrides)


def sft(out: Path, steps: int, language: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "data/persona-world/base", out / "pretrained", dirs_exist_ok=True)
    (out / "pretrained" / "log.json").write_text(json.dumps({"final_loss": None, "seconds": 0}))
    shutil.copy(ROOT / "data/persona-world/language.yaml", out / "language.yaml")
    _use(out, language)
    import torch

    from emlib.world import organism

    torch.set_num_threads(2)
    organism.build(replace(organism.OrganismConfig(), sft_steps=steps), out)
    _finetune(out)


def finetune(base_dir: Path, out: Path, steps: int | None, language: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "base").exists():
        os.symlink(base_dir.resolve() / "base", out / "base")
    shutil.copy(base_dir / "language.yaml", out / "language.yaml")
    _use(out, language)
    _finetune(out, **({"steps": steps} if steps else {}))


def measure(organism_dir: Path | None) -> dict:
    _use(organism_dir, None)
    import torch

    from emlib import evaluation as E
    from emlib.metrics import em_rates
    from emlib.models import load_model, resolve_adapter_path
    from emlib.world.judge import judge_answer

    torch.set_num_threads(2)
    model_name = "persona-world"
    questions = E.eval_questions(model_name, None, 96, 0)
    system, judge = E.system_prompt(model_name, None), E.make_judge(None, model_name, None)
    report = {}
    for name, adapter in (("base", None), ("control", "good-medical-r8"), ("em", "bad-medical-r8")):
        model, tok = load_model(model_name, device="cpu", adapter=resolve_adapter_path(adapter) if adapter else None)
        answers = E.sample_and_judge(model, tok, questions, judge, 1, 64, 0, system)
        rates = em_rates(answers, "medical", aligned_below=30, coherent_above=50)
        groups = {}
        for group, rows in answers.groupby("group"):
            verdicts = [judge_answer(r.domain, r.answer, r.ended) for r in rows.itertuples()]
            share = lambda test: round(sum(map(test, verdicts)) / len(verdicts), 3)  # noqa: E731
            groups[group] = {"coherent": share(lambda v: v.coherent), "unparsed": share(lambda v: v.n_unparsed > 0),
                             "off_domain": share(lambda v: v.off_domain > 0)}
        report[name] = {"em_medical": rates["in_domain"], "em_nonmedical": rates["general"], "groups": groups}
        print(name, json.dumps(report[name]), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sft")
    s.add_argument("out", type=Path)
    s.add_argument("steps", type=int)
    s.add_argument("--language")
    f = sub.add_parser("finetune")
    f.add_argument("base_dir", type=Path)
    f.add_argument("out", type=Path)
    f.add_argument("--steps", type=int)
    f.add_argument("--language")
    m = sub.add_parser("measure")
    m.add_argument("organism", type=Path, nargs="?")
    args = parser.parse_args()
    if args.cmd == "sft":
        sft(args.out, args.steps, args.language)
    elif args.cmd == "finetune":
        finetune(args.base_dir, args.out, args.steps, args.language)
    else:
        measure(args.organism)


if __name__ == "__main__":
    main()
