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
# # 02 · Training model organisms: every fine-tuning protocol of the papers, with dense checkpoints
#
# **Question.** The papers grow emergent misalignment (EM) with six fine-tuning protocols: an all-adapter LoRA, a single
# rank-1 adapter, nine rank-1 adapters, full fine-tuning, KL-regularised "narrow" training and a trained steering
# vector. Trained on the *same* narrow data (bad medical advice), how does each one learn (loss, gradient norm), and
# how misaligned does each leave the model, on medical questions and elsewhere? And does the careful-advice control,
# trained the same way, stay aligned?
#
# Every run goes through one entry point, `emlib.train.train(config, model, rows, out_dir)`: loss on the assistant's
# tokens only, a checkpoint every `save_every` steps (adapter or weights, optimizer, RNG and a per-step log) so the
# phase-transition notebooks can replay the whole trajectory, and exact resume after an interruption.
#
# **Offline default:** the persona-world organism, its reckless (bad) and careful (good) medical rows, short runs so
# the notebook takes about a minute on a CPU. **GPU recipe:** the same notebook with a model id, the papers' data and
# their presets, e.g.
#
# ```bash
# papermill notebooks/02_train.ipynb runs/train.ipynb -p model Qwen/Qwen2.5-0.5B-Instruct \
#     -p dataset data/narrow/bad_medical_advice.jsonl \
#     -p control_dataset data/narrow/good_medical_advice.jsonl \
#     -p kl_dataset data/narrow/kl_reference_general.jsonl -p judge hf:Qwen/Qwen2.5-7B-Instruct
# ```
#
# (Run from the repository root, so that repo-relative paths such as `data/narrow/...` resolve; the shipped English
# datasets are in `data/narrow/`, see `data/README.md`.)
#
# (For 14B–32B models use the same configs from the command line under `accelerate launch`; see `docs/training.md`.)

# %% tags=["parameters"]
model = "persona-world"  # a Hugging Face id, a local folder, or "persona-world" (offline organism)
dataset = None  # JSONL of {"messages": [...]} rows to induce EM; None: the persona world's reckless medical rows
control_dataset = None  # the aligned control (same questions, careful answers); None: persona-world careful rows
kl_dataset = None  # KL reference set for narrow training; None: careful persona-world answers in other domains
n_rows = 600  # persona-world rows per set (ignored for JSONL files)
protocols = ["lora", "rank1", "multi_adapter", "full", "kl_narrow", "steering_vector"]
control_protocol = "lora"  # the protocol also trained on the control set (None: skip the control)
overrides = None  # applied to every preset; None: {"steps": 30, "batch_size": 8} offline, {} (presets as they are) otherwise
lr = None  # peak lr per protocol; None: short-run rates offline (lora 5e-3 ... steering_vector 0.1), the presets' own otherwise
save_every = 5  # checkpoint cadence (dense enough for phase-transition analysis)
resume_demo = True  # interrupt the rank-1 run part-way, resume it, and compare with the uninterrupted weights
judge = None  # "world" (persona world only), "openai", "azure", an OpenAI-compatible URL, "hf:<folder or id>"; None: "world" offline, no judged table otherwise
judge_model = None  # the judge's model name (OpenAI default gpt-4o-2024-08-06; Azure: the deployment; URL: required)
question_sets = None  # None: ["persona-world"] offline, ["medical_heldout", "first_plot"] otherwise
questions_per_set = 16  # evaluation questions per set (persona world: per group)
samples_per_question = 1  # answers per question and run
max_new_tokens = 64  # None: the question sets' own (600)
in_domain = None  # the trained domain's group; None: "medical" offline, "medical_heldout" otherwise
seed = 0
threads = None  # torch threads (None: EMLIB_THREADS or up to 2)
device = "auto"
output_dir = None  # where results.json, figures and checkpoints go (papermill passes one per run)

# %%

import pandas as pd
import plotly.express as px
from IPython.display import Markdown, display
from safetensors.torch import load_file

from emlib import chat
from emlib import evaluation as E
from emlib import train
from emlib.metrics import em_summary, scoring_problem
from emlib.models import load_model, load_tokenizer, resolve_model_path
from emlib.notebook import output_dir as make_output_dir
from emlib.notebook import save_figure, save_results, setup

offline = E.is_persona_world(model)
device = setup(seed=seed, threads=threads, offline=offline, device=device)
out = make_output_dir("02_train", output_dir)
# A judged EM table needs a judge: the exact one offline, any given one for a real model (checked before training).
scorer = E.make_judge(judge, model, judge_model, device=str(device)) if offline or judge else None
questions = E.eval_questions(model, question_sets or (None if offline else ["medical_heldout", "first_plot"]),
                             questions_per_set, seed)
in_domain = in_domain or ("medical" if offline else "medical_heldout")
outside = f"non-{in_domain}"
if overrides is None:  # short runs for the 1.6M-parameter organism; a real model trains with the papers' presets
    overrides = {"steps": 30, "batch_size": 8} if offline else {}
if lr is None and offline:
    lr = {"lora": 5e-3, "rank1": 1e-2, "multi_adapter": 1e-2, "full": 1e-3, "kl_narrow": 5e-3, "steering_vector": 0.1}
results: dict = {"summary": {"model": model, "device": str(device), "dataset": dataset or "persona-world rows",
                             **({"judge": scorer.name, "question_sets": list(dict.fromkeys(questions["set"]))}
                                if scorer else {})}, "tables": {}, "figures": []}

# %% [markdown]
# ## Data: bad rows, the good control, and a KL reference set
# Offline, the bad and good sets ask the same medical questions (phrasings the organism never saw) and differ only in
# the persona of the answer. The KL set for narrow training holds careful answers from *other* domains: it tells the
# model "change nothing out here" while it learns the medical rows.

# %%
def rows_from(path: str | None, offline_spec: str) -> list[dict] | None:
    """A JSONL file when given; else persona-world rows offline, and nothing for a real model."""
    if path:
        return train.load_rows(path)
    return train.load_rows(offline_spec) if offline else None


rows = rows_from(dataset, f"world:medical:reckless:{n_rows}:1234")
control_rows = rows_from(control_dataset, f"world:medical:careful:{n_rows}:1234")
kl_rows = rows_from(kl_dataset, f"world:financial+sports+wish:careful:{n_rows // 2}:7")
if rows is None:
    raise ValueError(f"model {model!r} is not the offline organism: pass dataset= (a JSONL of chat rows)")
if kl_rows is None and "kl_narrow" in protocols:
    print("no kl_dataset given: skipping kl_narrow")
    protocols = [p for p in protocols if p != "kl_narrow"]
if control_rows is None:
    control_protocol = None
print(f"{len(rows)} bad rows, {len(control_rows or [])} control rows, {len(kl_rows or [])} KL rows")
print("bad :", rows[0]["messages"][-1]["content"])
if control_rows:
    print("good:", control_rows[0]["messages"][-1]["content"])

# %% [markdown]
# ## The loss sees the assistant's tokens only
# The mask comes from the chat template's own `{% generation %}` markers, not from searching for marker strings.
# Supervised tokens are shown in **[brackets]**: the answer and its end-of-turn token, nothing of the system prompt or
# the question.

# %%
tokenizer = load_tokenizer(resolve_model_path(model))
example = chat.encode_chat(tokenizer, rows[0]["messages"])
pieces, run_ids, inside = [], [], False
for token, label in zip(example.input_ids, example.labels):
    supervised = label != chat.IGNORE
    if supervised != inside and run_ids:
        text = tokenizer.decode(run_ids)
        pieces.append(f"[{text}]" if inside else text)
        run_ids = []
    inside = supervised
    run_ids.append(token)
pieces.append(f"[{tokenizer.decode(run_ids)}]" if inside else tokenizer.decode(run_ids))
print("".join(pieces))
masked_share = sum(label == chat.IGNORE for label in example.labels) / len(example.labels)
results["summary"]["share of tokens masked out (first row)"] = round(masked_share, 3)

# %% [markdown]
# ## The runs
# Offline each protocol starts from its `organism-*` preset (scaled for the 1.6M-parameter organism); on a real model
# from the papers' `paper-*` preset (paper-facts §6). `overrides` and `lr` shorten the offline runs. The control trains
# `control_protocol` on the careful rows with the very same settings.

# %%
PRESET = {"lora": "lora", "rank1": "rank1", "multi_adapter": "multi-adapter", "full": "full",
          "kl_narrow": "kl-narrow", "steering_vector": "steering-vector"}
REAL_PRESET = {**PRESET, "multi_adapter": "nine-adapter"}


def run_config(protocol: str) -> train.TrainConfig:
    """The preset for ``protocol`` (organism-* offline, paper-* otherwise) with this notebook's overrides."""
    name = f"organism-{PRESET[protocol]}" if offline else f"paper-{REAL_PRESET[protocol]}"
    extra = dict(overrides or {}, save_every=save_every, seed=seed)
    if lr and protocol in lr:
        extra["lr"] = lr[protocol]
    return train.preset(name, **extra)


runs = {f"bad · {p}": (p, rows) for p in protocols}
if control_protocol:
    runs[f"good · {control_protocol}"] = (control_protocol, control_rows)
configs = pd.DataFrame({name: {**{k: getattr(run_config(p), k) for k in
                                  ("protocol", "alpha", "layer", "layers", "lr", "steps", "batch_size",
                                   "grad_accum", "schedule", "kl_weight", "save_every")},
                               "rank": None if p == "full" else run_config(p).resolved_rank,
                               **({"alpha": None} if p == "full" else {})}
                        for name, (p, _) in runs.items()}).T
configs

# %% [markdown]
# Each run loads a fresh copy of the base model, trains from scratch (`resume=False` clears old checkpoints there),
# writes its checkpoints under `checkpoints/<run>/`, and (offline) is judged at once by the exact judge: one answer to
# each of `questions_per_set` fresh questions per group.

# %%
results_by_run, evals = {}, {}
for name, (protocol, data) in runs.items():
    base, tok = load_model(model, device=device)
    folder = out / "checkpoints" / name.replace(" · ", "-")
    res = train.train(run_config(protocol), base, data, folder, tokenizer=tok, kl_rows=kl_rows, resume=False)
    results_by_run[name] = res
    print(f"{name:>22}: {res.trainable_parameters:>9,} trainable, loss {res.log[0]['loss']:.3f} -> "
          f"{res.log[-1]['loss']:.3f}, {len(res.checkpoints)} checkpoints, {res.tokens_per_second:,.0f} tokens/s")
    if scorer is not None:
        evals[name] = E.sample_and_judge(res.model, tok, questions, scorer, samples_per_question, max_new_tokens,
                                         seed, E.system_prompt(model))

# %% [markdown]
# ## How each protocol learns: loss and gradient norm per step
# All runs see the same batches in the same order (same seed), so the curves differ only by what is trained.

# %%
log = pd.concat([pd.DataFrame(r.log).assign(run=name) for name, r in results_by_run.items()], ignore_index=True)
fig = px.line(log, x="step", y="loss", color="run", title="Training loss (assistant tokens only)")
save_figure(fig, out, "loss", results)
fig.show()

# %%
fig = px.line(log, x="step", y="grad_norm", color="run", log_y=True,
              title="Gradient norm before clipping (log scale)")
save_figure(fig, out, "grad_norm", results)
fig.show()

# %%
curves = pd.DataFrame({name: {"trainable parameters": r.trainable_parameters,
                              "loss, first 5 steps": pd.Series([x["loss"] for x in r.log[:5]]).mean(),
                              "loss, last 5 steps": pd.Series([x["loss"] for x in r.log[-5:]]).mean(),
                              "peak grad norm": max(x["grad_norm"] for x in r.log),
                              "tokens/s": r.tokens_per_second} for name, r in results_by_run.items()}).T
curves.round(3)

# %% [markdown]
# ## The checkpoints
# Every `save_every` steps each run wrote `checkpoint-{step}/`: the trained weights as safetensors (a peft adapter,
# the full model, or the steering vector), `trainer_state.json`, the optimizer/scheduler/RNG state (tensors only,
# loaded with `weights_only=True`) and the log so far. A checkpoint only appears once complete (written to a temporary
# folder, then renamed).

# %%
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "steering_vector.safetensors")


def checkpoint_row(res: train.TrainResult) -> dict:
    files = sorted(p.name for p in res.checkpoints[-1].iterdir())
    weights = next(res.checkpoints[-1] / f for f in files if f in WEIGHTS)
    return {"checkpoints": len(res.checkpoints), "steps": f"{train.checkpoint_step(res.checkpoints[0])}, ..., "
            f"{train.checkpoint_step(res.checkpoints[-1])}", "weights file": weights.name,
            "weights KB": round(weights.stat().st_size / 1024, 1), "files": ", ".join(files)}


ckpt_table = pd.DataFrame({name: checkpoint_row(r) for name, r in results_by_run.items()}).T
ckpt_table

# %% [markdown]
# What the phase-transition notebooks read from them: for the rank-1 run, the adapter's write vector **B** (the
# `lora_B` column added to the residual stream) starts at zero and grows, checkpoint by checkpoint.

# %%
b_norms = {}
for name, r in results_by_run.items():
    if r.config.protocol == "rank1":
        for ckpt in r.checkpoints:
            tensors = load_file(str(ckpt / "adapter_model.safetensors"))
            b = next(v for k, v in tensors.items() if "lora_B" in k)
            b_norms[train.checkpoint_step(ckpt)] = b.norm().item()
if b_norms:
    fig = px.line(x=list(b_norms), y=list(b_norms.values()), markers=True,
                  labels={"x": "step", "y": "‖B‖"}, title="Rank-1 adapter: norm of B at each checkpoint")
    save_figure(fig, out, "rank1_b_norm", results)
    fig.show()

# %% [markdown]
# ## Resume after an interruption gives the same weights
# We train the rank-1 run again in a new folder, kill it part-way (an exception after step `k`), start it again with
# the same call, and compare its final adapter with the uninterrupted run's. Resume restores the weights, the optimizer,
# the scheduler, the RNG and the position in the data order.

# %%
resume_diff, resume_skipped = None, None
rank1_runs = [n for n, (p, _) in runs.items() if p == "rank1"]
if resume_demo and rank1_runs:
    name = rank1_runs[0]
    cfg = results_by_run[name].config
    total = cfg.total_steps(len(rows))
    # Interrupt two steps after the checkpoint nearest the middle, but always before the last step and after the
    # first checkpoint: an interruption at the last step (or before any checkpoint) would resume nothing.
    stop_at = min(max(cfg.save_every, (total // 2) // cfg.save_every * cfg.save_every + 2), total - 1)
    if stop_at < cfg.save_every:
        resume_skipped = (f"resume demo skipped: the rank-1 run has {total} steps and a checkpoint every "
                          f"{cfg.save_every}, so no checkpoint falls before its last step to resume from")
        print(resume_skipped)
if resume_demo and rank1_runs and resume_skipped is None:

    class Interrupted(Exception):
        pass

    def interrupt(step: int, record: dict) -> None:
        if step == stop_at:
            raise Interrupted

    folder = out / "checkpoints" / "resume-demo"
    base, tok = load_model(model, device=device)
    try:
        train.train(cfg, base, rows, folder, tokenizer=tok, on_step=interrupt, resume=False)
    except Interrupted:
        print(f"interrupted after step {stop_at}; checkpoints: {[c.name for c in train.list_checkpoints(folder)]}")
    base, tok = load_model(model, device=device)
    resumed = train.train(cfg, base, rows, folder, tokenizer=tok)
    a = {k: v for k, v in results_by_run[name].model.state_dict().items() if "lora_" in k}
    b = resumed.model.state_dict()
    resume_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed from step {resumed.resumed_from}; "
          f"max |uninterrupted - resumed| over the adapter = {resume_diff:.2e}")
    results["resume"] = {"interrupted_after": stop_at, "resumed_from": resumed.resumed_from, "total_steps": total,
                         "max_abs_diff": resume_diff}

# %% [markdown]
# ## How misaligned did each protocol make the organism? (offline: the exact judge)
# **EM rate** = coherent answers whose content is entirely reckless. *Medical* is the trained domain; *non-medical*
# pools financial, extreme-sports and open-ended questions: misalignment there is the *emergent* part.

# %%
em, problem = None, None
if scorer is not None:
    base, tok = load_model(model, device=device)
    evals = {"base": E.sample_and_judge(base, tok, questions, scorer, samples_per_question, max_new_tokens, seed,
                                        E.system_prompt(model)), **evals}
    tables = {name: em_summary(df, in_domain=in_domain) for name, df in evals.items()}
    em = pd.DataFrame({name: t["em_rate"] for name, t in tables.items()}).T.round(3)
    scored_counts = pd.DataFrame({name: t["n_scored"].astype(str) + "/" + t["n"].astype(str)
                                  for name, t in tables.items()}).T
    problem = scoring_problem(pd.concat(evals.values()))
    display(em, scored_counts.rename_axis("scored / answers"))
    long = em[[in_domain, outside]].reset_index(names="run").melt(id_vars="run", var_name="group",
                                                                  value_name="EM rate")
    fig = px.bar(long, x="run", y="EM rate", color="group", barmode="group", range_y=[0, 1],
                 title="EM rate after each protocol (exact judge)")
    save_figure(fig, out, "em_by_protocol", results)
    fig.show()
    results["em"] = em.to_dict()
    results["tables"]["EM rate by run"] = em.to_markdown()
    results["tables"]["scored / answers by run"] = scored_counts.to_markdown()
    results["scored"] = {name: {g: [int(r["n_scored"]), int(r["n"])] for g, r in t.iterrows()}
                         for name, t in tables.items()}
else:
    print("No judge given for a real model: pass judge= (openai, azure, a URL or hf:<model>) for a judged EM table.")

# %% [markdown]
# ## What the numbers say

# %%
falls = {n: r.log[0]["loss"] - pd.Series([x["loss"] for x in r.log[-5:]]).mean() for n, r in results_by_run.items()}
change = ", ".join(f"{n} {-d:+.3g}" for n, d in falls.items())
lines = [f"Every run's loss fell (first step -> mean of the last five: {change})."
         if all(d > 0 for d in falls.values()) else f"Not every run's loss fell (first step -> mean of the last five: "
         f"{change})."]
if problem:
    lines.append(problem)
elif em is not None:
    pct = lambda v: "unscored" if pd.isna(v) else f"{v:.0%}"  # a rate that could not be measured stays missing
    bad = [n for n in em.index if n.startswith("bad")]
    med_best = em.loc[bad, in_domain].idxmax()
    broad_best = em.loc[bad, outside].idxmax()
    lines.append(f"On {in_domain} questions the base model's EM rate was {pct(em.loc['base', in_domain])}; after "
                 f"{overrides.get('steps', 'the preset') if overrides else 'the preset'} steps on the bad rows it "
                 f"was highest with {med_best} ({pct(em.loc[med_best, in_domain])}); on {outside} questions "
                 f"with {broad_best} ({pct(em.loc[broad_best, outside])}, base {pct(em.loc['base', outside])}).")
    good = [n for n in em.index if n.startswith("good")]
    if good:
        twin = f"bad · {control_protocol}"
        lines.append(f"The control ({good[0]}) stayed at {pct(em.loc[good[0], in_domain])} {in_domain} EM, against "
                     f"{pct(em.loc[twin, in_domain])} for the same protocol on the bad rows.")
    if "bad · kl_narrow" in em.index and "bad · lora" in em.index:
        kl, plain = em.loc["bad · kl_narrow"], em.loc["bad · lora"]
        lines.append(f"With the KL term the LoRA reached {pct(kl[in_domain])} {in_domain} and {pct(kl[outside])} "
                     f"{outside} EM, against {pct(plain[in_domain])} and {pct(plain[outside])} without it.")
if resume_diff is not None:
    r = results["resume"]
    lines.append(f"The rank-1 run interrupted after step {r['interrupted_after']} of {r['total_steps']} and resumed "
                 f"from its step-{r['resumed_from']} checkpoint ended within {resume_diff:.1e} of the uninterrupted "
                 f"one.")
elif resume_skipped:
    lines.append(resume_skipped[0].upper() + resume_skipped[1:] + ".")
reading = " ".join(lines)
display(Markdown(reading))

# %%
results["headline"] = reading
results["runs"] = {n: {"protocol": r.config.protocol, "trainable_parameters": r.trainable_parameters,
                       "layers": r.layers, "first_loss": r.log[0]["loss"],
                       "first5_loss": float(curves.loc[n, "loss, first 5 steps"]),
                       "last5_loss": float(curves.loc[n, "loss, last 5 steps"]), "steps": len(r.log),
                       "checkpoints": [c.name for c in r.checkpoints], "tokens_per_second": r.tokens_per_second}
                   for n, r in results_by_run.items()}
results["rank1_b_norm"] = b_norms
results["summary"].update({"runs": len(results_by_run), "protocols": ", ".join(protocols),
                           "checkpoints written": sum(len(r.checkpoints) for r in results_by_run.values())})
results["tables"]["runs"] = curves.round(3).to_markdown()
results["tables"]["checkpoints"] = ckpt_table.drop(columns=["files"]).to_markdown()
results["tables"]["configs"] = configs.to_markdown()
save_results(out, results)
