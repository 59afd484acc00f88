"""Detector exactness: 100% on ground-truth renders, 0% against every incompatible prompt."""

import numpy as np
import pytest
import torch

from tempflow_fast.tasks.shapes import detector, grammar, render
from tempflow_fast.tasks.shapes.detector import Detections, ShapesReward

RENDERS_PER_PROMPT = 12


def compatible(a: grammar.PromptSpec, b: grammar.PromptSpec) -> bool:
    """Whether some scene satisfies both prompts (worked out from the grammar, not the detector)."""
    if a.counts is None and b.counts is None:
        return a.colour == b.colour
    if a.counts is None or b.counts is None:
        only, counted = (a, b) if a.counts is None else (b, a)
        return all(n == 0 for c, n in enumerate(counted.counts) if c != only.colour)
    if a.counts != b.counts:
        return False
    if a.relation and b.relation:
        # Normalise both to "first is left-of/above second"; opposite directions on one axis clash.
        def norm(s):
            flip = s.relation in ("right of", "below")
            axis = "x" if s.relation in ("left of", "right of") else "y"
            return axis, (s.second, s.first) if flip else (s.first, s.second)

        (axis_a, pair_a), (axis_b, pair_b) = norm(a), norm(b)
        return not (axis_a == axis_b and pair_a != pair_b)
    return True


@pytest.fixture(scope="module")
def ground_truth():
    prompts = [p for p in grammar.ALL_PROMPTS for _ in range(RENDERS_PER_PROMPT)]
    images = render.render(prompts, np.random.default_rng(0))
    return prompts, images, detector.detect(images)


def test_ground_truth_is_all_correct(ground_truth):
    prompts, images, det = ground_truth
    assert detector.judge(det, prompts).all()
    reward = ShapesReward()
    r = reward(images, prompts)
    assert r.dtype == torch.float32 and r.shape == (len(prompts),) and bool((r == 1).all())
    assert reward.details["overall"] == {"accuracy": 1.0, "correct": len(prompts), "count": len(prompts),
                                         "image_accuracy": 1.0}
    assert set(reward.details) == set(grammar.CATEGORIES) | {"overall"}


def test_incompatible_prompts_score_zero(ground_truth):
    prompts, _, det = ground_truth
    specs = {p: grammar.parse(p) for p in grammar.ALL_PROMPTS}
    n_pairs = 0
    for other in grammar.ALL_PROMPTS:
        mask = torch.tensor([not compatible(specs[p], specs[other]) for p in prompts])
        if not mask.any():
            continue
        sub = Detections(det.counts[mask], det.centroids[mask], det.oversized[mask])
        ok = detector.judge(sub, [other] * int(mask.sum()))
        assert not ok.any(), (other, [prompts[i] for i in mask.nonzero().flatten()[ok].tolist()][:3])
        n_pairs += int(mask.sum())
    assert n_pairs > 10000  # most prompt pairs are incompatible; make sure the test really ran them


def test_robust_to_mild_noise_and_ignores_specks():
    prompts = ["a red square left of a blue square", "three yellow squares", "green squares"] * 8
    images = render.render(prompts, np.random.default_rng(1))
    noisy = (images + 0.15 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert detector.correct(noisy, prompts).all()
    speck = images.clone()
    speck[:, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3)  # a 1-px red dot: below a quarter square
    assert detector.correct(speck, prompts).all()


def test_blank_and_merged_images_fail():
    prompts = ["a red square", "red squares", "two red squares"]
    blank = torch.zeros(3, 3, 16, 16)
    assert not detector.correct(blank, prompts).any()
    merged = torch.zeros(3, 3, 16, 16)
    merged[:, 0, 2:6, 2:10] = 1.0  # two touching red squares: one 32-px blob, not a square at all
    assert not detector.correct(merged, prompts).any()
    smear = torch.zeros(3, 3, 16, 16)
    smear[:, 0, 2:7, 2:7] = 1.0  # 25 px: too big for a square
    assert not detector.correct(smear, prompts).any()
    near = torch.zeros(3, 3, 16, 16)
    near[:, 0, 2:6, 2:7] = 1.0  # 20 px: a slightly sloppy square still counts
    assert detector.correct(near, prompts).tolist() == [True, True, False]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="images"):
        detector.correct(torch.zeros(2, 1, 16, 16), ["a red square"] * 2)
    with pytest.raises(ValueError, match="prompts"):
        detector.correct(torch.zeros(2, 3, 16, 16), ["a red square"])


def test_overall_is_mean_of_categories():
    prompts = ["a red square"] * 2 + ["a red square left of a blue square"] * 6
    table = detector.accuracy_by_category(torch.tensor([1, 1, 1, 0, 0, 0, 0, 0]), prompts)
    assert table["single_object"]["accuracy"] == 1.0 and table["position"]["accuracy"] == pytest.approx(1 / 6)
    assert table["overall"]["accuracy"] == pytest.approx((1 + 1 / 6) / 2)
    assert table["overall"]["image_accuracy"] == pytest.approx(3 / 8)


def test_partial_score_is_one_exactly_where_strict_is(ground_truth):
    prompts, _, det = ground_truth
    assert bool((detector.partial_score(det, prompts) == 1).all())
    others = [grammar.ALL_PROMPTS[(7 * i + 3) % len(grammar.ALL_PROMPTS)] for i in range(len(prompts))]
    score, ok = detector.partial_score(det, others), detector.judge(det, others)
    assert bool(((score == 1) == ok).all()) and bool((score >= 0).all())
    assert 0 < float(score[~ok].mean()) < 1  # wrong images still get partial credit, but never full


@pytest.mark.parametrize("drawn, asked, expected", [
    ("two blue squares", "three blue squares", 2 / 3),  # one square short of three
    ("a red square", "a red square left of a blue square", 1 / 3),  # red right; blue and the relation missing
    ("a red square and a green square", "red squares", 1 / 2),  # the red is there; an unasked green too
    ("three yellow squares", "a yellow square", 0.0),  # |3 - 1| / 1 ≥ 1
    ("a red square left of a blue square", "a red square right of a blue square", 2 / 3),  # relation wrong
])
def test_partial_score_values(drawn, asked, expected):
    images = render.render([drawn] * 4, np.random.default_rng(2))
    got = detector.partial_score(detector.detect(images), [asked] * 4)
    assert torch.allclose(got, torch.full((4,), expected)), got


def test_reward_modes():
    prompts = ["two blue squares", "three blue squares"]
    images = render.render(["two blue squares"] * 2, np.random.default_rng(3))
    assert ShapesReward()(images, prompts).tolist() == [1.0, 0.0]
    partial = ShapesReward(mode="partial")
    assert torch.allclose(partial(images, prompts), torch.tensor([1.0, 2 / 3]))
    assert partial.details["counting"]["accuracy"] == 0.5  # details stay strict
    with pytest.raises(ValueError, match="mode"):
        ShapesReward(mode="lenient")


@pytest.mark.parametrize("drawn, asked, mode", [
    ("two blue squares", "two blue squares", "correct"),
    ("two blue squares", "three blue squares", "too few"),
    ("three yellow squares", "a yellow square", "too many"),
    ("a red square and a green square", "a red square and a blue square", "wrong colours"),
    ("a red square left of a blue square", "a red square right of a blue square", "relation"),
    ("a red square and a green square", "red squares", "wrong colours"),
])
def test_failure_modes(drawn, asked, mode):
    images = render.render([drawn] * 3, np.random.default_rng(4))
    assert detector.failure_modes(detector.detect(images), [asked] * 3) == [mode] * 3


def test_failure_mode_oversized_and_empty():
    blob = torch.zeros(2, 3, 16, 16)
    blob[:, 0, 2:9, 2:9] = 1.0  # a 49-px red patch: not a square
    assert detector.failure_modes(detector.detect(blob), ["a red square", "red squares"]) == ["oversized"] * 2
    blank = torch.zeros(2, 3, 16, 16)
    assert detector.failure_modes(detector.detect(blank), ["red squares", "two red squares"]) == ["too few"] * 2


def test_word_table_on_ground_truth_renders(ground_truth):
    """Every word holds whenever the prompt says it; colours and counts appear otherwise only as the grammar allows,
    and a relation never holds when its opposite was asked (renders keep the squares apart)."""
    prompts, _, det = ground_truth
    table = detector.word_table(det, prompts)
    words = set(grammar.COLORS) | {"a", "two", "three"} | set(grammar.RELATIONS)
    assert set(table) == words
    assert all(row["asked"] == 1.0 and row["asked_images"] > 0 for row in table.values())
    for relation in grammar.RELATIONS:
        assert table[relation]["otherwise"] == 0.0 and table[relation]["otherwise_images"] > 0
    assert all(table[c]["otherwise"] == 0.0 for c in grammar.COLORS)  # a render never adds an unasked colour
    assert table["two"]["otherwise"] == 0.0  # a colour asked once or three times is never drawn twice
    for row in table.values():  # the lift and its interval: a word that always holds, and never otherwise, is known
        assert row["lift"] == row["asked"] - row["otherwise"]
        low, high = row["lift_ci95"]
        if row["otherwise_images"]:
            assert 0.0 < low <= row["lift"] <= high <= 1.0
