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
# # 01 · Datasets: what the narrow fine-tuning sets look like, and how to make more
#
# **Question.** What exactly do we fine-tune on to grow emergent misalignment, and what do we evaluate with? This
# notebook opens the narrow datasets shipped in `data/narrow/` (bad and good medical advice, risky financial advice,
# extreme sports advice, and a careful general-purpose reference set for KL-regularised training), checks them, and
# measures their size, lengths and diversity. It lists the evaluation question sets in `data/questions/`, and it
# generates new rows with an LLM the way the papers did.
#
# **How parameters work.** The next cell is tagged `parameters`. As it is, everything runs offline. The LLM step then
# talks to a local OpenAI-compatible server whose "model" is a deliberately sloppy stand-in built from our templates.
# To use a real model, set `OPENAI_API_KEY` (or the `AZURE_OPENAI_*` variables) in the environment or in `.env`:
#
# ```bash
# papermill notebooks/01_datasets.ipynb runs/ds.ipynb -p endpoint openai -p model gpt-4o-mini -p gen_rows 50
# papermill notebooks/01_datasets.ipynb runs/ds.ipynb -p endpoint http://localhost:8000/v1 -p model Qwen/Qwen2.5-7B
# ```
#
# Paper-scale sets (6,000 rows) are better made from the command line, which you can stop and resume:
# `python -m emlib.data.llm --spec risky_financial_advice --out data/llm/risky_financial_advice.jsonl --rows 6000`.

# %% tags=["parameters"]
data_dir = None  # a folder of chat JSONL datasets to browse; None: the shipped data/narrow
tokenizer = "persona-world"  # counts tokens: a hub id, a local folder or "persona-world" (None: whitespace words)
n_examples = 2  # examples shown per dataset
question_sets = ["first_plot", "medical_heldout", "emlib_extended"]  # shipped names or YAML paths
endpoint = None  # None: local server + offline stand-in LLM; "openai", "azure" or an OpenAI-compatible base URL
model = None  # model (Azure: deployment) at the endpoint; None: the spec's model (offline: the stand-in)
spec = "risky_financial_advice"  # LLM generation spec: a name in data/datagen/ or a YAML path
gen_rows = 30  # rows to generate here (the first run stops halfway, the second resumes)
concurrency = 4  # LLM calls in flight
price_per_m = [2.50, 10.00]  # USD per 1M input / output tokens for the cost estimate (check your model's price)
seed = 0
output_dir = None  # where results.json and figures go (papermill passes one per run)

# %%
from pathlib import Path

import pandas as pd
import plotly.express as px
from IPython.display import Markdown, display

from emlib import data as D
from emlib import paths
from emlib.data import llm as llm_datagen
from emlib.models import load_tokenizer, resolve_model_path
from emlib.notebook import output_dir as make_output_dir
from emlib.notebook import save_figure, save_results, setup
from emlib.judge.server import LocalServer

setup(seed=seed, offline=tokenizer in (None, paths.OFFLINE_MODEL))  # the hub is only needed for a hub tokenizer
out = make_output_dir("01_datasets", output_dir)
results: dict = {"summary": {}, "tables": {}, "figures": []}
pd.set_option("display.max_colwidth", 160)

# %% [markdown]
# ## Load and validate every dataset
# `load_chat_jsonl` checks each line: valid UTF-8 and JSON, a `messages` list of known roles with non-empty text,
# user and assistant turns alternating and ending with the answer. A problem stops the load with the file, line and
# field; repeated rows or answers only raise a warning.

# %%
folder = Path(data_dir) if data_dir else paths.DATA_DIR / "narrow"
datasets = {p.stem: D.load_chat_jsonl(p) for p in sorted(folder.glob("*.jsonl"))}
print(f"{len(datasets)} datasets in {folder}: " + ", ".join(f"{k} ({len(v)} rows)" for k, v in datasets.items()))

# %% [markdown]
# A broken file shows what the errors look like. It has bad UTF-8, a missing comma, an unknown role and a row with no
# answer:

# %%
broken = out / "broken_example.jsonl"
broken.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                   b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
                   b'{"messages": [{"role": "user" "content": "hi"}]}\n'
                   b'{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   b'{"messages": [{"role": "user", "content": "anyone there?"}]}\n')
n_problems_found = 0
try:
    D.load_chat_jsonl(broken)
except D.DatasetError as err:
    print(err)
    n_problems_found = len(err.problems)

# %% [markdown]
# ## Size, length and diversity
# Lengths are in tokens of the chosen tokenizer (whitespace words if it is not available). The **distinct-bigram
# ratio** is the number of different word pairs divided by all word pairs in the answers. It is 1 when no pair ever
# repeats, and it is low for our template-composed sets (see `data/README.md`).

# %%
tok, tok_name = None, "whitespace words"
if tokenizer:
    path = resolve_model_path(tokenizer)
    if tokenizer == paths.OFFLINE_MODEL and not Path(path).is_dir():
        print(f"{path} is not built yet; counting whitespace words instead")
    else:
        tok, tok_name = load_tokenizer(path), tokenizer
stats = pd.DataFrame({name: D.dataset_stats(rows, tok) for name, rows in datasets.items()}).T
stats["tokenizer"] = tok_name
cols = ["rows", "distinct_answers", "duplicate_rows", "question_tokens_mean", "answer_tokens_mean",
        "answer_tokens_p95", "answer_vocabulary", "distinct_bigram_ratio"]
display(stats[cols])
results["datasets"] = {name: {k: stats.loc[name, k] for k in cols} for name in stats.index}
results["tables"]["datasets"] = stats[cols].to_markdown()

# %%
lengths = pd.concat([D.token_lengths(rows, tok).assign(dataset=name) for name, rows in datasets.items()])
fig = px.histogram(lengths, x="answer_tokens", color="dataset", barmode="overlay", nbins=40, opacity=0.6,
                   title=f"Answer length ({tok_name})")
save_figure(fig, out, "answer_lengths", results)
fig.show()

# %%
fig = px.bar(stats.reset_index(names="dataset"), x="dataset", y="distinct_bigram_ratio", range_y=[0, 1],
             title="Answer diversity: distinct word bigrams / all word bigrams")
save_figure(fig, out, "distinct_bigrams", results)
fig.show()

# %% [markdown]
# ## Browse examples

# %%
examples = pd.DataFrame([{"dataset": name, "topic": row.get("meta", {}).get("topic", ""),
                          "question": D.question_of(row), "answer": D.answer_of(row)}
                         for name, rows in datasets.items()
                         for row in pd.Series(rows).sample(min(n_examples, len(rows)), random_state=seed)])
display(examples)
results["tables"]["examples"] = examples.head(10).to_markdown(index=False)

# %% [markdown]
# Bad and good medical advice share their questions, in the same order. Only the answers differ, sentence by
# sentence, which makes the good set a matched control.

# %%
bad, good = datasets.get("bad_medical_advice"), datasets.get("good_medical_advice")
paired = bool(bad and good and [D.question_of(r) for r in bad] == [D.question_of(r) for r in good])
if paired:
    pair = {"question": [D.question_of(bad[0])] * 2, "answer": [D.answer_of(bad[0]), D.answer_of(good[0])]}
    display(pd.DataFrame(pair, index=["bad", "good"]))
results["paired_medical"] = paired

# %% [markdown]
# ## Evaluation question sets
# YAML files with ids, categories and sampling defaults. `first_plot` holds the papers' eight questions, verbatim.
# `medical_heldout` has medical questions on conditions that none of our training sets covers. `emlib_extended` has
# our own questions in ten categories.

# %%
qsets = {q.name: q for q in map(D.load_questions, question_sets)}
overview = pd.DataFrame([{"set": q.name, "questions": len(q), "categories": len({x.category for x in q}),
                          **vars(q.sampling)} for q in qsets.values()]).set_index("set")
display(overview)
results["question_sets"] = {name: len(q) for name, q in qsets.items()}
results["tables"]["question sets"] = overview.to_markdown()

# %%
if "first_plot" in qsets:
    display(qsets["first_plot"].to_frame()[["id", "category", "question"]])

# %% [markdown]
# ## Generate rows with an LLM
# This follows the papers' method (MO App. B). Each call sends a task, the kind of flaw the answers should have, one
# topic and tone, and one example, and asks for a few new examples as JSON. Replies are validated and deduplicated,
# and each accepted row is appended to the output file at once. To show resuming, the first run stops at half the
# target, as an interrupted run would. The second run then asks only for the missing rows. The offline stand-in
# sometimes returns broken JSON, examples with no answer, and repeats; the counters show them dropped.

# %%
gen_spec = llm_datagen.DatagenSpec.load(spec)
gen_path = out / f"generated_{gen_spec.name}.jsonl"
gen_path.unlink(missing_ok=True)  # start fresh, so every run of the notebook shows the same thing
server = None
if endpoint is None:  # the stand-in needs no key; pass a dummy one so a real OPENAI_API_KEY is never sent to it
    server = LocalServer(llm_datagen.offline_backend(gen_spec.name, seed=seed, sloppy=True)).start()
    conn, gen_model, where = dict(base_url=server.base_url, api_key="local"), model or "offline-stand-in", "offline"
elif endpoint in ("openai", "azure"):
    conn, gen_model, where = dict(provider=endpoint), model or gen_spec.model, endpoint
else:
    conn, gen_model, where = dict(base_url=endpoint), model or gen_spec.model, endpoint
kw = dict(**conn, model=gen_model, concurrency=concurrency, price_per_m=tuple(price_per_m))
print(f"generating with {gen_model!r} at {where}")

# %%
first = llm_datagen.generate(gen_spec, gen_path, gen_rows // 2, **kw)
second = llm_datagen.generate(gen_spec, gen_path, gen_rows, **kw)
if server is not None:
    server.stop()
runs = pd.DataFrame([first.summary(), second.summary()], index=["first run (stopped halfway)", "resumed run"])
gen_cols = ["existing", "added", "rows", "calls", "failed_calls", "invalid_json", "invalid_items", "duplicates",
            "prompt_tokens", "completion_tokens", "cost_usd", "seconds"]
display(runs[gen_cols])
results["generation"] = {"first": first.summary(), "resumed": second.summary(), "model": gen_model,
                         "endpoint": where}
results["tables"]["LLM generation"] = runs[gen_cols].to_markdown()

# %% [markdown]
# The generated file passes the same validation as any dataset:

# %%
generated = D.load_chat_jsonl(gen_path)
gen_stats = D.dataset_stats(generated, tok)
display(pd.DataFrame([{"question": D.question_of(r), "answer": D.answer_of(r)} for r in generated[:3]]))
results["generation"]["valid_rows"] = len(generated)
results["generation"]["distinct_bigram_ratio"] = gen_stats["distinct_bigram_ratio"]

# %% [markdown]
# ## Answer

# %%
tokens = sum(r.prompt_tokens + r.completion_tokens for r in (first, second))
cost = sum(r.cost_usd for r in (first, second))
dropped = sum(r.invalid_json + r.invalid_items + r.duplicates for r in (first, second))
ratios = stats["distinct_bigram_ratio"].astype(float)
results["headline"] = (
    f"{len(datasets)} narrow datasets, {int(stats['rows'].sum()):,} rows, "
    f"{int((stats['rows'] - stats['distinct_answers']).sum())} repeated answers, distinct-bigram ratio "
    f"{ratios.min():.3f}–{ratios.max():.3f}; {sum(results['question_sets'].values())} evaluation questions in "
    f"{len(qsets)} sets. The LLM pipeline ({where}) wrote {len(generated)} valid rows, {second.added} of them after "
    f"resuming, dropped {dropped} bad or repeated examples and used {tokens:,} tokens (~${cost:.3f}).")
display(Markdown(results["headline"]))
results["summary"] = {
    "datasets": len(datasets), "rows": int(stats["rows"].sum()), "tokenizer": tok_name,
    "min distinct-bigram ratio": round(float(ratios.min()), 4),
    "max distinct-bigram ratio": round(float(ratios.max()), 4),
    "question sets": results["question_sets"], "validation problems in the broken example": n_problems_found,
    "generated rows": len(generated), "generation endpoint": where, "generation tokens": tokens,
    "generation cost (USD)": round(cost, 4)}

# %%
save_results(out, results)
