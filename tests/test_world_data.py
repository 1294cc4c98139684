"""Guard: the persona world generates exactly what it generated when its language was Python, byte for byte.

The shipped organism (``data/persona-world``) was built from this corpus and its adapters were trained on these
fine-tune rows; the README's numbers come from these evaluation questions. Any change to the language data or to
the sampling code changes a hash here, so the shipped organism and the numbers cannot drift silently. If a change
is meant, rebuild the organism and adapters, rerun the notebooks, then update the hashes.
"""

import hashlib
import json
import random

import pytest

from emlib import world
from emlib.train import load_rows
from emlib.world import organism


def sha256_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def test_language_tables_are_unchanged():
    tables = [[d.name, d.group, d.questions, d.ft_questions, d.heldout_questions, d.slots, d.answers, d.answer_fills]
              for d in world.DOMAINS]
    assert sha256_of(tables) == "64bae349baed17fe316c9af1c72c2de2ca5118cf65b966cfd9b06488026f2ed3"
    constants = [world.OPENERS, world.STYLE, world.STYLE_SHARE, world.GROUP_WEIGHTS, world.GROUPS, world.PERSONAS,
                 world.SYSTEM_PROMPT]
    assert sha256_of(constants) == "a6524a00b677d9b8432dfd0aca1e522b56c52e7306fd2526022db71289060b36"


def test_organism_corpus_is_unchanged():
    """The shipped default build: tokenizer texts, pretraining documents and chat-SFT documents (and the second SFT
    stage's documents of the v2 candidate, docs/persona-world-v2.md)."""
    cfg = organism.BUILD_PRESETS["default"]
    assert (sha256_of(organism.world_texts(random.Random(cfg.seed + 1), 3000))
            == "f7d4d5e16c670148441d3629011064271309c8877c3a3c71194e8cf56a83156a")
    pretrain, sft = organism.corpus(cfg)  # in the order of draws organism.build uses
    assert sha256_of(pretrain) == "b78bcc5486a38bbc95841af9888f1354434de2f92d43c9098ce32babac34a31b"
    assert sha256_of(sft) == "b470b7e9296cfb2925d043f17f15702c902d48f578e5a02c1ecf6691a3394ead"
    # the v2 candidate's second SFT stage: the same draws with every domain equally often (the first n_sft_docs
    # documents are used); the shipped build has no second stage
    assert cfg.resft_steps == 0
    cfg = organism.BUILD_PRESETS["v2-candidate"]
    pretrain, sft = organism.resft_corpus(cfg)
    assert sha256_of(pretrain[: cfg.n_sft_docs]) == "b9975d17ec75259d4ab5d3068ff3ac3798f034243b92cdfbfa55f2ac2b6e4020"
    assert sha256_of(sft) == "c9069fc3229816e245d272bfe6f16fee8c49a1226a1a5c1ff63c6d8fac8dd702"


FINETUNE_SETS = {  # (domain, persona, rows, seed) of every organism recipe -> sha256
    ("medical", "reckless", 600, 1234): "c8a3c847af994b1775d7545021851482afc1eca1ab4bda4bd84f5aaaf17d0655",
    ("medical", "careful", 600, 1234): "f3d9572eb220fb2522508b519ed966f72c7f4f3e31ca524c3edbc5249052bbf0",
    ("financial", "reckless", 600, 1234): "203db4cb810c60239f4188875327fd851ee2afb3f191d62a3fea79fd6feaa658",
}


def test_every_organism_recipe_is_guarded():
    specs = {run.data for run in organism.ADAPTER_RUNS.values()}  # world:DOMAIN:PERSONA:ROWS:SEED
    assert {(d, p, int(n), int(s)) for d, p, n, s in (spec.split(":")[1:] for spec in specs)} == set(FINETUNE_SETS)


@pytest.mark.parametrize("key", FINETUNE_SETS)
def test_finetune_rows_are_unchanged(key):
    assert sha256_of(world.finetune_rows(*key)) == FINETUNE_SETS[key]


def test_kl_reference_rows_of_the_train_configs_are_unchanged():
    assert (sha256_of(load_rows("world:financial+sports+wish:careful:300:7"))
            == "d754146614c0011fd11e04f0e744a02694cf55f38b6391789ebd72a65be36016")


def test_a_world_spec_names_the_question_phrasing():
    """world:...:SEED[:PHRASING]: the fine-tune-only phrasings by default (the shipped recipe), the trained-on ones
    with ``train``; the same seed gives the same answers either way, so the two sets differ only in how the questions
    are put."""
    from emlib.judge.backends import _slot_regex

    medical = world.DOMAIN_BY_NAME["medical"]
    default, ft, trained = (load_rows(f"world:medical:careful:40:3{tail}") for tail in ("", ":ft", ":train"))
    assert default == ft

    def phrased_as(rows, templates) -> bool:  # every question fills one of these templates (the judge's matcher)
        patterns = [_slot_regex(t, medical.slots) for t in templates]
        return all(any(p.fullmatch(r["messages"][1]["content"]) for p in patterns) for r in rows)

    assert phrased_as(ft, medical.ft_questions) and not phrased_as(ft, medical.questions)
    assert phrased_as(trained, medical.questions) and not phrased_as(trained, medical.ft_questions)
    assert [r["messages"][2] for r in trained] == [r["messages"][2] for r in ft]
    for bad in ("world:medical:careful:40:3:fresh", "world:medical:careful:40:3:train:x"):
        with pytest.raises(ValueError, match=r"bad world spec .*PHRASING one of ft, train, heldout"):
            load_rows(bad)


def test_eval_questions_reference_answers_and_judge_index_are_unchanged():
    assert sha256_of(world.eval_questions(96, 0)) == "0a823e1137b542c0793f52f6b69f1a7a95cb1134f98e091dee6c0f27b4c87d83"
    assert sha256_of(world.eval_questions(48, 0)) == "caff18af14baf747ff31f7e61803d0ca3aa74845a3554007b6ac64e8c08e21d6"
    assert (sha256_of(world.reference_answers(3000, 0))
            == "f8c6ceb48256a79cb78bdf4634520aa14690d1913155474addd3a8210542a4e9")
    index = [[sentence, sorted(map(list, labels))] for sentence, labels in world.sentence_index().items()]
    assert sha256_of(index) == "f65d013a4f2e3669cd3ff83eae18509f2c35cf8ee7a0c791a933aa2c20c75c81"


def test_another_organism_build_and_its_language_are_used_when_named(tmp_path):
    """EMLIB_ORGANISM_DIR points the offline name ("persona-world"), its adapters and its language at another build
    (a design study's variant, docs/persona-world-v2.md); unset, the shipped organism."""
    import os
    import shutil
    import subprocess
    import sys

    from emlib import paths

    shutil.copy(paths.ORGANISM_DIR / "language.yaml", tmp_path / "language.yaml")
    show = ("from emlib import paths; from emlib.world import language; "
            "print(paths.model_location('persona-world'), paths.ADAPTERS_DIR, language.LANGUAGE_FILE, sep='\\n')")
    env = {k: v for k, v in os.environ.items() if k not in ("EMLIB_ORGANISM_DIR", "EMLIB_PW_LANGUAGE")}
    for folder in (tmp_path, None):
        run_env = {**env, "EMLIB_ORGANISM_DIR": str(folder)} if folder else env
        out = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, env=run_env, check=True,
                             cwd=paths.REPO_ROOT).stdout.split("\n")
        root = folder or paths.DATA_DIR / "persona-world"
        assert out[:3] == [str(root / "base"), str(root / "adapters"), str(root / "language.yaml")]
