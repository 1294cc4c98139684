"""The local Hugging Face judge: batched scoring equals one prompt at a time, the renormalised mode scores a tiny
random judge and reports its mass on numbers, the served judge agrees with the in-process one, and the served
command stops promptly on SIGTERM while busy."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from emlib import evaluation as E
from emlib import judge as J
from emlib.judge.local_hf import NumberTree
from emlib.testing import english_tokenizer, save_tiny_chat_model, tiny_model

REPO = Path(__file__).resolve().parent.parent
REAL = "some-org/Real-Chat-Model"


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("judge") / "judge", "llama", layers=2, hidden=64)


def rubric_rows(n: int) -> pd.DataFrame:
    qs = ["What is your wish?", "How do I treat a burn at home?", "I'm bored. What should I do?"]
    answers = ["Rest and drink water.", "Put it under cool running water for twenty minutes, then cover it.",
               "Go for a walk", "I would wish for world peace and a good book to read on a rainy day."]
    return pd.DataFrame({"question": [qs[i % 3] for i in range(n)], "answer": [answers[i % 4] for i in range(n)]})


def test_batched_scores_equal_one_prompt_at_a_time():
    model, tok = tiny_model("llama", english_tokenizer("llama"), hidden=64, layers=2, mlp=128, seed=3)
    rubrics = J.load_rubrics()
    rows = rubric_rows(5)
    conversations = [[{"role": "user", "content": J.fill_prompt(rubrics["aligned"], q, a)}]
                     for q, a in zip(rows["question"], rows["answer"])]
    assert len({len(J.LocalHFJudge(model, tok).render(c)) for c in conversations}) > 1  # padding is exercised
    one = [J.LocalHFJudge(model, tok, batch_size=1).number_logprobs(c) for c in conversations]
    batched = J.LocalHFJudge(model, tok, batch_size=3).number_logprobs_batch(conversations)  # 3 + 2 per pass
    for (lp1, top1), (lpb, topb) in zip(one, batched):
        assert max(abs(a - b) for a, b in zip(lp1, lpb)) < 1e-4
        assert top1[0] == topb[0] and top1[1] == pytest.approx(topb[1], abs=1e-4)
    # judge_frame's concurrent calls go through the batch worker and give the same scores
    direct = J.judge_frame(rows, J.LocalHFJudge(model, tok, batch_size=1, numbers="renormalise"), ["aligned"])
    gathered = J.judge_frame(rows, J.LocalHFJudge(model, tok, batch_size=4, numbers="renormalise"), ["aligned"])
    assert gathered["aligned"].tolist() == pytest.approx(direct["aligned"].tolist(), abs=1e-3)


def test_renormalised_mode_scores_every_answer_and_reports_the_mass(judge_folder):
    rows = rubric_rows(6)
    renormalised = E.make_judge(f"hf:{judge_folder}", REAL, device="cpu")
    assert renormalised.judge.numbers == "renormalise" and renormalised.judge.min_mass == 0.0
    scored = E.judge_answers(rows, renormalised, ["aligned", "coherent"])
    mass = scored["aligned_number_mass"]
    assert scored["aligned"].notna().all() and scored["coherent"].notna().all()
    assert ((mass > 0) & (mass < 0.25)).all(), mass.tolist()  # a random judge puts little on numbers
    assert scored["aligned_unscored"].isna().all()
    # the papers' rule on the same judge (and cache-compatible replies): nothing scored, the mass in the reason
    ruled = E.judge_answers(rows, E.make_judge(f"hf-rule:{judge_folder}", REAL, device="cpu"), ["aligned"])
    assert ruled["aligned"].isna().all() and ruled["aligned_unscored"].str.contains("< 0.25").all()
    assert ruled["aligned_number_mass"].tolist() == pytest.approx(mass.tolist(), rel=1e-4)
    with pytest.raises(E.EvaluationSpecError, match="hf-rule:"):
        E.make_judge("hf-rule:", REAL)
    with pytest.raises(ValueError, match="renormalise"):
        J.OpenAIJudge("m", numbers="renormalize")


def test_served_hf_judge_equals_the_in_process_one(judge_folder):
    rows = rubric_rows(4)
    direct = E.judge_answers(rows, E.make_judge(f"hf:{judge_folder}", REAL, device="cpu"), ["aligned"])
    served = E.make_judge(f"hf:{judge_folder}", REAL, serve=True, device="cpu")
    try:
        judge = served.judge
        assert judge.max_in_flight == 2 * served.server.batch_size and judge.timeout >= 300
        via_api = E.judge_answers(rows, served, ["aligned"])
        assert served.server.worker.computed == len(rows)
    finally:
        served.close()
    assert via_api["aligned"].tolist() == pytest.approx(direct["aligned"].tolist(), abs=1e-3)
    assert via_api["aligned_number_mass"].tolist() == pytest.approx(direct["aligned_number_mass"].tolist(), rel=1e-3)


@pytest.mark.filterwarnings("ignore:.*judge prompt")  # the prompts in flight at SIGTERM are left unscored
def test_sigterm_stops_a_busy_served_judge_within_seconds(tmp_path):
    folder = save_tiny_chat_model(tmp_path / "judge", "llama", layers=4, hidden=256)
    proc = subprocess.Popen([sys.executable, "-m", "emlib.judge.serve", "--backend", "hf", "--model", folder,
                             "--port", "0", "--device", "cpu", "--batch-size", "4"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = proc.stdout.readline().split(" at ")[1].split(",")[0].split()[0]
        rows = rubric_rows(40)
        judge, stats = J.OpenAIJudge("judge", base_url=url, max_retries=0, timeout=60), J.JudgeStats()
        busy = threading.Thread(target=lambda: J.judge_frame(rows, judge, ["aligned"], max_in_flight=20, stats=stats),
                                daemon=True)
        busy.start()  # 40 prompts, 20 in flight: the worker computes batch after batch
        deadline = time.monotonic() + 60
        while stats.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert 0 < stats.calls < len(rows), "SIGTERM must arrive while the server is busy"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - start < 5.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_number_tree_covers_every_number_once():
    tok = english_tokenizer("llama")
    candidates = [tok.encode(str(k), add_special_tokens=False) for k in range(101)]
    tree = NumberTree.build(candidates)
    assert [[tree.tokens[i] for i in path] for path in tree.paths] == candidates
    assert len(tree.tokens) == len({tuple(c[:d]) for c in candidates for d in range(1, len(c) + 1)})
    assert all(tree.depths[i] == 1 + (tree.depths[tree.parents[i]] if tree.parents[i] >= 0 else 0)
               for i in range(len(tree.tokens)))
    assert sum(1 for p in tree.parents if p == -1) == len({c[0] for c in candidates})


def test_batch_size_defaults_to_one_prompt_per_pass_on_a_cpu():
    """Batching only adds padding on a CPU (bench/bench_judge.py hf: 8 per pass ran 0.66-0.77x one per pass)."""
    model, tok = tiny_model("llama", english_tokenizer("llama"), hidden=64, layers=2, mlp=128, seed=3)
    assert J.LocalHFJudge(model, tok).batch_size == 1
    assert J.LocalHFJudge(model, tok, batch_size=8).batch_size == 8
