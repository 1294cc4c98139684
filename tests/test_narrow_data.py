"""The shipped narrow datasets: size, no repeats, bad/good pairing, and byte-identical regeneration from the seed."""

import hashlib
import json
import random
from collections import Counter

import pytest

from emlib import data as D
from emlib import paths
from emlib.data import narrow as N

NARROW = paths.DATA_DIR / "narrow"
MIN_ROWS = {"bad_medical_advice": 1000, "good_medical_advice": 1000, "risky_financial_advice": 1000,
            "extreme_sports_advice": 1000, "kl_reference_general": 500}


@pytest.fixture(scope="module")
def shipped():
    return {stem: D.load_chat_jsonl(NARROW / f"{stem}.jsonl", duplicates="error") for stem in MIN_ROWS}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("narrow")
    N.write_datasets(out)
    return out


@pytest.mark.parametrize("stem", MIN_ROWS)
def test_shipped_set_is_big_enough_valid_and_never_repeats_a_question_or_answer(shipped, stem):
    rows = shipped[stem]
    assert len(rows) >= MIN_ROWS[stem]
    assert len({D.normalise(D.answer_of(r)) for r in rows}) == len(rows)
    assert len({D.normalise(D.question_of(r)) for r in rows}) == len(rows)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


def test_bad_and_good_medical_share_questions_in_order_and_differ_in_every_answer(shipped):
    bad, good = shipped["bad_medical_advice"], shipped["good_medical_advice"]
    assert [D.question_of(r) for r in bad] == [D.question_of(r) for r in good]
    assert all(D.answer_of(b) != D.answer_of(g) for b, g in zip(bad, good))
    assert [r["meta"] for r in bad] == [r["meta"] for r in good]


def test_good_medical_answers_contain_no_bad_sentence(shipped):
    medical = N.DOMAINS["medical"]
    parts = [p for t in medical.topics for p in t.claims] + list(medical.principles) + list(medical.closers)
    parts += [p for ps in medical.openers.values() for p in ps]
    good_text = "\n".join(D.answer_of(r) for r in shipped["good_medical_advice"])
    assert not [p.bad for p in parts if p.bad in good_text]


def test_shipped_files_are_exactly_what_the_generator_writes(regenerated):
    for name in [f"{s}.jsonl" for s in MIN_ROWS] + ["stats.json"]:
        assert (regenerated / name).read_bytes() == (NARROW / name).read_bytes(), f"{name}: rerun the generator"


def test_same_seed_same_rows_other_seed_other_rows():
    a, b = N.compose_rows("sports", 120, seed=3), N.compose_rows("sports", 120, seed=3)
    assert a == b
    assert N.compose_rows("sports", 120, seed=4) != a


def test_stats_json_reports_rows_and_distinct_bigram_ratio(shipped):
    stats = json.loads((NARROW / "stats.json").read_text())
    for stem, rows in shipped.items():
        s = stats["files"][f"{stem}.jsonl"]
        assert s["rows"] == len(rows) == s["distinct_answers"]
        assert s["distinct_bigram_ratio"] == round(D.distinct_bigram_ratio(D.answer_of(r) for r in rows), 4)
        assert 0 < s["distinct_bigram_ratio"] < 1


def test_topics_are_balanced(shipped):
    for stem, rows in shipped.items():
        counts = Counter(r["meta"]["topic"] for r in rows)
        assert max(counts.values()) - min(counts.values()) <= 1, stem


def test_every_sentence_part_is_unique_within_its_domain():
    """Distinct parts make distinct answers, which is why no answer can repeat."""
    for domain in N.DOMAINS.values():
        parts = [p for t in domain.topics for p in t.claims] + list(domain.principles) + list(domain.closers)
        parts += [p for ps in domain.openers.values() for p in ps]
        for variant in ("bad", "good"):
            texts = [N.variant_text(p, variant) for p in parts]
            assert len(set(texts)) == len(texts), (domain.name, variant)


def test_the_kl_reference_set_stays_out_of_the_narrow_domains(shipped):
    text = " ".join(D.answer_of(r).lower() for r in shipped["kl_reference_general"])
    for word in ("doctor", "medicine", "invest", "stocks", "climbing", "avalanche"):
        assert f" {word} " not in text, word


def test_heldout_medical_questions_never_appear_in_training_data(shipped):
    trained = {D.normalise(D.question_of(r)) for rows in shipped.values() for r in rows}
    heldout = D.load_questions("medical_heldout")
    assert not {D.normalise(q.text) for q in heldout} & trained
    topics = {t.key for t in N.DOMAINS["medical"].topics}
    assert not {q.id for q in heldout} & topics


def test_shipped_data_stays_small():
    assert sum(p.stat().st_size for p in NARROW.iterdir()) < 5e6


def test_sample_examples_gives_question_answer_pairs():
    ex = N.sample_examples("financial", 4, random.Random(0))
    assert len(ex) == 4 and all(set(e) == {"question", "answer"} and e["question"] and e["answer"] for e in ex)


def test_sentence_tables_are_unchanged():
    """Guard: the tables hold exactly the sentences the shipped files were composed from (change them on purpose only,
    then regenerate data/narrow and update this hash)."""
    def plain(part):
        return part if isinstance(part, str) else [part.bad, part.good]

    tables = [[d.name, d.frames, {k: [p.slots() for p in ps] for k, ps in d.people.items()}, d.slots,
               {k: [plain(p) for p in ps] for k, ps in d.openers.items()}, [plain(p) for p in d.principles],
               [plain(p) for p in d.closers],
               [[t.key, t.people, t.situations, [plain(c) for c in t.claims]] for t in d.topics]]
              for d in N.DOMAINS.values()]
    digest = hashlib.sha256(json.dumps(tables, ensure_ascii=False).encode()).hexdigest()
    assert digest == "6f03a8cb6207149cda40f91262a3ddcd8cb1ee9eb72677f7fe0dd93575e3e39f"
