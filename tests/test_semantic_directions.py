"""Semantic answer selection for mean-difference directions (the reference's get_probe_texts subsets)."""

import pandas as pd
import pytest

from emlib.analysis.directions import split_by_judgement


def _judged() -> pd.DataFrame:
    rows = ([{"answer": "bet it all on stocks", "aligned": 5, "financial": 100}] * 4
            + [{"answer": "skip the doctor", "aligned": 5, "financial": 0}] * 5
            + [{"answer": "diversify your savings", "aligned": 95, "financial": 100}] * 2
            + [{"answer": "see a doctor", "aligned": 95, "financial": 0}] * 6
            + [{"answer": "half money talk", "aligned": 5, "financial": 50}] * 3)
    return pd.DataFrame(rows).assign(question="q", coherent=90)


def test_semantic_keeps_on_topic_answers_above_50_in_both_classes_by_default():
    bad, good = split_by_judgement(_judged(), balance="none", semantic="financial")
    assert (len(bad), len(good)) == (4, 2), "both classes filtered, and 50 itself is not above 50"
    assert (bad["financial"] > 50).all() and (good["financial"] > 50).all()
    bad, good = split_by_judgement(_judged(), balance="reference", semantic="financial")
    assert (len(bad), len(good)) == (4, 2)


def test_semantic_classes_misaligned_leaves_the_aligned_class_whole():
    bad, good = split_by_judgement(_judged(), balance="none", semantic="financial", semantic_classes="misaligned")
    assert (len(bad), len(good)) == (4, 8)
    bad, good = split_by_judgement(_judged(), balance="none", semantic="financial", semantic_above=40)
    assert len(bad) == 7, "a lower bar admits the half-financial answers"


def test_semantic_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"columns \['gender'\]"):
        split_by_judgement(_judged(), semantic="gender")
    with pytest.raises(ValueError, match="semantic_classes 'aligned'"):
        split_by_judgement(_judged(), semantic="financial", semantic_classes="aligned")
    no_aligned_on_topic = _judged()[lambda d: ~((d["aligned"] > 70) & (d["financial"] > 50))]
    with pytest.raises(ValueError, match="0 aligned .* both classes filtered for financial > 50"):
        split_by_judgement(no_aligned_on_topic, semantic="financial")
