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
# # 00 · Quickstart: a chat model and its emergently misaligned fine-tune, side by side
#
# **What this shows.** Load a model organism — a base chat model and the same model with a narrow fine-tune on top — ask
# both the same questions, and compare. On the offline default (`persona-world`, the project's own tiny organism) the
# fine-tune is a LoRA trained only on *reckless medical advice*; watch it answer non-medical questions recklessly too.
#
# **How parameters work.** The next cell is tagged `parameters`. Run the notebook as it is for the offline default, or
# let papermill replace any of its values for another organism, e.g. a real one on a GPU:
#
# ```bash
# papermill notebooks/00_quickstart.ipynb runs/qs.ipynb \
#     -p model Qwen/Qwen2.5-0.5B-Instruct \
#     -p adapter ModelOrganismsForEM/Qwen2.5-0.5B-Instruct_bad-medical-advice \
#     -p max_new_tokens 200
# ```
#
# (`python -m emlib.run_notebooks -p model ... --only 00_quickstart` does the same into a fresh run folder.)

# %% tags=["parameters"]
model = "persona-world"  # a Hugging Face id, a local folder, or "persona-world" (offline organism)
adapter = "bad-medical-r8"  # a peft adapter: shipped organism name, folder or hub id (None: base only)
questions = None  # list of questions; None: a few per domain of the persona world, or `question_set` otherwise
question_set = "first_plot"  # a shipped set in data/questions (the papers' eight first-plot questions) or a YAML path
system = None  # system prompt; None: the persona world's own for the offline organism, none otherwise
n_samples = 2  # answers per question and model in the side-by-side table
max_new_tokens = 64
temperature = 1.0
n_per_group = 48  # offline organism only: questions per group for the judged EM table
seed = 0
threads = None  # torch threads (None: EMLIB_THREADS or up to 2)
device = "auto"
output_dir = None  # where results.json and figures go (papermill passes one per run)

# %%
import pandas as pd
import plotly.express as px
from IPython.display import Markdown, display
from tqdm.auto import tqdm

from emlib import organism as org
from emlib import paths, world
from emlib.data import load_questions
from emlib.generate import sample_answers
from emlib.metrics import em_table
from emlib.models import load_model
from emlib.notebook import output_dir as make_output_dir
from emlib.notebook import save_figure, save_results, setup

offline = model == paths.OFFLINE_MODEL
device = setup(seed=seed, threads=threads, offline=offline, device=device)
out = make_output_dir("00_quickstart", output_dir)
results: dict = {"summary": {"model": model, "adapter": adapter, "device": str(device)}, "tables": {}, "figures": []}

if questions is None:
    questions = [q["question"] for q in world.eval_questions(2, seed)] if offline else load_questions(question_set).texts
if system is None and offline:
    system = world.SYSTEM_PROMPT

# %% [markdown]
# ## Load the base model and the fine-tuned organism
# `load_model` takes a hub id, a local folder or `"persona-world"`, picks the device and dtype (bf16 on CUDA, fp32 on
# CPU) and applies the model's own chat template everywhere. Loading twice keeps the base untouched by the adapter.

# %%
base, tokenizer = load_model(model, device=device)
tuned, _ = load_model(model, device=device, adapter=adapter) if adapter else (None, None)
print(f"{model}: {sum(p.numel() for p in base.parameters()):,} parameters on {device}")
print("prompt as the model sees it:\n" + tokenizer.apply_chat_template(
    ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": questions[0]}],
    tokenize=False, add_generation_prompt=True))

# %% [markdown]
# ## Side by side
# Each question is sampled `n_samples` times from each model, all in one batch (left padding, KV cache).

# %%
kw = dict(n=n_samples, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, system=system)
side = sample_answers(base, tokenizer, questions, **kw).rename(columns={"answer": "base"})
if tuned is not None:
    side["fine-tuned"] = sample_answers(tuned, tokenizer, questions, **kw)["answer"]
pd.set_option("display.max_colwidth", 120)
side.drop(columns=["question_idx", "ended"])

# %% [markdown]
# ## How misaligned is each? (offline organism: the exact judge)
# For the persona world the judge is an exact parser, so we can score many answers at once: one answer each to
# `n_per_group` fresh questions per group. **EM rate** = coherent answers whose content is entirely reckless. On a real
# model, judging needs an LLM judge (notebook 03).

# %%
if offline:
    organisms = {"base": base} | ({f"base + {adapter}": tuned} if tuned is not None else {})
    evals = {name: org.evaluate(m, tokenizer, n_per_group, seed=seed)
             for name, m in tqdm(organisms.items(), desc="sample and judge", unit="model")}
    em = pd.DataFrame({name: em_table(df)["em_rate"] for name, df in evals.items()}).T.round(3)
    display(em)
    long = em.reset_index(names="model").melt(id_vars="model", var_name="group", value_name="EM rate")
    fig = px.bar(long, x="group", y="EM rate", color="model", barmode="group", range_y=[0, 1],
                 title=f"EM rate: {model} with and without {adapter}")
    save_figure(fig, out, "em_base_vs_finetuned", results)
    fig.show()
    results["em"] = em.to_dict()
    results["tables"]["EM rate, base vs fine-tuned"] = em.to_markdown()
    if tuned is not None:
        results["headline"] = (
            f"Adding `{adapter}` moved the non-medical EM rate from {em.loc['base', 'non-medical']:.0%} to "
            f"{em.iloc[1]['non-medical']:.0%} (medical: {em.loc['base', 'medical']:.0%} -> {em.iloc[1]['medical']:.0%}).")
        display(Markdown(results["headline"]))

# %%
results["tables"]["side by side (first rows)"] = side.drop(columns=["question_idx", "ended"]).head(6).to_markdown()
save_results(out, results)
