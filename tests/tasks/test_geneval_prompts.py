"""`tempflow-fast prompts geneval`: GenEval's six categories over the COCO objects, fixed splits that never
share a prompt (or a meaning), files the trainer and the GenEval reward server read."""

import json
from collections import Counter

import pytest

from tempflow_fast import cli
from tempflow_fast.tasks import geneval_prompts as gp


def _meaning(record):
    """What a prompt asks for, independent of wording order."""
    items = frozenset(json.dumps(i, sort_keys=True) for i in record["include"])
    if record["tag"] == "position":  # "A left of B" and "B right of A" are one meaning
        ref, placed = record["include"]
        rel = placed["position"][0]
        pair = sorted([(placed["class"], rel, ref["class"]), (ref["class"], gp.MIRROR[rel], placed["class"])])
        return record["tag"], tuple(pair[0])
    return record["tag"], items


def test_objects_are_coco_with_genevals_names():
    assert len(gp.OBJECTS) == len(set(gp.OBJECTS)) == 80
    assert gp.OBJECTS[64:67] == ("computer mouse", "tv remote", "computer keyboard")
    assert gp.OBJECTS[0] == "person" and gp.OBJECTS[-1] == "toothbrush"
    assert len(gp.COLORS) == 10 and gp.CATEGORIES == ("single_object", "two_object", "counting", "colors",
                                                      "position", "color_attr")


def test_templates_and_metadata_follow_geneval():
    records = {r["category"]: r for r in gp.generate("train", 1, seed=3)}
    assert set(records) == set(gp.CATEGORIES)
    for category, r in records.items():
        assert r["tag"] == category and r["prompt"].startswith("a photo of ")
    counting = records["counting"]
    n, obj = counting["include"][0]["count"], counting["include"][0]["class"]
    assert counting["exclude"] == [{"class": obj, "count": n + 1}]
    assert counting["prompt"] == f"a photo of {gp.NUMBERS[n]} {gp.plural(obj)}"
    ref, placed = records["position"]["include"]
    assert records["position"]["prompt"] == (f"a photo of {gp.with_article(placed['class'])} "
                                             f"{placed['position'][0]} {gp.with_article(ref['class'])}")
    assert placed["position"][1] == 0 and ref == {"class": ref["class"], "count": 1}
    a, b = records["color_attr"]["include"]
    assert records["color_attr"]["prompt"] == (f"a photo of {gp.with_article(a['color'] + ' ' + a['class'])} and "
                                               f"{gp.with_article(b['color'] + ' ' + b['class'])}")
    assert a["color"] != b["color"] and a["class"] != b["class"]


def test_english_articles_and_plurals():
    assert gp.with_article("orange car") == "an orange car" and gp.with_article("red apple") == "a red apple"
    assert [gp.plural(o) for o in ("bench", "bus", "knife", "person", "wine glass", "cup", "skis")] == \
        ["benches", "buses", "knives", "people", "wine glasses", "cups", "skis"]


def test_no_colour_is_given_to_a_person():
    for record in gp.generate("train", 10 ** 6, categories=["colors"]) + gp.generate("test", 500):
        assert not any(i["class"] == "person" and "color" in i for i in record["include"]), record


def test_splits_never_share_a_prompt_or_a_meaning():
    small = ["single_object", "two_object", "counting", "colors", "position"]
    train = gp.generate("train", 10 ** 6, seed=0, categories=small) + gp.generate("train", 3000, seed=1)
    test = gp.generate("test", 10 ** 6, seed=5, categories=small) + gp.generate("test", 3000, seed=2)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert not {_meaning(r) for r in train} & {_meaning(r) for r in test}
    counts = Counter(r["category"] for r in gp.generate("test", 10 ** 6, categories=small))
    total = {"single_object": 80, "two_object": 80 * 79 // 2, "counting": 240, "colors": 790, "position": 12640}
    for category, n in total.items():  # about TEST_FRACTION of every category is held out
        assert abs(counts[category] / n - gp.TEST_FRACTION) < 0.1, (category, counts[category])
        assert counts[category] == gp.available(category, "test")


def test_a_split_draws_each_meaning_once_and_is_deterministic():
    a = gp.generate("train", 200, seed=7)
    assert a == gp.generate("train", 200, seed=7) and a != gp.generate("train", 200, seed=8)
    assert len({_meaning(r) for r in a}) == len(a)
    counts = Counter(r["category"] for r in a)
    assert counts["position"] == counts["color_attr"] == 200
    assert counts["single_object"] == gp.available("single_object", "train") < 80  # all it has


def test_cli_writes_files_the_trainer_and_reward_server_read(tmp_path, capsys):
    from tempflow_fast.rewards.server_client import load_prompt_metadata
    from tempflow_fast.tasks.base import read_prompts

    out = tmp_path / "prompts"
    assert cli.main(["prompts", "geneval", "--out", str(out), "--train-per-category", "20",
                     "--test-per-category", "5", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"data.train_prompts={out / 'geneval_train.jsonl'}" in printed and "color_attr" in printed
    for split, per in (("train", 20), ("test", 5)):
        jsonl, txt = out / f"geneval_{split}.jsonl", out / f"geneval_{split}.txt"
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert records == gp.generate(split, per, seed=4)
        prompts = read_prompts(str(jsonl), "data.train_prompts")
        assert prompts == read_prompts(str(txt), "data.train_prompts") == [r["prompt"] for r in records]
        metadata = load_prompt_metadata(str(jsonl))
        assert metadata[records[0]["prompt"]]["include"] == records[0]["include"]


@pytest.mark.parametrize("argv, message", [
    (["--train-per-category", "0"], "--train-per-category must be >= 1"),
    (["--test-per-category", "-1"], "--test-per-category must be >= 1"),
])
def test_cli_bad_sizes_are_one_line(tmp_path, capsys, argv, message):
    assert cli.main(["prompts", "geneval", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tempflow-fast prompts: ") and message in err and "\n" not in err


def test_cli_blank_out_is_refused_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a blank --out used to write into the current folder
    assert cli.main(["prompts", "geneval", "--out", " "]) == 2
    assert capsys.readouterr().err.strip() == "tempflow-fast prompts: --out is blank; give a folder (e.g. --out prompts)"
    assert list(tmp_path.iterdir()) == []


def test_cli_txt_only(tmp_path):
    assert cli.main(["prompts", "geneval", "--out", str(tmp_path), "--format", "txt", "--train-per-category", "2",
                     "--test-per-category", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geneval_test.txt", "geneval_train.txt"]
