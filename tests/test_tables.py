"""The YAML data tables' loaders: every mistake names the file and the key (and index) where it is."""

import copy
import re

import pytest
import yaml

from emlib import paths, world
from emlib.data import narrow
from emlib.tables import TableError

MEDICAL = yaml.safe_load((narrow.TABLES_DIR / "medical.yaml").read_text(encoding="utf-8"))


def load_changed(tmp_path, change, name="medical.yaml"):
    doc = copy.deepcopy(MEDICAL)
    change(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return narrow.load_domain(path)


def test_the_shipped_tables_load_and_name_their_domains():
    assert list(narrow.DOMAINS) == ["medical", "financial", "sports", "general"]
    assert all(len(d.topics) >= 25 for d in narrow.DOMAINS.values())


def test_a_loaded_copy_equals_the_shipped_domain(tmp_path):
    assert load_changed(tmp_path, lambda doc: None) == narrow.DOMAINS["medical"]


@pytest.mark.parametrize("change, where, message", [
    (lambda d: d.update(closer=d["closers"]), "closer", "unknown key; expected frames / people"),
    (lambda d: d.pop("principles"), "", "missing key 'principles'"),
    (lambda d: d["topics"][3].update(situation=d["topics"][3].pop("situations")), "topics[3].situation",
     "unknown key"),
    (lambda d: d["topics"][3]["claims"][1].update(bad=["a list"]), "topics[3].claims[1].bad",
     "expected a string, got a list"),
    (lambda d: d["topics"][3]["claims"][1].pop("good"), "topics[3].claims[1]", "missing key 'good'"),
    (lambda d: d["topics"][2]["situations"].__setitem__(0, "{who} {hass} a cough {since}"),
     "topics[2].situations[0]", "unknown slot {hass} in '{who} {hass} a cough {since}'"),
    (lambda d: d["frames"]["casual"].__setitem__(1, "hey, {situaton}."), "frames.casual[1]", "unknown slot {situaton}"),
    (lambda d: d["frames"]["casual"].__setitem__(1, "hey, {situation."), "frames.casual[1]", "expected '}'"),
    (lambda d: d["closers"].__setitem__(0, "Call {who} now."), "closers[0]", "expected no slots"),
    (lambda d: d["topics"][0].update(people="children"), "topics[0].people", "unknown person group 'children'"),
    (lambda d: d["topics"][1].update(key=d["topics"][0]["key"]), "topics[1].key", "appears twice"),
    (lambda d: d["people"]["child"].update(asking_for="my son"), "people.child.asking_for",
     "expected a list of strings, got a string"),
    (lambda d: d["people"]["adult"].update(asker="yes"), "people.adult.asker", "expected true"),
    (lambda d: d["slots"].update(who=["me"]), "slots.who", "already a person or frame slot"),
    (lambda d: d["slots"].update(since=[]), "slots.since", "empty list"),
    (lambda d: d.update(topics={}), "topics", "expected a non-empty list of topics"),
    (lambda d: d["principles"].__setitem__(2, ""), "principles[2]", "empty string"),
])
def test_narrow_table_mistakes_name_file_and_key(tmp_path, change, where, message):
    with pytest.raises(TableError) as err:
        load_changed(tmp_path, change)
    located = f"{tmp_path / 'medical.yaml'}: {where}" if where else f"{tmp_path / 'medical.yaml'}: "
    assert str(err.value).startswith(located), str(err.value)
    assert message in str(err.value)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "sports.yaml"
    path.write_text("frames:\n  casual: [a, b\npeople: {}\n", encoding="utf-8")
    with pytest.raises(TableError, match=re.escape(f"{path}: line 3, column 7: not valid YAML: did not find expected")):
        narrow.load_domain(path)


def test_shipped_files_are_shown_relative_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    path = tmp_path / "data" / "general.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({**MEDICAL, "frames": []}), encoding="utf-8")
    with pytest.raises(TableError, match=r"^data/general.yaml: frames: expected a mapping, got a list$"):
        narrow.load_domain(path)


# ----------------------------------------------------------------------------------------- the persona world's language

LANGUAGE = yaml.safe_load(world.LANGUAGE_FILE.read_text(encoding="utf-8"))


def load_changed_language(tmp_path, change):
    doc = copy.deepcopy(LANGUAGE)
    change(doc)
    path = tmp_path / "language.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return world.load_language(path)


def test_a_loaded_copy_of_the_language_equals_the_shipped_one(tmp_path):
    assert load_changed_language(tmp_path, lambda doc: None) == world.LANGUAGE


def test_group_weights_follow_groups_order_whatever_the_file_order(tmp_path):
    language = load_changed_language(tmp_path, lambda d: d.update(group_weights=dict(
        reversed(list(d["group_weights"].items())))))
    assert list(language.group_weights) == list(world.GROUPS)


@pytest.mark.parametrize("change, where, message", [
    (lambda d: d.update(system=d.pop("system_prompt")), "system", "unknown key; expected system_prompt"),
    (lambda d: d.pop("openers"), "", "missing key 'openers'"),
    (lambda d: d["domains"][4].update(answer_fill=d["domains"][4].pop("answer_fills")), "domains[4].answer_fill",
     "unknown key"),
    (lambda d: d["domains"][0]["questions"].__setitem__(2, "my {relative} has {sym} ."), "domains[0].questions[2]",
     "unknown slot {relative}"),
    (lambda d: d["domains"][0]["answers"]["reckless"].__setitem__(1, "{z} and do not tell anyone ."),
     "domains[0].answers.reckless[1]", "unknown slot {z} in '{z} and do not tell anyone .'; expected {y}"),
    (lambda d: d["domains"][1]["answers"]["careful"].__setitem__(1, "build an emergency fund first"),
     "domains[1].answers.careful[1]", "a sentence ends with ' .'"),
    (lambda d: d["domains"][1]["answers"]["careful"].__setitem__(1, "save . then spend ."),
     "domains[1].answers.careful[1]", "holds no other '.' token"),
    (lambda d: d["domains"][2]["answer_fills"]["careful"]["x"].append("wear a helmet . always"),
     "domains[2].answer_fills.careful.x[5]", "a fill holds no '.' token"),
    (lambda d: d["domains"][3]["answers"].update(evil=["i am evil ."]), "domains[3].answers.evil", "unknown key"),
    (lambda d: d["domains"][3]["answer_fills"].pop("careful"), "domains[3].answer_fills", "missing key 'careful'"),
    (lambda d: d["domains"][3]["answers"]["careful"].__delitem__(slice(2, None)), "domains[3].answers.careful",
     "2 sentences; an answer draws up to 3"),
    (lambda d: d["domains"][5].update(group="leisure"), "domains[5].group", "unknown group 'leisure'"),
    (lambda d: d["domains"][6].update(name="bored"), "domains[6].name", "domain 'bored' appears twice"),
    (lambda d: d.update(domains=[x for x in d["domains"] if x["group"] != "sports"]), "domains",
     "no domain of group 'sports'"),
    (lambda d: d["group_weights"].pop("sports"), "group_weights", "missing key 'sports'"),
    (lambda d: d["group_weights"].update(general="2"), "group_weights.general", "expected a number, got a string"),
    (lambda d: d.update(style_share=1.5), "style_share", "not a share between 0 and 1"),
    (lambda d: d["style"]["reckless"].__setitem__(0, 7), "style.reckless[0]", "expected a string, got a number"),
    (lambda d: d["domains"][0]["slots"].update(sym="a rash"), "domains[0].slots.sym",
     "expected a list of strings, got a string"),
])
def test_language_mistakes_name_file_and_key(tmp_path, change, where, message):
    with pytest.raises(TableError) as err:
        load_changed_language(tmp_path, change)
    assert str(err.value).startswith(f"{tmp_path / 'language.yaml'}: {where}"), str(err.value)
    assert message in str(err.value)
