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
# # 07 · Narrow vs emergent misalignment: KL-regularised training and stability
#
# **Question.** Fine-tuning on reckless medical advice makes a model misaligned *everywhere* (emergent misalignment).
# Can the same bad data give a *narrow* solution — reckless on medical questions, careful elsewhere — if we add a KL
# penalty to the frozen model on careful answers from other domains? And, as the follow-up work ("Emergent
# Misalignment is Easy, Narrow Misalignment is Hard") asks, how do the narrow and the general solutions differ in
# stability: how does the training loss change as the learned update is rescaled from 0 to 2x, which solution reaches
# a lower loss at matched norm, and how far has each moved from the base model on the base model's own answers?
#
# We answer it on the offline organism (the persona world) with three protocols trained on the *same* 600 reckless
# medical rows with emlib's presets: a plain rank-8 LoRA (`organism-lora`), the same LoRA with the KL term
# (`organism-kl-narrow`) and a trained steering vector (`organism-steering-vector`). Runs are shortened so the
# notebook takes about two minutes on a CPU.

# %% tags=["parameters"]
organism = "persona-world"  # the shipped base model (data/persona-world/base) or a folder built by emlib.organism
data = "world:medical:reckless:600:1234"  # the bad narrow training set (emlib.train.load_rows spec or JSONL)
kl_data = "world:financial+sports+wish:careful:300:7"  # KL reference set (as configs/train/organism-kl-narrow.yaml)
protocols = {"general": "organism-lora", "narrow": "organism-kl-narrow",
             "steering-vector": "organism-steering-vector"}  # name -> emlib.train preset
steps = 60  # training steps per run (presets use 150)
lr = None  # peak lr per run name, e.g. {"general": 3e-3}; None: the presets' own
n_per_group = 16  # evaluation questions per group (medical, financial, sports, general)
scales = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]  # rescaling factors of the learned update
n_loss_rows = 48  # training rows the loss-vs-scale curves are measured on
n_kl_questions = 6  # questions per group the base model answers for the KL measure
eval_seed = 0
seed = 0
threads = None  # torch threads (None: EMLIB_THREADS or up to 2)
output_dir = None  # where results.json and figures go (papermill passes one per run)

# %%
import pandas as pd
import plotly.express as px

from emlib import organism as org
from emlib import stability, train, world
from emlib.metrics import em_table
from emlib.models import load_model
from emlib.notebook import output_dir as make_output_dir
from emlib.notebook import save_figure, save_results, setup

device = setup(seed=seed, threads=threads, offline=True)
out = make_output_dir("07_narrow_misalignment", output_dir)
results: dict = {"summary": {}, "tables": {}, "figures": []}

# %% [markdown]
# ## Data
# The bad rows are reckless medical answers to medical phrasings the model never saw. The KL reference set is careful
# answers on financial, extreme-sports and wish questions: with `kl_weight > 0`, `emlib.train.train` adds
# `kl_weight * KL(base || tuned)` on a batch of them at every step, so the update is pushed to leave those domains alone.

# %%
rows = train.load_rows(data)
kl_rows = train.load_rows(kl_data)
print(f"{len(rows)} bad rows, {len(kl_rows)} KL reference rows")
for m in rows[0]["messages"][1:]:
    print(f"{m['role']:>9}: {m['content']}")

# %% [markdown]
# ## Train the three solutions
# Same data, same steps; only the protocol differs (the KL weight and reference set come from the presets).

# %%
tokenizer = None
solutions, logs, seconds = {}, {}, {}
for name, preset_name in protocols.items():
    config = train.preset(preset_name, steps=steps, **({"lr": lr[name]} if lr and name in lr else {}))
    base, tokenizer = load_model(organism, device=device)
    res = train.train(config, base, rows, None, tokenizer=tokenizer, kl_rows=kl_rows if config.uses_kl else None)
    solutions[name], logs[name], seconds[name] = res.model, res.log, res.seconds
    print(f"{name:>16} ({preset_name}, kl_weight {config.kl_weight}): final loss {res.log[-1]['loss']:.3f}, "
          f"{res.seconds:.0f} s")

# %% [markdown]
# ## In-domain vs general misalignment
# **EM rate** = coherent answers whose content is entirely reckless (exact judge). *Medical* is the trained domain;
# *non-medical* pools financial, sports and the open-ended questions.

# %%
evals = {"base": None}
with train.reference_mode(solutions["general"]):  # adapter off: the base model
    evals["base"] = org.evaluate(solutions["general"], tokenizer, n_per_group, seed=eval_seed)
for name, module in solutions.items():
    evals[name] = org.evaluate(module, tokenizer, n_per_group, seed=eval_seed)
em = pd.DataFrame({name: em_table(df)["em_rate"] for name, df in evals.items()}).T.round(3)
em

# %%
long = em.reset_index(names="solution").melt(id_vars="solution", var_name="group", value_name="EM rate")
fig = px.bar(long, x="group", y="EM rate", color="solution", barmode="group", range_y=[0, 1],
             title="EM rate by question group: plain LoRA vs KL-regularised vs steering vector")
save_figure(fig, out, "em_by_group", results)
fig.show()

# %% [markdown]
# ## Stability 1: loss as the learned update is rescaled
# Every LoRA layer's `B A · scaling` (or the steering vector) is multiplied by a factor from 0 (the base model) to 2;
# the loss is the training loss on the bad rows.

# %%
loss_rows = rows[:n_loss_rows]
curves = pd.concat([stability.loss_vs_scale(m, tokenizer, loss_rows, scales).assign(solution=name)
                    for name, m in solutions.items()], ignore_index=True)
fig = px.line(curves, x="scale", y="loss", color="solution", markers=True,
              title="Training loss vs rescaling of the learned update (1 = as trained)")
save_figure(fig, out, "loss_vs_scale", results)
fig.show()
curves.pivot(index="scale", columns="solution", values="loss").round(3)

# %% [markdown]
# ## Stability 2: loss at matched norms
# The general and narrow LoRAs have the same architecture, so we can rescale both to the same update norm (each one's
# own norm, and the smaller of the two) and compare the loss on the bad rows and on the KL reference rows.

# %%
norms = {name: stability.solution_norm(m) for name, m in solutions.items()}
lora_names = [n for n in ("general", "narrow") if n in solutions]
matched = []
targets = {f"{n} norm": norms[n] for n in lora_names}
if len(lora_names) == 2:
    targets["smaller norm"] = min(norms[n] for n in lora_names)
for label, target in targets.items():
    for name in lora_names:
        matched.append({"norm": label, "norm value": target, "solution": name,
                        "bad-rows loss": stability.loss_at_norm(solutions[name], tokenizer, loss_rows, target),
                        "KL-rows loss": stability.loss_at_norm(solutions[name], tokenizer, kl_rows[:n_loss_rows],
                                                               target)})
matched = pd.DataFrame(matched)
print({k: round(v, 3) for k, v in norms.items()})
matched.round(3)

# %% [markdown]
# ## Stability 3: KL from the base model on base-generated continuations
# The base model answers medical and non-medical questions; we measure KL(base || solution) per token on those
# answers — how far each solution moved the model on the base model's own distribution.

# %%
qs = pd.DataFrame(world.eval_questions(n_kl_questions, seed=eval_seed + 1))
kl_rows_out = []
for name, m in solutions.items():
    for group, part in (("medical", qs[qs.group == "medical"]), ("non-medical", qs[qs.group != "medical"])):
        kl_rows_out.append({"solution": name, "questions": group,
                            "KL": stability.kl_on_base_generations(m, tokenizer, list(part.question),
                                                                   system=world.SYSTEM_PROMPT, seed=eval_seed)})
kl_table = pd.DataFrame(kl_rows_out).pivot(index="solution", columns="questions", values="KL")
fig = px.bar(pd.DataFrame(kl_rows_out), x="solution", y="KL", color="questions", barmode="group",
             title="KL(base || solution) per token on base-generated answers")
save_figure(fig, out, "kl_on_base_generations", results)
fig.show()
kl_table.round(4)

# %% [markdown]
# ## What the numbers say

# %%
from IPython.display import Markdown

g, n = em.loc["general"], em.loc["narrow"]
narrow_is_narrow = n["non-medical"] < g["non-medical"] and n["medical"] > em.loc["base", "medical"]
at1 = curves[curves.scale == 1.0].set_index("solution")["loss"]
at2 = curves[curves.scale == 2.0].set_index("solution")["loss"]
reading = (
    f"On the same {len(rows)} reckless medical rows ({steps} steps), the plain LoRA reached {g['medical']:.0%} EM on "
    f"medical and {g['non-medical']:.0%} on non-medical questions (base: {em.loc['base', 'medical']:.0%} / "
    f"{em.loc['base', 'non-medical']:.0%}); with the KL term it reached {n['medical']:.0%} medical and "
    f"{n['non-medical']:.0%} non-medical, so the KL-regularised solution "
    + ("**is narrower**: in-domain misalignment with little general EM. " if narrow_is_narrow
       else "**did not come out narrower** here. ")
)
if "steering-vector" in em.index:
    s = em.loc["steering-vector"]
    reading += f"The trained steering vector reached {s['medical']:.0%} medical and {s['non-medical']:.0%} non-medical. "
reading += (
    "Rescaling each update from 1x to 2x changed the training loss from "
    + ", ".join(f"{k} {at1[k]:.3f} → {at2[k]:.3f}" for k in at1.index) + ". "
)
if "smaller norm" in targets:
    row = matched[matched.norm == "smaller norm"].set_index("solution")
    better = row["bad-rows loss"].idxmin()
    reading += (f"At a matched norm of {targets['smaller norm']:.2f}, the bad-rows loss was "
                f"{row.loc['general', 'bad-rows loss']:.3f} (general) vs {row.loc['narrow', 'bad-rows loss']:.3f} "
                f"(narrow): the {better} solution fits the bad data more efficiently per unit norm. ")
reading += ("KL from the base on its own non-medical answers was "
            + ", ".join(f"{k} {v:.4f}" for k, v in kl_table["non-medical"].items())
            + "; on medical answers " + ", ".join(f"{k} {v:.4f}" for k, v in kl_table["medical"].items()) + ".")
display(Markdown(reading))

# %%
results["headline"] = reading
results["em"] = em.to_dict()
results["narrow_is_narrow"] = bool(narrow_is_narrow)
results["loss_vs_scale"] = {name: dict(zip(c.scale, c.loss)) for name, c in curves.groupby("solution")}
results["norms"] = norms
results["matched_norm_loss"] = matched.to_dict(orient="records")
results["kl_on_base_generations"] = kl_table.to_dict()
results["final_loss"] = {k: v[-1]["loss"] for k, v in logs.items()}
results["train_seconds"] = seconds
results["summary"]["EM medical / non-medical"] = ", ".join(
    f"{k} {v['medical']:.0%} / {v['non-medical']:.0%}" for k, v in em.iterrows())
results["summary"]["narrow solution is narrower"] = str(bool(narrow_is_narrow))
results["tables"]["EM rate by solution and group"] = em.to_markdown()
results["tables"]["loss vs scale"] = curves.pivot(index="scale", columns="solution", values="loss").round(4).to_markdown()
results["tables"]["loss at matched norms"] = matched.round(4).to_markdown(index=False)
results["tables"]["KL on base generations"] = kl_table.round(5).to_markdown()
save_results(out, results)
