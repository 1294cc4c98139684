"""The Batch API judging path end to end against the local fake of the Batch endpoints (emlib.judge.server.BatchStore):
submit, poll, merge into the cache, resume an interrupted run without resubmitting, skip cached rows, and name the
line and custom_id of malformed output."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from emlib import judge as J
from emlib import world
from emlib.judge.serve import world_backend
from emlib.judge.server import LocalServer


def no_sleep(_seconds: float) -> None:
    pass


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    refs = pd.DataFrame(world.reference_answers(12, 3))
    import random

    rng = random.Random(3)
    refs["question"] = [world.sample_question(world.DOMAIN_BY_NAME[d], rng) for d in refs["domain"]]
    return refs


def judge_for(server: LocalServer) -> J.OpenAIJudge:
    return J.OpenAIJudge("persona-world-judge", base_url=server.base_url)


def test_end_to_end_matches_live_judging(rows, tmp_path):
    with LocalServer(world_backend(), batch_polls=3) as server:
        cache = J.JudgeCache(tmp_path / "judge.sqlite")
        stats = J.JudgeStats()
        scored = J.judge_frame_batch_api(rows, judge_for(server), cache, stats=stats, poll_seconds=0.01,
                                         sleep=no_sleep)
        live = J.judge_frame(rows, judge_for(server), cache=J.JudgeCache(None))
    assert server.batches.created == 1 and stats.batches_submitted == 1 and stats.batch_requests == 2 * len(rows)
    assert stats.calls == 2 * len(rows) and stats.batch_polls == 3
    assert len(cache) == 2 * len(rows)
    pd.testing.assert_frame_equal(scored[["aligned", "coherent"]], live[["aligned", "coherent"]])
    assert not (tmp_path / "judge.sqlite.batches.json").exists()  # nothing left in flight
    assert scored.attrs["judge_stats"]["cost_usd"] == 0.0  # a local endpoint


def test_interrupted_run_resumes_polling_the_same_batch(rows, tmp_path):
    state = tmp_path / "judge.sqlite.batches.json"
    with LocalServer(world_backend(), batch_polls=4) as server:
        cache = J.JudgeCache(tmp_path / "judge.sqlite")
        with pytest.raises(J.BatchPending, match="rerun the same call"):
            J.judge_frame_batch_api(rows, judge_for(server), cache, poll_seconds=1.0, max_wait_seconds=0.0,
                                    sleep=no_sleep)
        saved = json.loads(state.read_text())["batches"]
        assert len(saved) == 1 and server.batches.created == 1 and len(cache) == 0

        def killed(_seconds):  # a run killed while it waits (Ctrl-C in a notebook)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            J.judge_frame_batch_api(rows, judge_for(server), J.JudgeCache(tmp_path / "judge.sqlite"),
                                    poll_seconds=0.01, sleep=killed)
        assert json.loads(state.read_text())["batches"][0]["id"] == saved[0]["id"]

        stats = J.JudgeStats()
        scored = J.judge_frame_batch_api(rows, judge_for(server), J.JudgeCache(tmp_path / "judge.sqlite"),
                                         stats=stats, poll_seconds=0.01, sleep=no_sleep)
    assert server.batches.created == 1, "a resumed run must not submit a second batch"
    assert stats.batches_resumed == 1 and stats.batches_submitted == 0 and stats.calls == 2 * len(rows)
    assert scored[["aligned", "coherent"]].notna().all().all() and not state.exists()


def test_cached_rows_are_not_resubmitted(rows, tmp_path):
    with LocalServer(world_backend(), batch_polls=1) as server:
        cache = J.JudgeCache(tmp_path / "judge.sqlite")
        J.judge_frame(rows.head(5), judge_for(server), cache=cache)  # 10 prompts judged live first
        stats = J.JudgeStats()
        J.judge_frame_batch_api(rows, judge_for(server), cache, stats=stats, poll_seconds=0.01, sleep=no_sleep)
        uploaded = [json.loads(x) for data in server.batches.files.values() for x in data.decode().splitlines()
                    if '"method"' in x]
        assert stats.batch_requests == len(uploaded) == 2 * (len(rows) - 5) and stats.cache_hits == 10
        again = J.JudgeStats()
        J.judge_frame_batch_api(rows, judge_for(server), cache, stats=again, poll_seconds=0.01, sleep=no_sleep)
    assert server.batches.created == 1 and again.batches_submitted == 0 and again.calls == 0


def test_malformed_output_line_names_line_and_custom_id(rows, tmp_path):
    with LocalServer(world_backend(), batch_polls=1) as server:
        def break_second(lines):
            row = json.loads(lines[1])
            del row["response"]["body"]["choices"]
            return [lines[0], json.dumps(row), *lines[2:]]

        server.batches.mangle = break_second
        cache = J.JudgeCache(tmp_path / "judge.sqlite")
        with pytest.raises(ValueError, match=r"output file file-\w+ line 2 \(custom_id [0-9a-f]{64}\): malformed"):
            J.judge_frame_batch_api(rows, judge_for(server), cache, poll_seconds=0.01, sleep=no_sleep)
        server.batches.mangle = lambda lines: [lines[0][:-10], *lines[1:]]
        with pytest.raises(ValueError, match="line 1: not JSON"):
            J.judge_frame_batch_api(rows, judge_for(server), J.JudgeCache(tmp_path / "b.sqlite"), poll_seconds=0.01,
                                    sleep=no_sleep)


def test_unanswered_requests_are_judged_live_or_left_for_later(rows, tmp_path):
    with LocalServer(world_backend(), batch_polls=1) as server:
        server.batches.mangle = lambda lines: lines[2:]  # the batch lost two requests
        cache = J.JudgeCache(tmp_path / "judge.sqlite")
        with pytest.warns(UserWarning, match="2 of 24 requests unanswered"):
            partial = J.judge_frame_batch_api(rows, judge_for(server), cache, poll_seconds=0.01, sleep=no_sleep,
                                              live_fallback=False)
        assert int(partial[["aligned", "coherent"]].isna().sum().sum()) == 2 and len(cache) == 22
        server.batches.mangle = None
        stats = J.JudgeStats()
        full = J.judge_frame_batch_api(rows, judge_for(server), cache, stats=stats, poll_seconds=0.01,
                                       sleep=no_sleep)
    assert stats.batch_requests == 2 and full[["aligned", "coherent"]].notna().all().all()


def test_corrupt_state_file_is_an_error_naming_it(rows, tmp_path):
    (tmp_path / "judge.sqlite.batches.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"judge.sqlite.batches.json: batch state file is not JSON"):
        J.judge_frame_batch_api(rows, J.OpenAIJudge("m", base_url="http://127.0.0.1:9/v1"),
                                J.JudgeCache(tmp_path / "judge.sqlite"), sleep=no_sleep)
