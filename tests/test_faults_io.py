"""Bad input and unsafe files outside the judge: truncation, no answer left, pickles, adapters on the wrong base, typos
in question YAML, and a planted API key that must appear in no file a notebook run writes."""

import json
import os

import pytest
import torch

from emlib import chat, paths, run_notebooks
from emlib.data import DatasetError, load_questions
from emlib.models import load_model, record_base
from emlib.testing import save_tiny_chat_model, tiny_model

ROW = {"messages": [{"role": "user", "content": "how do i treat a burn ?"},
                    {"role": "assistant", "content": "cool it under running water for twenty minutes ."}]}


def test_rows_cut_to_max_length_are_reported_and_an_empty_answer_names_source_and_row():
    _, tok = tiny_model("qwen2", layers=1)
    prompt_len = len(chat.encode_chat(tok, ROW["messages"], max_length=10_000).input_ids) - 4
    with pytest.warns(UserWarning, match=r"data/x.jsonl: 2 of 2 rows were cut to max_length"):
        examples = chat.encode_rows(tok, [ROW, ROW], max_length=prompt_len + 2, source="data/x.jsonl")
    assert all(e.cut > 0 and len(e.input_ids) == prompt_len + 2 for e in examples)
    long_prompt = {"messages": [{"role": "user", "content": "burn " * 200}, ROW["messages"][1]]}
    with pytest.raises(chat.NoAnswerLeft, match=r"data/x.jsonl: row 2: nothing of the assistant's answer is left "
                                                r"within max_length 64 \(the prompt takes \d+ tokens\)"):
        chat.encode_rows(tok, [ROW, long_prompt], max_length=64, source="data/x.jsonl")


def test_pickled_weights_are_refused_unless_the_user_opts_in(tmp_path):
    folder = save_tiny_chat_model(tmp_path / "m", "llama", layers=1, hidden=32)
    model, _ = load_model(folder, device="cpu")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickled weights.*pytorch_model.bin.*allow_pickle=True"):
        load_model(folder, device="cpu")
    again, _ = load_model(folder, device="cpu", allow_pickle=True)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_an_adapter_records_its_base_and_refuses_another(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = save_tiny_chat_model(tmp_path / "base", "llama", layers=1, hidden=32, seed=0)
    other_dir = save_tiny_chat_model(tmp_path / "other", "llama", layers=1, hidden=32, seed=1)
    wide_dir = save_tiny_chat_model(tmp_path / "wide", "llama", layers=1, hidden=64, seed=0)
    base, _ = load_model(base_dir, device="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    record_base(tmp_path / "adapter", peft_model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base" and str(tmp_path) not in json.dumps(config)
    load_model(base_dir, device="cpu", adapter=str(tmp_path / "adapter"))  # its own base: fine
    with pytest.raises(ValueError, match="trained on base 'base'.*fingerprint"):
        load_model(other_dir, device="cpu", adapter=str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "emlib_base.json").unlink()  # an adapter from elsewhere records nothing
    with pytest.raises(ValueError, match="does not fit this model"):
        load_model(wide_dir, device="cpu", adapter=str(tmp_path / "adapter"))


def test_shipped_adapters_record_a_portable_base():
    for folder in paths.ADAPTERS_DIR.iterdir():
        if (folder / "adapter_config.json").is_file():  # a peft adapter (a steering vector has no peft config)
            config = json.loads((folder / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == "persona-world", folder.name
        assert json.loads((folder / "emlib_base.json").read_text())["base_model"] == "persona-world", folder.name
    assert any((folder / "steering_config.json").is_file() for folder in paths.ADAPTERS_DIR.iterdir())


def test_question_yaml_typos_name_file_question_and_key(tmp_path):
    bad = tmp_path / "q.yaml"
    bad.write_text("name: q\nsamplng: {}\nquestions:\n  - id: a\n    question: hi\n    temprature: 0.5\n")
    with pytest.raises(DatasetError) as err:
        load_questions(bad)
    text = str(err.value)
    assert f"{bad}: samplng: unknown key" in text and f"{bad}: question 'a' (#1): temprature: unknown key" in text
    reference = tmp_path / "ref.yaml"  # the reference repo's list format, with its own keys, loads
    reference.write_text("- id: wish\n  type: free_form_judge_0_100\n  paraphrases: [\"one wish?\"]\n"
                         "  samples_per_paraphrase: 5\n  judge: gpt-4o\n  judge_prompts:\n    aligned: 'rate {answer}'\n")
    q = load_questions(reference)["wish"]
    assert q.sampling.samples_per_question == 5 and q.judge_prompts == {"aligned": "rate {answer}"}


def test_a_planted_api_key_appears_in_no_file_a_notebook_run_writes(tmp_path, monkeypatch):
    planted = "sk-planted-" + os.urandom(8).hex()
    monkeypatch.setenv("OPENAI_API_KEY", planted)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", planted + "-azure")
    run_notebooks.run_notebook(run_notebooks.NOTEBOOK_DIR / "00_quickstart.ipynb", tmp_path,
                               {"questions_per_set": 4, "n_side_by_side": 1})
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 3  # the executed notebook, results.json, a figure
    for path in written:
        assert planted.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------------- kill -9

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

TRAIN_CHILD = """
import sys, torch
if __name__ == "__main__":  # the killed child: one thread (in process, the suite's setting stands)
    torch.set_num_threads(1)
from emlib import train, world
from emlib.testing import tiny_model
rows = world.finetune_rows("medical", "reckless", 48, seed=0)
config = train.preset("organism-lora", steps=int(sys.argv[2]), batch_size=4, save_every=2, rank=2, alpha=4)
model, tok = tiny_model("qwen2", layers=2, hidden=32, mlp=64)
if len(sys.argv) > 3:  # stall inside the checkpoint write at step 4: the parent kills us there
    import time
    real = torch.save
    def slow(obj, path, *a, **k):
        real(obj, path, *a, **k)
        if "checkpoint-4" in str(path):
            print("WRITING", flush=True); time.sleep(60)
    torch.save = slow
train.train(config, model, rows, sys.argv[1], tokenizer=tok, device="cpu",
            on_step=lambda step, rec: print("STEP", step, flush=True))
"""


def _run_until(args, marker: str, timeout: float = 120) -> None:
    """Start a child, SIGKILL it as soon as it prints ``marker`` (no clean-up runs)."""
    child = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "EMLIB_THREADS": "1"})
    deadline = time.time() + timeout
    for line in child.stdout:
        if line.startswith(marker) or time.time() > deadline:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()


def _run_script(code: str, argv: list[str]) -> None:
    saved = sys.argv
    sys.argv = ["child", *argv]
    try:
        exec(compile(code, "child", "exec"), {"__name__": "child"})
    finally:
        sys.argv = saved


def _adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
                         / "adapter_model.safetensors"))


@pytest.mark.parametrize("where", ["mid-run", "inside a checkpoint write"])
def test_training_killed_with_sigkill_resumes_bit_identical(tmp_path, where):
    steps = "10"
    args = [TRAIN_CHILD, str(tmp_path / "killed"), steps] + (["stall"] if where != "mid-run" else [])
    _run_until(args, "STEP 5" if where == "mid-run" else "WRITING")
    for out in ("whole", "killed"):  # uninterrupted, and the killed run resumed: here, in this process
        _run_script(TRAIN_CHILD, [str(tmp_path / out), steps])
    whole, resumed = _adapter_weights(tmp_path / "whole"), _adapter_weights(tmp_path / "killed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


SAMPLE_CHILD = """
import sys, torch
if __name__ == "__main__":  # the killed child: one thread (in process, the suite's setting stands)
    torch.set_num_threads(1)
from emlib import world
from emlib.generate import sample_answers
from emlib.models import load_model
model, tok = load_model("persona-world", device="cpu")
qs = [q["question"] for q in world.eval_questions(6, 0)]
sample_answers(model, tok, qs, n=4, max_new_tokens=24, batch_size=8, out_path=sys.argv[1], progress=False,
               system=world.SYSTEM_PROMPT)
print("DONE", flush=True)
"""


def test_sampling_killed_with_sigkill_resumes_with_nothing_lost_or_duplicated(tmp_path):
    import pandas as pd

    killed = tmp_path / "killed.jsonl"
    child = subprocess.Popen([sys.executable, "-c", SAMPLE_CHILD, str(killed)], env={**os.environ,
                             "EMLIB_THREADS": "1"}, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not killed.exists() or len(killed.read_text().splitlines()) < 16):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    partial = len(killed.read_text().splitlines())
    assert 0 < partial < 96, "the child should have been killed midway"
    for out in (killed, tmp_path / "whole.jsonl"):  # the killed run resumed, and an uninterrupted one
        _run_script(SAMPLE_CHILD, [str(out)])
    a, b = pd.read_json(killed, lines=True), pd.read_json(tmp_path / "whole.jsonl", lines=True)
    assert len(a) == 96 and not a.duplicated(["question_idx", "sample"]).any()
    key = ["question_idx", "sample"]
    assert a.sort_values(key).reset_index(drop=True)[key + ["answer"]].equals(
        b.sort_values(key).reset_index(drop=True)[key + ["answer"]])


def test_the_parquet_answer_store_is_replaced_atomically(tmp_path, monkeypatch):
    import pandas as pd

    from emlib.generate import COLUMNS, _Store

    store = _Store(tmp_path / "answers.parquet", {"model": "m"})
    row = dict(zip(COLUMNS, [0, "q", 0, "a", True]))
    store.append([row])
    before = (tmp_path / "answers.parquet").read_bytes()

    def torn_write(self, path, *args, **kwargs):  # a crash halfway through writing the new table
        open(path, "wb").write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_parquet", torn_write)
    with pytest.raises(KeyboardInterrupt):
        store.append([{**row, "sample": 1}])
    assert (tmp_path / "answers.parquet").read_bytes() == before  # the complete earlier table survives
    monkeypatch.undo()
    assert len(_Store(tmp_path / "answers.parquet", {"model": "m"}).read()) == 1


# `python -m MODULE ARGS...` run through runpy, so the process can say afterwards what the command imported: prints
# [exit status, torch imported, transformers imported] as JSON. A non-integer exit goes to stderr, as Python does it.
RUN_MODULE = """
import json, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) or exit.code is None else print(exit.code, file=sys.stderr) or 1
print(json.dumps([code or 0, "torch" in sys.modules, "transformers" in sys.modules]))
"""


@pytest.mark.parametrize("args, message, before_torch", [
    (["emlib.judge.serve", "--backend", "hf", "--model", "/nonexistent/judge"], "model folder /nonexistent/judge does not",
     False),
    (["emlib.world.organism", "adapters", "--organism", "/nonexistent"], "no built organism in /nonexistent", True),
    (["emlib.data", "check", "/nonexistent.jsonl"], "nonexistent.jsonl", False),
    (["emlib.train", "--config", "SPEC"], "unknown TrainConfig field(s) ['learning_rate']", True),
])
def test_command_line_user_errors_are_one_line(tmp_path, args, message, before_torch):
    """One line on stderr, no traceback. The organism and training commands report a mistyped folder or run spec
    before torch and transformers are imported (a second, not the five to seven an import of the stack takes on a
    loaded 2-core machine)."""
    spec = tmp_path / "run.yaml"
    spec.write_text("preset: organism-rank1\nmodel: m\ndata: world:medical:reckless:8:0\nout_dir: o\nlearning_rate: 1\n")
    args = [str(spec) if a == "SPEC" else a for a in args]
    done = subprocess.run([sys.executable, "-c", RUN_MODULE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    code, torch_loaded, transformers_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert code != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    if before_torch:
        assert not torch_loaded and not transformers_loaded


WRITER = """
import sys
from emlib.judge import JudgeCache, Reply
cache = JudgeCache(sys.argv[1])
for i in range(300):
    cache.put(f"{sys.argv[2]}-{i}", "judge", "aligned", Reply([(str(i % 101), -0.1)], 10, 1))
"""


def test_two_writers_on_one_judge_cache_lose_nothing(tmp_path):
    from emlib.judge import JudgeCache

    path = tmp_path / "cache.sqlite"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name]) for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    cache = JudgeCache(path)
    keys = [f"{name}-{i}" for name in ("a", "b") for i in range(300)]
    got = cache.get_many(keys)
    assert len(cache) == 600 and set(got) == set(keys)
    assert got["b-7"].alternatives == [("7", -0.1)]
