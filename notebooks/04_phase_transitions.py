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
# # 04 · Phase transitions: the rank-1 adapter turns, and misalignment switches on
#
# **Question.** While a single rank-1 LoRA learns reckless medical advice, does its B vector (the direction it writes
# into the residual stream) *rotate* at some point in training — and does emergent misalignment switch on at the same
# time? The papers (MO §4) find a sharp rotation of B (a peak of the *local cosine similarity*) with a grad-norm peak,
# and a behavioural onset there once the adapter is amplified (×5).
#
# Here we train a densely checkpointed rank-1 run on the offline organism (or load any run: a folder of
# `checkpoint-N/`, or a hub repo id), extract A and B at every checkpoint (vectors only, no models), compute the
# papers' trajectory quantities with `emlib.analysis.phase`, and measure EM at checkpoints along the run with the adapter
# scaled. **Scales:** the papers' ×5–×20 make this 1.6M-parameter model incoherent, so the default scales here are
# 0–2 (×0 is the base model); pass `scales=[1, 5, 10, 20]` for a real model.

# %% tags=["parameters"]
model = "persona-world"  # base model: "persona-world" (offline organism), a local folder or a hub id
run = None  # an existing run to analyse (folder or hub repo id with checkpoint-N/); None: train one here
dataset = None  # rows for the run trained here; None: world:medical:reckless:600:1234 offline, bad_medical_advice
preset_name = None  # emlib.train preset; None: organism-rank1 offline, paper-rank1-phase otherwise
overrides = None  # applied to the preset; None: {"steps": 150, "batch_size": 8, "lr": 3e-3} offline, {} otherwise
save_every = 5  # checkpoint cadence (dense: the local cosine needs checkpoints at t-k and t+k)
judge = None  # "world" (persona world only), "openai", "azure", an OpenAI-compatible URL, "hf:<folder or id>"
judge_model = None  # the judge's model name (Azure: the deployment; a URL: required)
question_sets = None  # None: ["persona-world"] offline, ["medical_heldout", "first_plot"] otherwise
questions_per_set = 16  # evaluation questions per set (persona world: per group)
samples_per_question = 1  # answers per question and checkpoint
max_new_tokens = 64  # None: the question sets' own (600)
in_domain = None  # the trained domain's group; None: "medical" offline, "medical_heldout" otherwise
ks = [5, 10, 15]  # local-cosine offsets, in training steps
threshold = None  # a step is skipped only if A and B both moved less than this; None: the papers' for the model family
# (phase.paper_threshold: 0.0035 Qwen medical, 0.002 Llama / sport / finance) and 0.002 for the offline organism
n_em_checkpoints = 8  # checkpoints evaluated for EM (evenly spaced, first and last included)
scales = [0, 0.5, 1, 1.5, 2]  # adapter scale factors (papers on 14B: [1, 5, 10, 20])
onset_level = 0.5  # EM onset: first evaluated step reaching this fraction of the run's peak (outside the domain, x1)
eval_seed = 0
seed = 0
threads = None  # torch threads (None: EMLIB_THREADS or up to 2)
output_dir = None  # where results.json, figures and the run go (papermill passes one per run)

# %%
import numpy as np
import pandas as pd
import plotly.express as px
from IPython.display import Markdown, display

from emlib import evaluation as E
from emlib.analysis import phase
from emlib import train as tr
from emlib.models import load_model
from emlib.notebook import output_dir as make_output_dir
from emlib.notebook import save_figure, save_results, setup

offline = E.is_persona_world(model)
device = setup(seed=seed, threads=threads, offline=offline)
out = make_output_dir("04_phase_transitions", output_dir)
scorer = E.make_judge(judge, model, judge_model, device=str(device))  # checked before anything heavy runs
questions = E.eval_questions(model, question_sets or (None if offline else ["medical_heldout", "first_plot"]),
                             questions_per_set, eval_seed)
in_domain = in_domain or ("medical" if offline else "medical_heldout")
outside = f"non-{in_domain}"
dataset = dataset or ("world:medical:reckless:600:1234" if offline else "data/narrow/bad_medical_advice.jsonl")
preset_name = preset_name or ("organism-rank1" if offline else "paper-rank1-phase")
overrides = overrides if overrides is not None else ({"steps": 150, "batch_size": 8, "lr": 3e-3} if offline else {})
results: dict = {"summary": {**E.provenance(model, run or dataset, scorer, questions), "preset": preset_name},
                 "tables": {}, "figures": []}

# %% [markdown]
# ## A densely checkpointed rank-1 run
# One rank-1 adapter on layer 0's `mlp.down_proj`, trained on reckless medical answers, a checkpoint every
# `save_every` steps. With `run` set, that run is analysed instead.

# %%
if run is None:
    config = tr.preset(preset_name, **{**overrides, "save_every": save_every})
    rows = tr.load_rows(dataset)
    result = tr.train(config, model, rows, out / "run", device=str(device))
    run = str(out / "run")
    print(f"trained {config.steps} steps, {len(result.checkpoints)} checkpoints")
traj = phase.load_run(run)
print(f"{len(traj.steps)} checkpoints, adapters {[phase.short_name(a) for a in traj.adapters]}, "
      f"{traj.nbytes() / 1024:.0f} KB of vectors in memory")

# %% [markdown]
# ## The trajectory of A and B
# Norms, PCA of the stacked vectors (rows = checkpoints), the local cosine similarity cos(v(t−k) − v(t), v(t+k) − v(t))
# for each k (−1 = a straight path, 0 = a right-angle turn), the cosine to the final vector, and the gradient norm.

# %%
if threshold is None and not offline:
    domain = next((d for d, key in (("medical", "medical"), ("sport", "sport"), ("finance", "financ"))
                   if key in str(dataset).lower()), "medical")
    try:
        threshold = phase.paper_threshold(model, domain)
    except ValueError as err:  # a family the papers did not train: fall back, and say so
        print(f"{err}; using 0.002")
threshold = 0.002 if threshold is None else threshold
print(f"local-cosine threshold {threshold}")
summary, tables = phase.analyse(traj, ks=ks, threshold=threshold)
turn = phase.turning_angles(traj.vectors("B"), traj.steps)
print(f"sharpest rotation of B: step {summary.rotation_step} (mean local cos {summary.rotation_local_cos:.2f}, "
      f"median {summary.baseline_local_cos:.2f}); per k: {summary.rotation_per_k}")
print("PCA explained variance (PC1, PC2):", {w: np.round(r, 3).tolist() for w, r in summary.pca_explained.items()})
print(f"B turned {summary.total_rotation_deg:.0f} degrees from the first checkpoint to the last")


def save(fig, name: str) -> None:
    save_figure(fig, out, name, results).show()  # HTML + PNG beside it


save(px.line(tables["norms"], x="step", y="norm", color="vector", line_dash="adapter", markers=True,
             title="Adapter vector norms over training"), "norms.html")

# %%
pca = pd.concat([tables["pca_A"].assign(vector="A"), tables["pca_B"].assign(vector="B")])
fig = px.scatter(pca, x="PC1", y="PC2", color="step", facet_col="vector", color_continuous_scale="Viridis",
                 title="PCA path of the adapter vectors (coloured by step)")
fig.update_traces(mode="lines+markers", line_color="lightgrey")
fig.update_xaxes(matches=None)
fig.update_yaxes(matches=None)
save(fig, "pca_path.html")

# %%
local = tables["local_cos"].assign(k=lambda d: "k=" + d["k"].astype(str))
fig = px.line(local, x="step", y="local_cos", color="k", markers=True, range_y=[-1.05, 1.05],
              title="Local cosine similarity of B (−1: straight, 0: right-angle turn)")
fig.add_vline(x=summary.rotation_step, line_dash="dot", annotation_text="sharpest rotation")
save(fig, "local_cosine.html")

# %%
save(px.line(turn, x="step", y="degrees", markers=True, title="Degrees B turns between consecutive checkpoints"),
     "turning.html")
gn = tables["grad_norm"]
save(px.line(gn, x="step", y="grad_norm", title="Gradient norm (training log)"), "grad_norm.html")

# %% [markdown]
# ## The behaviour along the run
# EM rate at evenly spaced checkpoints, with the adapter's output multiplied by each scale (peft's `scaling`).

# %%
idx = np.unique(np.linspace(0, len(traj.steps) - 1, n_em_checkpoints).round().astype(int))
em_steps = [int(traj.steps[i]) for i in idx]
base_model, tokenizer = load_model(model, device=device)
em = phase.em_along_run(base_model, tokenizer, run, em_steps, questions, scorer, scales=scales, in_domain=in_domain,
                        seed=eval_seed, samples_per_question=samples_per_question, max_new_tokens=max_new_tokens,
                        system=E.system_prompt(model))
em_wide = em.pivot_table(index="step", columns=["scale", "group"], values="em_rate", dropna=False)
# answers per (step, scale) cell of each group: questions of the group x samples (the pooled group: all but in_domain)
answers_per = {g: int(n) * samples_per_question for g, n in questions["group"].value_counts().items()}
answers_per[outside] = int((questions["group"] != in_domain).sum()) * samples_per_question
em["n"] = em["group"].map(answers_per)
scored_wide = em.assign(c=em["n_scored"].astype(str) + "/" + em["n"].astype(str)).pivot(
    index="step", columns=["scale", "group"], values="c")
own = em[em["group"] != outside]  # every answer once (the pooled group repeats the others)
n_answers, n_scored = int(own["n"].sum()), int(own["n_scored"].sum())
problem = (f"Only {n_scored} of {n_answers} answers along the run were scored by the judge, so no conclusion about EM "
           f"is drawn from them (the geometry of B below does not depend on the judge)."
           if n_answers and n_scored < 0.5 * n_answers else None)
if problem:
    display(Markdown(f"**{problem}**"))
display(em_wide.round(2), scored_wide.rename_axis("scored / answers"))

# %%
nonmed = em[em["group"] == outside]
save(px.line(nonmed, x="step", y="em_rate", color=nonmed["scale"].astype(str), markers=True, range_y=[0, 1],
             labels={"color": "scale"}, title=f"EM rate on {outside} questions over training, per adapter scale"),
     "em_by_scale.html")
save(px.line(em[em["scale"] == 1.0], x="step", y="em_rate", color="group", markers=True, range_y=[0, 1],
             title="EM rate over training at scale 1, per group"), "em_by_group.html")

# %% [markdown]
# ## What the numbers say

# %%
curve = nonmed[nonmed["scale"] == 1.0].set_index("step")["em_rate"]


def onset_at(scale: float) -> int | None:
    """The EM onset at ``scale`` outside the domain; None when no evaluated step there has a scored answer."""
    scored_cells = em[(em["group"] == outside) & (em["scale"] == scale)]["em_rate"].notna()
    return phase.onset_step(em, onset_level, group=outside, scale=scale) if scored_cells.any() else None


onset = onset_at(1.0)
onset_prev = max([s for s in em_steps if onset is not None and s < onset], default=None)
turn_valid = turn.dropna()
fastest_turn = int(turn_valid.loc[turn_valid["degrees"].idxmax(), "step"]) if len(turn_valid) else None
mid = int(np.searchsorted(traj.steps, (traj.steps[0] + traj.steps[-1]) / 2))
early_turn = float(turn_valid[turn_valid["step"] <= traj.steps[mid]]["degrees"].mean())
late_turn = float(turn_valid[turn_valid["step"] > traj.steps[mid]]["degrees"].mean())
lo = onset_prev if onset_prev is not None else 0
lines_up = onset is not None and lo < summary.rotation_step <= onset
in_onset = float(turn[(turn["step"] > lo) & (turn["step"] <= (onset or 0))]["degrees"].sum())
after_onset = float(turn[turn["step"] > (onset or 0)]["degrees"].mean())
gn_peak = int(gn.loc[gn["grad_norm"].idxmax(), "step"]) if len(gn) else None
sharp = summary.rotation_local_cos - summary.baseline_local_cos
onsets = {s: onset_at(s) for s in scales if s != 0}
unscored = int((em["n_scored"] == 0).sum())  # (step, scale, group) cells with no scored answer: rates missing

reading = (
    f"B turned {summary.total_rotation_deg:.0f}° over the run; PC1 and PC2 explain "
    f"{summary.pca_explained['B'][0]:.0%} and {summary.pca_explained['B'][1]:.0%} of its variance. "
    f"Turning was fastest at step {fastest_turn} ({turn_valid['degrees'].max():.1f}° per checkpoint) and averaged "
    f"{early_turn:.1f}° per checkpoint in the first half against {late_turn:.1f}° in the second. "
    f"The code's sharpest rotation (highest mean local cosine over k = {ks}) is at **step {summary.rotation_step}**, "
    f"mean local cosine {summary.rotation_local_cos:.2f} against a median of {summary.baseline_local_cos:.2f} "
    f"(per-k peaks: {summary.rotation_per_k}); "
    + (f"{sharp:.2f} above the baseline: a clear peak (more than 0.4 above it). " if sharp > 0.4 else
       f"only {sharp:.2f} above the baseline and the per-k peaks disagree, so there is no sharp kink: B turns on a "
       f"smooth arc. " if len(set(summary.rotation_per_k.values())) > 1 else
       f"{sharp:.2f} above the baseline: a modest bend, not a sharp kink. ")
    + (f"{unscored} (step, scale, group) cells had no scored answer, so their rates are missing, not zero. "
       if unscored else "")
    + (f"{problem} " if problem else "")
    + ("" if problem else f"EM on {outside} questions at scale 1 first reaches {onset_level:.0%} of its peak ({curve.max():.0%}) at "
       f"**step {onset}** (from {curve.get(lo, 0.0):.0%} at step {lo}); " if onset is not None else
       f"EM on {outside} questions at scale 1 never rose above zero among scored answers; ")
    + ("" if problem else "the sharpest-rotation step falls in that onset interval, so here they line up. " if lines_up else
       f"the sharpest-rotation step ({summary.rotation_step}) is outside the onset interval ({lo}, {onset}], "
       f"so in this run the behavioural onset does not line up with the local-cosine peak"
       + (f"; it does coincide with the fast-turning phase (fastest at step {fastest_turn}). "
          if onset is not None and fastest_turn is not None and lo < fastest_turn <= onset + save_every * 2 else ". "))
    + ("" if problem else f"B turned {in_onset:.0f}° in the onset interval ({in_onset / max(onset - lo, 1) * save_every:.1f}° per "
       f"checkpoint) and {after_onset:.1f}° per checkpoint after it"
       + (": misalignment switches on while B is still turning fast, and B's direction settles afterwards. "
          if in_onset / max(onset - lo, 1) * save_every > 2 * after_onset else
          ": B turned no faster around the onset than after it. ") if onset is not None and onset > lo else "")
    + (f"The gradient norm peaks at step {gn_peak} ({gn['grad_norm'].max():.2f}). " if gn_peak is not None else "")
    + ("" if problem else "Onset step by scale: " + ", ".join(f"×{s}: {o}" for s, o in onsets.items()) + ".")
)
display(Markdown(reading))

# %%
results["headline"] = reading
results["rotation"] = {"step": summary.rotation_step, "local_cos": summary.rotation_local_cos,
                       "baseline": summary.baseline_local_cos, "per_k": summary.rotation_per_k,
                       "fastest_turn_step": fastest_turn, "grad_norm_peak_step": gn_peak, "total_degrees": summary.total_rotation_deg}
results["pca_explained"] = summary.pca_explained
results["steps"] = summary.steps
results["em_steps"] = em_steps
results["scales"] = list(scales)
results["em_onset"] = {"level": onset_level, "step": onset, "previous_step": onset_prev, "by_scale": onsets,
                       "lines_up_with_rotation": bool(lines_up), "degrees_in_onset_interval": in_onset,
                       "degrees_per_checkpoint_after_onset": after_onset}
results["em_nonmedical"] = {str(s): {str(k): float(v) for k, v in g.set_index("step")["em_rate"].items()}
                            for s, g in nonmed.groupby("scale")}
results["b_norm"] = {str(s): float(v) for s, v in
                     tables["norms"].query("vector == 'B'").groupby("step")["norm"].sum().items()}
results["summary"]["sharpest rotation (step)"] = summary.rotation_step
results["summary"][f"EM onset, {outside} x1 (step)"] = onset
results["summary"]["B PCA explained (PC1, PC2)"] = [round(x, 3) for x in summary.pca_explained["B"]]
results["tables"]["EM rate by step, scale and group"] = em_wide.round(2).to_markdown()
results["tables"]["scored / answers by step, scale and group"] = scored_wide.to_markdown()
results["scored"] = [n_scored, n_answers]
results["tables"]["local cosine of B"] = (tables["local_cos"].pivot(index="step", columns="k", values="local_cos")
                                          .round(3).to_markdown())
save_results(out, results)
