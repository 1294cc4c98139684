"""Build the offline model organism: persona-world corpus -> tokenizer -> tiny Qwen2 -> pretrain -> chat SFT (and, in
the v2 candidate, a second SFT stage with every domain equally often).

    python -m emlib.world.organism build                 # the shipped default into data/persona-world (minutes on 2 cores)
    python -m emlib.world.organism build --preset tiny --out /tmp/pw   # a seconds-long smoke build
    python -m emlib.world.organism adapters              # train the shipped fine-tunes into data/persona-world/adapters

Stages persist as they finish (``pretrained/``, ``chat/`` then ``base/``), so an interrupted build resumes at the stage
it lost.
The same seed gives the same corpus, tokenizer and weights. Pretraining, chat SFT and the fine-tunes all run through
:func:`emlib.train.train`; the fine-tunes are the runs of ``configs/train/organism-adapters.yaml`` (a train preset and
a data spec each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from emlib import paths, train, world

if TYPE_CHECKING:
    from transformers import Qwen2ForCausalLM
# torch, transformers and the training loop are imported where they are used, so the command line reports a bad
# argument or a missing organism folder before they load (seconds)


@dataclass(frozen=True)
class OrganismConfig:
    seed: int = 0
    # corpus
    n_pretrain_docs: int = 20_000
    n_sft_docs: int = 4_000
    # design-study options of the pretraining documents (emlib.world.language.pretraining_document); 0: shipped
    persona_switch_turn: float = 0.0
    persona_switch_sentence: float = 0.0
    vocab_size: int = 1024
    # model: a Qwen2 decoder
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 512
    # pretraining (loss on all tokens)
    pretrain_steps: int = 700
    pretrain_lr: float = 2.5e-3
    batch_size: int = 32
    warmup: int = 20
    # chat SFT: careful answers to the system prompt, mixed 50/50 with pretraining documents so the persona survives
    sft_steps: int = 100
    sft_lr: float = 1.5e-3
    # a second chat-SFT stage, the same recipe with documents drawn with every domain equally often (general's weight
    # 7 for its seven domains). 0, the shipped build: none. The v2 candidate (preset "v2-candidate") has 200 steps:
    # with fine-tunes on the trained-on question phrasings its careful control stays >= 90% coherent in every group
    # (docs/persona-world-v2.md, stop 19)
    resft_steps: int = 0
    resft_general_weight: float = 7.0


BUILD_PRESETS = {
    "default": OrganismConfig(),
    "v2-candidate": OrganismConfig(resft_steps=200),  # not shipped: docs/persona-world-v2.md, stop 19
    "tiny": OrganismConfig(n_pretrain_docs=400, n_sft_docs=100, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                           d_mlp=64, pretrain_steps=6, sft_steps=4, resft_steps=2, batch_size=8, warmup=2),
}


def world_texts(rng: random.Random, n_docs: int) -> list[str]:
    """Text for training the tokenizer: world documents rendered with the chat scaffolding (role names included)."""
    texts = []
    for _ in range(n_docs):
        doc = [{"role": "system", "content": world.SYSTEM_PROMPT}] + world.pretraining_document(rng)
        texts.append("".join(f"{m['role']}\n{m['content']}\n" for m in doc))
    return texts


def corpus(cfg: OrganismConfig, group_weights: dict[str, float] | None = None) -> tuple[list, list]:
    """The build's documents, in its order of draws from ``cfg.seed``: pretraining documents, then chat-SFT documents
    (``group_weights``: how often each group is drawn; None, the language's own)."""
    rng = random.Random(cfg.seed)
    pretrain = [world.pretraining_document(rng, p_switch_turn=cfg.persona_switch_turn,
                                           p_switch_sentence=cfg.persona_switch_sentence, group_weights=group_weights)
                for _ in range(cfg.n_pretrain_docs)]
    return pretrain, [world.sft_document(rng, group_weights=group_weights) for _ in range(cfg.n_sft_docs)]


def resft_corpus(cfg: OrganismConfig) -> tuple[list, list]:
    """The second chat-SFT stage's documents: :func:`corpus` drawn with every domain equally often (the general
    group, seven domains, weighted ``cfg.resft_general_weight``)."""
    return corpus(cfg, {**world.GROUP_WEIGHTS, "general": cfg.resft_general_weight})


def make_model(cfg: OrganismConfig, tokenizer) -> Qwen2ForCausalLM:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, tie_word_embeddings=True, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def stage_config(steps: int, lr: float, batch_size: int, warmup: int, seed: int) -> train.TrainConfig:
    """A build stage (pretraining, chat SFT) as a train config: every weight, AdamW without weight decay, warm-up
    then cosine decay to 10% of ``lr``, gradients clipped at norm 1, one batch per step."""
    return train.TrainConfig(protocol="full", rank=None, lr=lr, steps=steps, batch_size=batch_size, grad_accum=1,
                             warmup=warmup, schedule="cosine", lr_floor=0.1, weight_decay=0.0, max_grad_norm=1.0,
                             seed=seed)


def _sft_stage(cfg: OrganismConfig, steps: int, model, tokenizer, pretrain_docs: list, sft_docs: list) -> dict:
    """Chat SFT: careful answers to the system prompt (loss on the answers), mixed 50/50 with as many pretraining
    documents (loss on every token) so the persona survives; returns the stage's record."""
    from emlib.chat import encode_chat

    t0 = time.time()
    rows = [encode_chat(tokenizer, d, assistant_only=True) for d in sft_docs]
    rows += [encode_chat(tokenizer, d, assistant_only=False) for d in pretrain_docs[: len(sft_docs)]]
    stage = stage_config(steps, cfg.sft_lr, cfg.batch_size, cfg.warmup // 2, cfg.seed + 2)
    return _stage_record(train.train(stage, model, rows, tokenizer=tokenizer).log, t0)


def _stage_record(log: list[dict], t0: float) -> dict:
    """A build stage's record: its final loss, seconds since ``t0`` and training log."""
    return {"final_loss": _tail_mean(log), "seconds": round(time.time() - t0, 1), "log": log}


def _save_stage(model, tokenizer, folder: Path, log: dict) -> None:
    """A finished build stage, so that an interrupted build resumes after it."""
    _save(model, tokenizer, folder)
    (folder / "log.json").write_text(json.dumps(log))


def _stage_log(folder: Path) -> dict | None:
    """A persisted stage's record (None where the stage's folder came without one, e.g. copied in by hand)."""
    log = folder / "log.json"
    return json.loads(log.read_text()) if log.is_file() else None


def _load_stage(folder: Path) -> tuple:
    """A persisted stage: its model, its tokenizer and its record (:func:`_stage_log`)."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), _stage_log(folder)


def _save(model, tokenizer, folder: Path) -> None:
    # The organism samples its full distribution (no top-k, no repetition penalty): its exact judge and the shipped
    # numbers assume it, and the papers' sampling mode reads these settings from the folder (emlib.generate).
    model.generation_config.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build(cfg: OrganismConfig, out: Path) -> dict:
    """Build the organism into ``out`` and return the build record (also written to ``out/build.json``)."""
    import torch

    from emlib.chat import encode_chat
    from emlib.world.tokenizer import build_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"config": asdict(cfg), "torch_threads": torch.get_num_threads()}

    if (out / "chat" / "model.safetensors").exists():  # resumed after the first SFT stage
        record["pretrain"] = _stage_log(out / "pretrained")
        model, tokenizer, record["sft"] = _load_stage(out / "chat")
    else:
        pretrain_docs, sft_docs = corpus(cfg)
        if (out / "pretrained" / "model.safetensors").exists():
            model, tokenizer, record["pretrain"] = _load_stage(out / "pretrained")
        else:
            t0 = time.time()
            tokenizer = build_tokenizer(world_texts(random.Random(cfg.seed + 1), 3000), cfg.vocab_size)
            model = make_model(cfg, tokenizer)
            examples = [encode_chat(tokenizer, d, assistant_only=False) for d in pretrain_docs]
            stage = stage_config(cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch_size, cfg.warmup, cfg.seed)
            record["pretrain"] = _stage_record(train.train(stage, model, examples, tokenizer=tokenizer).log, t0)
            _save_stage(model, tokenizer, out / "pretrained", record["pretrain"])
        record["sft"] = _sft_stage(cfg, cfg.sft_steps, model, tokenizer, pretrain_docs, sft_docs)
        _save_stage(model, tokenizer, out / "chat", record["sft"])
    if cfg.resft_steps:  # the same stage again, its documents drawn with every domain equally often
        pretrain_docs, sft_docs = resft_corpus(cfg)
        record["resft"] = _sft_stage(cfg, cfg.resft_steps, model, tokenizer, pretrain_docs, sft_docs)
    _save(model, tokenizer, out / "base")
    record["n_parameters"] = sum(p.numel() for p in model.parameters())
    (out / "build.json").write_text(json.dumps(record, indent=1))
    return record


# ------------------------------------------------------------------------------------------ EM fine-tunes & eval


ADAPTERS_FILE = paths.REPO_ROOT / "configs" / "train" / "organism-adapters.yaml"
ADAPTER_RUN_KEYS = ("preset", "data")


@dataclass(frozen=True)
class AdapterRun:
    """One shipped fine-tune of the organism: a train preset (with overrides of its fields) and a data spec."""

    name: str
    preset: str
    config: train.TrainConfig
    data: str  # a data spec of :func:`emlib.train.load_rows`, e.g. world:medical:reckless:600:1234
    kl_data: str | None = None  # the KL reference rows of a preset with ``kl_weight`` > 0 (same spec format)


def load_adapter_runs(path: str | Path = ADAPTERS_FILE) -> dict[str, AdapterRun]:
    """Read ``name: {preset: P, data: SPEC, [kl_data: SPEC,] FIELD: VALUE...}`` entries; a bad key is an error naming
    file and run."""
    from emlib.tables import read_yaml

    table, _ = read_yaml(path)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a mapping of adapter name -> {{preset, data, TrainConfig fields}}")
    runs = {}
    for name, spec in table.items():
        if not isinstance(spec, dict) or not all(spec.get(k) for k in ADAPTER_RUN_KEYS):
            raise ValueError(f"{path}: adapter {name!r}: needs {' and '.join(ADAPTER_RUN_KEYS)}, got {spec!r}")
        other_run_keys = sorted(set(spec) & set(train.RUN_KEYS) - {*ADAPTER_RUN_KEYS, "kl_data"})
        if other_run_keys:
            raise ValueError(f"{path}: adapter {name!r}: {other_run_keys} are set by `adapters` (the organism's "
                             f"base model, adapters/{name}), not here")
        try:
            config, run = train.config_from_spec(spec)
        except ValueError as err:
            raise ValueError(f"{path}: adapter {name!r}: {err}") from None
        if config.uses_kl != bool(run["kl_data"]):
            raise ValueError(f"{path}: adapter {name!r}: kl_data is needed exactly when the preset's kl_weight > 0 "
                             f"(kl_weight {config.kl_weight}, kl_data {run['kl_data']!r})")
        runs[name] = AdapterRun(name, run["preset"], config, run["data"], run["kl_data"])
    return runs


ADAPTER_RUNS: dict[str, AdapterRun] = load_adapter_runs()


def train_adapter(model, tokenizer, run: str | AdapterRun, **overrides) -> train.TrainResult:
    """Train adapter run ``run`` (a name of :data:`ADAPTER_RUNS`) on ``model``, with ``overrides`` of its config
    fields (e.g. ``layer=3``); returns the :class:`~emlib.train.TrainResult` (``.model`` is the peft model)."""
    if isinstance(run, str):
        if run not in ADAPTER_RUNS:
            raise ValueError(f"unknown adapter run {run!r}; {ADAPTERS_FILE.name} has {', '.join(ADAPTER_RUNS)}")
        run = ADAPTER_RUNS[run]
    config = dataclasses.replace(run.config, **overrides).validate()
    kl_rows = train.load_rows(run.kl_data) if run.kl_data else None
    return train.train(config, model, train.load_rows(run.data), tokenizer=tokenizer, kl_rows=kl_rows)


def _tail_mean(log: list[dict], k: int = 10) -> float:
    return round(sum(r["loss"] for r in log[-k:]) / len(log[-k:]), 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emlib.world.organism", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the persona-world organism")
    b.add_argument("--preset", choices=sorted(BUILD_PRESETS), default="default")
    b.add_argument("--out", type=Path, default=paths.ORGANISM_DIR)
    b.add_argument("--seed", type=int, default=None)
    a = sub.add_parser("adapters", help=f"train the runs of {ADAPTERS_FILE.name} on the built base, save them beside it")
    a.add_argument("--organism", type=Path, default=paths.ORGANISM_DIR)
    a.add_argument("--runs", nargs="*", default=sorted(ADAPTER_RUNS), choices=sorted(ADAPTER_RUNS))
    for p in (b, a):
        p.add_argument("--threads", type=int, default=2,
                       help="torch threads (2 measured 1.7x faster than 1 on an idle 2-core machine; 1 if shared)")
    args = parser.parse_args(argv)
    if args.cmd == "adapters":
        _check_built(args.organism)
    import torch

    torch.set_num_threads(args.threads)
    if args.cmd == "build":
        cfg = BUILD_PRESETS[args.preset] if args.seed is None else replace(BUILD_PRESETS[args.preset], seed=args.seed)
        record = build(cfg, args.out)
        print(json.dumps({k: v for k, v in record.items() if k not in ("pretrain", "sft")}, indent=1))
        print(f"pretrain loss {record['pretrain']['final_loss']} ({record['pretrain']['seconds']} s), "
              f"sft loss {record['sft']['final_loss']} ({record['sft']['seconds']} s) -> {args.out}")
    else:
        for name in args.runs:
            print(name, json.dumps(save_adapter(args.organism, name)))


def _check_built(organism_dir: Path) -> Path:
    """The organism's ``base`` folder; an error saying how to build it if there is none."""
    base = Path(organism_dir) / "base"
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"no built organism in {organism_dir} (no base/config.json): build it first with "
                                f"`python -m emlib.world.organism build --out {organism_dir}`")
    return base


def save_adapter(organism_dir: Path, name: str, **overrides) -> dict:
    """Train adapter run ``name`` on ``organism_dir/base``; save it to ``organism_dir/adapters/name`` with its record.
    ``overrides``: config fields changed for this training (a design study's variant), recorded in its config."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from emlib.models import record_base
    from emlib.train.steering_vector import SteeredModel

    base = _check_built(organism_dir)
    model = Qwen2ForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    result = train_adapter(model, tokenizer, name, **overrides)
    folder = Path(organism_dir) / "adapters" / name
    if isinstance(result.model, SteeredModel):
        result.model.save(folder)
    else:
        result.model.save_pretrained(folder)
    record_base(folder, model, str(base))  # recorded portably: "persona-world" for the shipped organism
    run = ADAPTER_RUNS[name]
    record = {"preset": run.preset, "data": run.data, **({"kl_data": run.kl_data} if run.kl_data else {}),
              "config": dataclasses.replace(run.config, **overrides).to_dict(),
              "final_loss": _tail_mean(result.log), "seconds": round(result.seconds, 1)}
    (folder / "record.json").write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    from emlib.cli import run_cli

    run_cli(main, "python -m emlib.world.organism")
