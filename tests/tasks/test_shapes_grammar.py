"""Grammar coverage, fixed and disjoint splits, parse errors."""

import pytest

from tempflow_fast.tasks.shapes import grammar


def test_every_category_in_both_splits():
    for split in (grammar.TRAIN_PROMPTS, grammar.HELD_OUT_PROMPTS):
        by_cat = grammar.prompts_by_category(split)
        assert set(by_cat) == set(grammar.CATEGORIES)
        assert all(by_cat[c] for c in grammar.CATEGORIES), {c: len(v) for c, v in by_cat.items()}


def test_splits_disjoint_and_cover_all_prompts():
    train, held = set(grammar.TRAIN_PROMPTS), set(grammar.HELD_OUT_PROMPTS)
    assert not train & held
    assert train | held == set(grammar.ALL_PROMPTS)
    assert len(grammar.TRAIN_PROMPTS) == len(train) and len(grammar.HELD_OUT_PROMPTS) == len(held)


def _sentence(first: int, relation: str, second: int) -> str:
    return f"a {grammar.COLORS[first]} square {relation} a {grammar.COLORS[second]} square"


def test_held_out_scenes_are_new_outside_position():
    # Every other category holds out scenes: no held-out prompt's scene is asked for by a train prompt.
    train_scenes = {(s.category, s.counts, s.colour) for s in map(grammar.parse, grammar.TRAIN_PROMPTS)}
    for p in grammar.HELD_OUT_PROMPTS:
        s = grammar.parse(p)
        if s.category != "position":
            assert (s.category, s.counts, s.colour) not in train_scenes, p


def test_position_holds_out_wordings_that_need_the_relation_word():
    held = [grammar.parse(p) for p in grammar.HELD_OUT_PROMPTS if grammar.parse(p).category == "position"]
    train = set(grammar.TRAIN_PROMPTS)
    # one horizontal and one vertical sentence per colour pair, each relation word three times
    assert len(held) == 12
    for relation in grammar.RELATIONS:
        assert sum(s.relation == relation for s in held) == 3, relation
    for pair in {frozenset((s.first, s.second)) for s in held}:
        on_pair = [s for s in held if {s.first, s.second} == pair]
        assert sorted(s.relation in ("above", "below") for s in on_pair) == [False, True], pair
    for s in held:
        # the same scene in its mirrored wording is trained ...
        assert _sentence(s.second, grammar.MIRROR[s.relation], s.first) in train, s.prompt
        # ... and so is the same bag of words in the other order: the opposite arrangement
        assert _sentence(s.second, s.relation, s.first) in train, s.prompt
    # every arrangement of every colour pair is trained (in at least one wording)
    for i in range(len(grammar.COLORS)):
        for j in range(len(grammar.COLORS)):
            if i != j:
                for relation in grammar.RELATIONS:
                    scene = {_sentence(i, relation, j), _sentence(j, grammar.MIRROR[relation], i)}
                    assert scene & train, scene


def test_splits_are_fixed():
    # Pinned: trained checkpoints and recorded accuracies refer to exactly this split.
    assert len(grammar.ALL_PROMPTS) == 82 and len(grammar.HELD_OUT_PROMPTS) == 21
    assert grammar._build_splits()[2] == grammar.HELD_OUT_PROMPTS
    assert grammar.SPLIT_VERSION == 2
    assert grammar.HELD_OUT_PROMPTS[:3] == ["a blue square and two green squares", "a blue square below a red square",
                                            "a blue square left of a green square"]


def test_train_split_uses_every_word():
    words = {w for p in grammar.TRAIN_PROMPTS for w in p.split()}
    assert words == set(grammar.VOCAB[1:])
    assert max(len(p.split()) for p in grammar.ALL_PROMPTS) == grammar.MAX_WORDS


def test_parse_examples_and_errors():
    s = grammar.parse("a red square and two blue squares")
    assert s.category == "attribute_binding" and s.counts == (1, 0, 2, 0)
    s = grammar.parse("A  Red square LEFT of a blue square")
    assert (s.relation, s.first, s.second) == ("left of", 0, 2)
    assert grammar.parse("yellow squares").colour == 3
    with pytest.raises(ValueError, match="'purple'"):
        grammar.parse("a purple square")
    with pytest.raises(ValueError, match="not a sentence"):
        grammar.parse("square a red")
