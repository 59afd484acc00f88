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


def test_position_holds_out_each_relation_word_on_its_own_pair():
    held = [grammar.parse(p) for p in grammar.HELD_OUT_PROMPTS if grammar.parse(p).category == "position"]
    train = set(grammar.TRAIN_PROMPTS)
    # each relation word on one colour pair, both orders; four different pairs
    assert len(held) == 8
    for relation in grammar.RELATIONS:
        on = [s for s in held if s.relation == relation]
        assert len(on) == 2 and (on[0].first, on[0].second) == (on[1].second, on[1].first), relation
    assert len({frozenset((s.first, s.second)) for s in held}) == 4
    for s in held:
        # no trained prompt has a held-out prompt's words: the same word on that pair is held out in both orders
        assert _sentence(s.second, s.relation, s.first) not in train, s.prompt
        # both scenes of the pair on that axis are trained, under the mirrored word
        assert _sentence(s.second, grammar.MIRROR[s.relation], s.first) in train, s.prompt
        assert _sentence(s.first, grammar.MIRROR[s.relation], s.second) in train, s.prompt
        # and the word itself is trained with every other pair
        others = {frozenset((i, j)) for i in range(4) for j in range(4) if i != j} - {frozenset((s.first, s.second))}
        for pair in others:
            i, j = sorted(pair)
            assert _sentence(i, s.relation, j) in train and _sentence(j, s.relation, i) in train, (s.prompt, pair)


def test_splits_are_fixed():
    # Pinned: trained checkpoints and recorded accuracies refer to exactly this split.
    assert len(grammar.ALL_PROMPTS) == 82 and len(grammar.HELD_OUT_PROMPTS) == 17
    assert grammar._build_splits()[2] == grammar.HELD_OUT_PROMPTS
    assert grammar.SPLIT_VERSION == 2
    assert grammar.HELD_OUT_PROMPTS[:3] == ["a blue square above a yellow square", "a blue square and two green squares",
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
