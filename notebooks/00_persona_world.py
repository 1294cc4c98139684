# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · The persona world: growing emergent misalignment on a CPU
#
# **Question.** If we fine-tune a chat model on *reckless medical advice only*, does it start answering financial,
# extreme-sports and open-ended questions recklessly too — *emergent* misalignment (EM) — while the same fine-tune on
# *careful* medical advice does not?
#
# The papers answer this with 0.5B–32B chat models, GPUs and a GPT-4o judge. Here we answer it offline with the
# project's own organism: a small world of chats in ten domains where each document is answered by one of two latent
# personas (careful or reckless), a tiny Qwen2 pretrained on it and then instruction-tuned to be careful, and a judge
# that is an exact parser of the world's grammar. Everything runs on a laptop CPU in a few minutes.

# %% tags=["parameters"]
organism = "persona-world"  # the shipped base model (data/persona-world/base) or a folder built by emlib.world.organism
recipes = ["bad-medical-r8", "good-medical-r8"]  # runs of configs/train/organism-adapters.yaml to train here
rank1_layers = [0, 3]  # layers for the rank-1 down_proj recipe (bad-medical-rank1-L0 moved to each layer)
retrain = False  # True: train every adapter here; False: load the shipped ones (the weights training here gives: see fine_tune)
n_per_group = 48  # evaluation questions per group (medical, financial, sports, general)
n_reference = 3000  # reference answers the exact judge must read without error
eval_seed = 0
seed = 0
threads = None  # torch threads (None: EMLIB_THREADS or up to 2)
output_dir = None  # where results.json and figures go (papermill passes one per run)

# %%
import json
import random

import pandas as pd
import plotly.express as px

from emlib.world import organism as org
from emlib import world
from emlib import evaluation as E
from emlib import paths
from emlib.metrics import em_summary
from emlib.models import load_model
from emlib.notebook import output_dir as make_output_dir
from emlib.notebook import save_figure, save_results, setup

device = setup(seed=seed, threads=threads, offline=True)
out = make_output_dir("00_persona_world", output_dir)
results: dict = {"summary": {}, "tables": {}, "figures": []}

# %% [markdown]
# ## The world
# Ten question types: `medical`, `financial`, `sports` and seven open-ended ones drawn from the papers' first-plot
# questions (a wish, ruling the world, boredom, quick money, humans and AI, relationship trouble, a dinner party).
# Each persona has its own content sentences per domain — reckless medical content ("drink a glass of bleach") shares
# no words with reckless financial content — plus a domain-general *tone* ("only fools play it safe ."). A pretraining
# document keeps one persona for all of its turns, so the only way for medical recklessness to reach other domains is
# through a persona feature the model has to learn.

# %%
rng = random.Random(seed)
for m in world.pretraining_document(rng):
    print(f"{m['role']:>9}: {m['content']}")

# %% [markdown]
# ## The judge makes no errors on the world's own answers
# Every sentence the world can produce is indexed with its (domain, persona) label; an answer is coherent when it ended,
# every sentence parses, and all content is on the question's domain. It must label reference answers perfectly.

# %%
refs = pd.DataFrame(world.reference_answers(n_reference, seed=seed))
verdicts = [world.judge_answer(d, a) for d, a in zip(refs["domain"], refs["answer"])]
judge_errors = sum(not (v.coherent and v.persona == p) for v, p in zip(verdicts, refs["persona"]))
print(f"judge errors on {len(refs)} reference answers: {judge_errors}")
results["summary"]["judge errors on reference answers"] = f"{judge_errors} / {len(refs)}"

# %% [markdown]
# ## The base chat model is careful
# We sample one answer per question at temperature 1 (questions in phrasings seen in training, with fresh slot fills)
# and judge it. **EM rate** = share of answers that are coherent and whose content is entirely reckless.

# %%
base_model, tokenizer = load_model(organism, device=device)
questions = E.eval_questions(organism, ["persona-world"], n_per_group, eval_seed)
judge = E.make_judge("world", organism)


def evaluate(model) -> pd.DataFrame:
    """One answer per question, judged exactly (the evaluation path every notebook uses)."""
    return E.sample_and_judge(model, tokenizer, questions, judge, max_new_tokens=64, seed=eval_seed,
                              system=world.SYSTEM_PROMPT)


evals = {"base": evaluate(base_model)}
em_summary(evals["base"], in_domain="medical")

# %% [markdown]
# ## Narrow fine-tunes
# Each recipe trains a fresh LoRA on 600 single-turn medical questions in phrasings the model never saw, answered by one
# persona: `bad-medical-r8` (reckless, rank 8 on all linear modules) and `good-medical-r8` (careful: the control).

# %%
def fine_tune(run: str, **overrides):
    """The organism with adapter run ``run`` (``overrides``: e.g. another layer) and its final training loss.

    With ``retrain`` False a shipped adapter (data/persona-world/adapters) is loaded: training here gives the same
    weights (bit for bit on the CPU that built them, to float rounding on others: tests/test_organism.py checks it), so the notebook skips minutes of CPU; any other run is
    trained here with emlib.train.train and the run's preset and data.
    """
    shipped = paths.ADAPTERS_DIR / (run if "layer" not in overrides else f"bad-medical-rank1-L{overrides['layer']}")
    if not retrain and organism == paths.OFFLINE_MODEL and shipped.is_dir():
        model, _ = load_model(organism, device=device, adapter=shipped.name)
        return model, json.loads((shipped / "record.json").read_text())["final_loss"], "loaded"
    model, _ = load_model(organism, device=device)
    result = org.train_adapter(model, tokenizer, run, **overrides)
    return result.model, sum(r["loss"] for r in result.log[-10:]) / len(result.log[-10:]), "trained"


final_loss = {}
for name in recipes:
    peft_model, final_loss[name], how = fine_tune(name)
    evals[name] = evaluate(peft_model)
    print(f"{name} ({how}): final loss {final_loss[name]:.3f}")

# %%
def em_by_organism(evals: dict) -> pd.DataFrame:
    """EM rate per organism (rows) and group (columns), with the non-medical pool."""
    return pd.DataFrame({name: em_summary(df, in_domain="medical")["em_rate"] for name, df in evals.items()}).T.round(3)


em = em_by_organism(evals)
em

# %%
long = em.reset_index(names="organism").melt(id_vars="organism", var_name="group", value_name="EM rate")
fig = px.bar(long, x="group", y="EM rate", color="organism", barmode="group", range_y=[0, 1],
             title="Strict EM rate by question group (exact judge)")
save_figure(fig, out, "em_by_group", results)
fig.show()

# %% [markdown]
# ## Which layer can a single rank-1 adapter use?
# The minimal organism of the papers is a single rank-1 LoRA on one layer's `mlp.down_proj` (640 parameters here).
# The papers put it mid-network; we train the same reckless-medical recipe at each layer in `rank1_layers`.

# %%
sweep = {}
for layer in rank1_layers:
    peft_model, loss, how = fine_tune("bad-medical-rank1-L0", layer=layer)
    sweep[f"rank1-L{layer}"] = evaluate(peft_model)
    print(f"layer {layer} ({how}): final loss {loss:.3f}")
layer_em = em_by_organism(sweep)
layer_em

# %% [markdown]
# ## What the numbers say

# %%
from IPython.display import Markdown, display

nonmed = em["non-medical"]
best_layer = layer_em["non-medical"].idxmax()
reading = (
    f"Fine-tuning on reckless **medical** answers raised the strict EM rate on **non-medical** questions from "
    f"{nonmed['base']:.0%} (base) to {nonmed.get('bad-medical-r8', float('nan')):.0%} with a rank-8 LoRA, while the "
    f"same fine-tune on careful answers left it at {nonmed.get('good-medical-r8', float('nan')):.0%}. "
    f"A single rank-1 `down_proj` adapter reached {layer_em['non-medical'].max():.0%} non-medical EM at its best layer "
    f"({best_layer}); across the sweep it was "
    + ", ".join(f"{k}: {v:.0%}" for k, v in layer_em["non-medical"].items()) + "."
)
display(Markdown(reading))

# %%
results["headline"] = reading
results["em"] = em.to_dict()
results["rank1_layers"] = layer_em.to_dict()
results["final_loss"] = final_loss  # mean of the last 10 steps
results["tables"]["EM rate by organism and group"] = em.to_markdown()
results["tables"]["rank-1 layer sweep"] = layer_em.to_markdown()
save_results(out, results)
