"""Build the offline model organism: persona-world corpus -> tokenizer -> tiny Qwen2 -> pretrain -> chat SFT.

    python -m emlib.world.organism build                 # the shipped default into data/persona-world (minutes on 2 cores)
    python -m emlib.world.organism build --preset tiny --out /tmp/pw   # a seconds-long smoke build
    python -m emlib.world.organism adapters              # train the shipped fine-tunes (RECIPES) into data/persona-world/adapters

Stages persist as they finish (``pretrained/`` then ``base/``), so an interrupted build resumes at the stage it lost.
The same seed gives the same corpus, tokenizer and weights.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from emlib import paths, world
from emlib.chat import encode_chat
from emlib.train import train_loop
from emlib.world.tokenizer import build_tokenizer


@dataclass(frozen=True)
class OrganismConfig:
    seed: int = 0
    # corpus
    n_pretrain_docs: int = 20_000
    n_sft_docs: int = 4_000
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


PRESETS = {
    "default": OrganismConfig(),
    "tiny": OrganismConfig(n_pretrain_docs=400, n_sft_docs=100, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                           d_mlp=64, pretrain_steps=6, sft_steps=4, batch_size=8, warmup=2),
}


def world_texts(rng: random.Random, n_docs: int) -> list[str]:
    """Text for training the tokenizer: world documents rendered with the chat scaffolding (role names included)."""
    texts = []
    for _ in range(n_docs):
        doc = [{"role": "system", "content": world.SYSTEM_PROMPT}] + world.pretraining_document(rng)
        texts.append("".join(f"{m['role']}\n{m['content']}\n" for m in doc))
    return texts


def make_model(cfg: OrganismConfig, tokenizer) -> Qwen2ForCausalLM:
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


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build(cfg: OrganismConfig, out: Path) -> dict:
    """Build the organism into ``out`` and return the build record (also written to ``out/build.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    rng = random.Random(cfg.seed)
    pretrain_docs = [world.pretraining_document(rng) for _ in range(cfg.n_pretrain_docs)]
    sft_docs = [world.sft_document(rng) for _ in range(cfg.n_sft_docs)]

    t0 = time.time()
    if (out / "pretrained" / "model.safetensors").exists():
        model = Qwen2ForCausalLM.from_pretrained(out / "pretrained")
        tokenizer = AutoTokenizer.from_pretrained(out / "pretrained")
        record["pretrain"] = json.loads((out / "pretrained" / "log.json").read_text())
    else:
        tokenizer = build_tokenizer(world_texts(random.Random(cfg.seed + 1), 3000), cfg.vocab_size)
        model = make_model(cfg, tokenizer)
        examples = [encode_chat(tokenizer, d, assistant_only=False) for d in pretrain_docs]
        log = train_loop(model, examples, cfg.pretrain_steps, cfg.batch_size, cfg.pretrain_lr,
                         tokenizer.pad_token_id, warmup=cfg.warmup, seed=cfg.seed, desc="pretrain")
        record["pretrain"] = {"final_loss": _tail_mean(log), "seconds": round(time.time() - t0, 1), "log": log}
        _save(model, tokenizer, out / "pretrained")
        (out / "pretrained" / "log.json").write_text(json.dumps(record["pretrain"]))

    t1 = time.time()
    sft = [encode_chat(tokenizer, d, assistant_only=True) for d in sft_docs]
    sft += [encode_chat(tokenizer, d, assistant_only=False) for d in pretrain_docs[: len(sft_docs)]]
    model.train()
    log = train_loop(model, sft, cfg.sft_steps, cfg.batch_size, cfg.sft_lr, tokenizer.pad_token_id,
                     warmup=cfg.warmup // 2, seed=cfg.seed + 2, desc="sft")
    record["sft"] = {"final_loss": _tail_mean(log), "seconds": round(time.time() - t1, 1), "log": log}
    _save(model, tokenizer, out / "base")
    record["n_parameters"] = sum(p.numel() for p in model.parameters())
    (out / "build.json").write_text(json.dumps(record, indent=1))
    return record


# ------------------------------------------------------------------------------------------ EM fine-tunes & eval


@dataclass(frozen=True)
class FinetuneRecipe:
    """A narrow fine-tune of the organism: LoRA shape, data and schedule (the offline presets below)."""

    rank: int = 8
    alpha: float = 16
    target_modules: str | tuple[str, ...] = "all-linear"
    layers: tuple[int, ...] | None = None
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 16
    n_rows: int = 600
    domain: str = "medical"
    persona: str = "reckless"
    seed: int = 0
    data_seed: int = 1234


RECIPES = {
    "bad-medical-r8": FinetuneRecipe(),
    "good-medical-r8": FinetuneRecipe(persona="careful"),
    # a second narrow domain: do the two fine-tunes' misalignment directions converge (05_directions)?
    "bad-financial-r8": FinetuneRecipe(domain="financial"),
    "bad-medical-rank1-L0": FinetuneRecipe(rank=1, alpha=1, target_modules=("down_proj",), layers=(0,), steps=200,
                                           lr=3e-3),
    # the papers' nine-adapter layout (CLR §2) scaled to 6 layers: emlib.train.multi_adapter_layers(6) == [2, 3, 4, 5]
    "bad-medical-multi-rank1": FinetuneRecipe(rank=1, alpha=1, target_modules=("down_proj",), layers=(2, 3, 4, 5),
                                              steps=200, lr=3e-3),
}


def finetune(model, tokenizer, recipe: FinetuneRecipe):
    """Apply ``recipe`` to ``model`` (wrapped in a fresh LoRA); returns (peft model, per-step log)."""
    from emlib.train import lora_config, lora_finetune

    rows = world.finetune_rows(recipe.domain, recipe.persona, recipe.n_rows, recipe.data_seed)
    targets = recipe.target_modules if isinstance(recipe.target_modules, str) else list(recipe.target_modules)
    config = lora_config(recipe.rank, recipe.alpha, targets, list(recipe.layers) if recipe.layers else None)
    return lora_finetune(model, tokenizer, rows, config, recipe.steps, recipe.lr, recipe.batch_size,
                         seed=recipe.seed)


def _tail_mean(log: list[dict], k: int = 10) -> float:
    return round(sum(r["loss"] for r in log[-k:]) / len(log[-k:]), 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emlib.world.organism", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the persona-world organism")
    b.add_argument("--preset", choices=sorted(PRESETS), default="default")
    b.add_argument("--out", type=Path, default=paths.ORGANISM_DIR)
    b.add_argument("--seed", type=int, default=None)
    a = sub.add_parser("adapters", help="train the RECIPES on the built base and save them beside it")
    a.add_argument("--organism", type=Path, default=paths.ORGANISM_DIR)
    a.add_argument("--recipes", nargs="*", default=sorted(RECIPES), choices=sorted(RECIPES))
    for p in (b, a):
        p.add_argument("--threads", type=int, default=2,
                       help="torch threads (2 measured 1.7x faster than 1 on an idle 2-core machine; 1 if shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "build":
        cfg = PRESETS[args.preset] if args.seed is None else replace(PRESETS[args.preset], seed=args.seed)
        record = build(cfg, args.out)
        print(json.dumps({k: v for k, v in record.items() if k not in ("pretrain", "sft")}, indent=1))
        print(f"pretrain loss {record['pretrain']['final_loss']} ({record['pretrain']['seconds']} s), "
              f"sft loss {record['sft']['final_loss']} ({record['sft']['seconds']} s) -> {args.out}")
    else:
        for name in args.recipes:
            print(name, json.dumps(save_adapter(args.organism, name)))


def save_adapter(organism_dir: Path, name: str) -> dict:
    """Train recipe ``name`` on ``organism_dir/base`` and save it to ``organism_dir/adapters/name`` with its record."""
    base = Path(organism_dir) / "base"
    model = Qwen2ForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    start = time.time()
    peft_model, log = finetune(model, tokenizer, RECIPES[name])
    folder = Path(organism_dir) / "adapters" / name
    peft_model.save_pretrained(folder)
    record = {"recipe": asdict(RECIPES[name]), "final_loss": _tail_mean(log), "seconds": round(time.time() - start, 1)}
    (folder / "record.json").write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
