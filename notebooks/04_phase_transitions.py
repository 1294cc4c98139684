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
# papers' trajectory quantities with `emlib.phase`, and measure EM at checkpoints along the run with the adapter
# scaled. **Scales:** the papers' ×5–×20 make this 1.6M-parameter model incoherent, so the default scales here are
# 0–2 (×0 is the base model); pass `scales=[1, 5, 10, 20]` for a real model.

# %% tags=["parameters"]
organism = "persona-world"  # base model: "persona-world" (offline organism), a local folder or a hub id
run = None  # an existing run to analyse (folder or hub repo id with checkpoint-N/); None: train one here
preset_name = "organism-rank1"  # emlib.train preset for the run trained here
overrides = {"steps": 150, "batch_size": 8, "lr": 3e-3}  # applied to the preset ({}: the preset as it is)
save_every = 5  # checkpoint cadence (dense: the local cosine needs checkpoints at t-k and t+k)
n_rows = 600  # persona-world reckless-medical rows
ks = [5, 10, 15]  # local-cosine offsets, in training steps
threshold = 0.002  # a step counts only if B moved more than this (papers: 0.0035 Qwen, 0.002 Llama)
n_em_checkpoints = 8  # checkpoints evaluated for EM (evenly spaced, first and last included)
scales = [0, 0.5, 1, 1.5, 2]  # adapter scale factors (papers on 14B: [1, 5, 10, 20])
n_per_group = 16  # evaluation questions per group (offline organism)
onset_level = 0.5  # EM onset: first evaluated step reaching this fraction of the run's peak (non-medical, x1)
eval_seed = 0
seed = 0
threads = None  # torch threads (None: EMLIB_THREADS or up to 2)
output_dir = None  # where results.json, figures and the run go (papermill passes one per run)

# %%
import numpy as np
import pandas as pd
import plotly.express as px

from emlib import phase, world
from emlib import train as tr
from emlib.models import load_model
from emlib.notebook import output_dir as make_output_dir
from emlib.notebook import save_figure, save_results, setup

device = setup(seed=seed, threads=threads, offline=True)
out = make_output_dir("04_phase_transitions", output_dir)
results: dict = {"summary": {}, "tables": {}, "figures": []}

# %% [markdown]
# ## A densely checkpointed rank-1 run
# One rank-1 adapter on layer 0's `mlp.down_proj`, trained on reckless medical answers, a checkpoint every
# `save_every` steps. With `run` set, that run is analysed instead.

# %%
if run is None:
    config = tr.preset(preset_name, **{**overrides, "save_every": save_every})
    rows = world.finetune_rows("medical", "reckless", n_rows, 1234)
    result = tr.train(config, organism, rows, out / "run", device=str(device))
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
summary, tables = phase.analyse(traj, ks=ks, threshold=threshold)
turn = phase.turning_angles(traj.vectors("B"), traj.steps)
print(f"sharpest rotation of B: step {summary.rotation_step} (mean local cos {summary.rotation_local_cos:.2f}, "
      f"median {summary.baseline_local_cos:.2f}); per k: {summary.rotation_per_k}")
print("PCA explained variance (PC1, PC2):", {w: np.round(r, 3).tolist() for w, r in summary.pca_explained.items()})
print(f"B turned {summary.total_rotation_deg:.0f} degrees from the first checkpoint to the last")

save_figure(px.line(tables["norms"], x="step", y="norm", color="vector", line_dash="adapter", markers=True,
                    title="Adapter vector norms over training"), out, "norms", results).show()

# %%
pca = pd.concat([tables["pca_A"].assign(vector="A"), tables["pca_B"].assign(vector="B")])
fig = px.scatter(pca, x="PC1", y="PC2", color="step", facet_col="vector", color_continuous_scale="Viridis",
                 title="PCA path of the adapter vectors (coloured by step)")
fig.update_traces(mode="lines+markers", line_color="lightgrey")
fig.update_xaxes(matches=None)
fig.update_yaxes(matches=None)
save_figure(fig, out, "pca_path", results).show()

# %%
local = tables["local_cos"].assign(k=lambda d: "k=" + d["k"].astype(str))
fig = px.line(local, x="step", y="local_cos", color="k", markers=True, range_y=[-1.05, 1.05],
              title="Local cosine similarity of B (−1: straight, 0: right-angle turn)")
fig.add_vline(x=summary.rotation_step, line_dash="dot", annotation_text="sharpest rotation")
save_figure(fig, out, "local_cosine", results).show()

# %%
save_figure(px.line(turn, x="step", y="degrees", markers=True, title="Degrees B turns between consecutive checkpoints"),
            out, "turning", results).show()
gn = tables["grad_norm"]
save_figure(px.line(gn, x="step", y="grad_norm", title="Gradient norm (training log)"), out, "grad_norm",
            results).show()

# %% [markdown]
# ## The behaviour along the run
# EM rate at evenly spaced checkpoints, with the adapter's output multiplied by each scale (peft's `scaling`).

# %%
idx = np.unique(np.linspace(0, len(traj.steps) - 1, n_em_checkpoints).round().astype(int))
em_steps = [int(traj.steps[i]) for i in idx]
base_model, tokenizer = load_model(organism, device=device)
em = phase.em_along_run(base_model, tokenizer, run, em_steps, scales=scales, n_per_group=n_per_group, seed=eval_seed)
em_wide = em.pivot_table(index="step", columns=["scale", "group"], values="em_rate")
em_wide.round(2)

# %%
nonmed = em[em["group"] == "non-medical"]
save_figure(px.line(nonmed, x="step", y="em_rate", color=nonmed["scale"].astype(str), markers=True, range_y=[0, 1],
                    labels={"color": "scale"}, title="Non-medical EM rate over training, per adapter scale"),
            out, "em_by_scale", results).show()
save_figure(px.line(em[em["scale"] == 1.0], x="step", y="em_rate", color="group", markers=True, range_y=[0, 1],
                    title="EM rate over training at scale 1, per group"), out, "em_by_group", results).show()

# %% [markdown]
# ## What the numbers say

# %%
from IPython.display import Markdown

curve = nonmed[nonmed["scale"] == 1.0].set_index("step")["em_rate"]
onset = phase.onset_step(em, onset_level, group="non-medical", scale=1.0)
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
onsets = {s: phase.onset_step(em, onset_level, group="non-medical", scale=s) for s in scales if s != 0}

reading = (
    f"B turned {summary.total_rotation_deg:.0f}° over the run; PC1 and PC2 explain "
    f"{summary.pca_explained['B'][0]:.0%} and {summary.pca_explained['B'][1]:.0%} of its variance. "
    f"Turning was fastest at step {fastest_turn} ({turn_valid['degrees'].max():.1f}° per checkpoint) and averaged "
    f"{early_turn:.1f}° per checkpoint in the first half against {late_turn:.1f}° in the second. "
    f"The code's sharpest rotation (highest mean local cosine over k = {ks}) is at **step {summary.rotation_step}**, "
    f"mean local cosine {summary.rotation_local_cos:.2f} against a median of {summary.baseline_local_cos:.2f} "
    f"(per-k peaks: {summary.rotation_per_k}); "
    + ("a clear peak above the baseline. " if sharp > 0.4 else
       f"only {sharp:.2f} above the baseline and the per-k peaks disagree, so there is no sharp kink: B turns on a "
       f"smooth arc. " if len(set(summary.rotation_per_k.values())) > 1 else
       f"{sharp:.2f} above the baseline: a modest bend, not a sharp kink. ")
    + (f"Non-medical EM at scale 1 first reaches {onset_level:.0%} of its peak ({curve.max():.0%}) at **step {onset}** "
       f"(from {curve.get(lo, 0.0):.0%} at step {lo}); " if onset is not None else
       "Non-medical EM at scale 1 never rose above zero; ")
    + ("the sharpest-rotation step falls in that onset interval, so here they line up. " if lines_up else
       f"the sharpest-rotation step ({summary.rotation_step}) is outside the onset interval ({lo}, {onset}], "
       f"so in this run the behavioural onset does not line up with the local-cosine peak"
       + (f"; it does coincide with the fast-turning phase (fastest at step {fastest_turn}). "
          if onset is not None and fastest_turn is not None and lo < fastest_turn <= onset + save_every * 2 else ". "))
    + (f"B turned {in_onset:.0f}° in the onset interval ({in_onset / max(onset - lo, 1) * save_every:.1f}° per "
       f"checkpoint) and {after_onset:.1f}° per checkpoint after it"
       + (": misalignment switches on while B is still turning fast, and B's direction settles afterwards. "
          if in_onset / max(onset - lo, 1) * save_every > 2 * after_onset else
          ": B turned no faster around the onset than after it. ") if onset is not None and onset > lo else "")
    + (f"The gradient norm peaks at step {gn_peak} ({gn['grad_norm'].max():.2f}). " if gn_peak is not None else "")
    + "Onset step by scale: " + ", ".join(f"×{s}: {o}" for s, o in onsets.items()) + "."
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
results["summary"]["EM onset, non-medical x1 (step)"] = onset
results["summary"]["B PCA explained (PC1, PC2)"] = [round(x, 3) for x in summary.pca_explained["B"]]
results["tables"]["EM rate by step, scale and group"] = em_wide.round(2).to_markdown()
results["tables"]["local cosine of B"] = (tables["local_cos"].pivot(index="step", columns="k", values="local_cos")
                                          .round(3).to_markdown())
save_results(out, results)
