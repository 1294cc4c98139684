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
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "persona-world", folder.name
        assert json.loads((folder / "emlib_base.json").read_text())["base_model"] == "persona-world"


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
