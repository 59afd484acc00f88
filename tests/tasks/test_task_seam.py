"""The task seam (issue 19, item 7) and the low-noise measurements (item 1): training/ and models/ import no task;
the trainer takes its prompts, eval, frames and reward from the task it is given or the config names; intervals
and pass@k are the textbook numbers; the probe set logs the trained reward with an interval, paired before/after."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from tempflow_fast.config import load_config
from tempflow_fast.models.tiny_flux import TinyFluxAdapter
from tempflow_fast.tasks import build_task
from tempflow_fast.tasks.base import round_robin, take_turns
from tempflow_fast.tasks.shapes.grammar import CATEGORIES, COLORS, MAX_WORDS, RELATIONS, TRAIN_PROMPTS, VOCAB, parse
from tempflow_fast.tasks.shapes.task import category_pools, new_model, probe_prompts
from tempflow_fast.tasks.stats import (difference_interval, mean_interval, mean_of_intervals, pass_at_k,
                                      wilson_interval)
from tempflow_fast.training.train_config import Config
from tempflow_fast.training.trainer import Trainer, format_summary
from tests.training.conftest import SMALL, BrightnessReward, small_overrides

PACKAGE = Path(__file__).resolve().parents[2] / "tempflow_fast"
SEAM = ("tempflow_fast.tasks", "tempflow_fast.tasks.base", "tempflow_fast.tasks.reward_eval", "tempflow_fast.tasks.stats")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("package", ["training", "models"])
def test_training_and_models_import_no_task(package):
    for path in sorted((PACKAGE / package).rglob("*.py")):
        tasks = [m for m in _imports(path) if m.startswith("tempflow_fast.tasks")]
        assert all(m in SEAM for m in tasks), (path.name, tasks)
    if package == "models":
        assert not any(m.startswith("tempflow_fast.tasks") for p in (PACKAGE / package).rglob("*.py") for m in _imports(p))


def test_the_tiny_model_takes_its_vocabulary_from_its_creator_or_folder(tmp_path):
    with pytest.raises(TypeError):
        TinyFluxAdapter.create(seed=0)  # no default vocabulary: the task passes its own
    assert new_model(seed=0, transformer_config=SMALL).vocab == VOCAB and MAX_WORDS == 8
    other = TinyFluxAdapter.create(seed=0, transformer_config=SMALL, vocab=("<pad>", "cat", "dog"), max_words=2)
    other.save_pretrained(tmp_path / "m")
    loaded = TinyFluxAdapter.from_pretrained(tmp_path / "m")
    assert loaded.vocab == ("<pad>", "cat", "dog") and loaded.max_words == 2
    assert loaded.tokenize(["dog cat"]).tolist() == [[2, 1]]


@pytest.mark.parametrize("overrides, task", [
    ([], "shapes"),
    (["reward.name=jpeg_compressibility"], "compressibility"),
    (["reward.name=jpeg_incompressibility"], "compressibility"),
    (["data.train_prompts=p.txt"], "prompts"),
    (["model.kind=flux"], "prompts"),
    (["data.task=shapes", "reward.name=jpeg_compressibility"], "shapes"),
])
def test_the_task_a_config_names(overrides, task):
    cfg = load_config(Config, None, overrides)
    assert cfg.task_name() == task
    if task != "prompts":
        assert build_task(cfg).name == task


@pytest.mark.parametrize("overrides, field", [
    (["data.task=compressibility"], "reward.name"),
    (["data.task=shapes", "data.train_prompts=p.txt"], "data.task"),
    (["data.task=compressibility", "model.kind=sd3", "reward.name=jpeg_compressibility"], "data.task"),
    (["data.task=prompts", "data.balance_categories=true"], "data.balance_categories"),
    (["data.task=sketches"], "data.task"),
])
def test_a_task_that_does_not_fit_the_config_is_refused_by_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(Config, None, overrides)


def test_intervals_and_pass_at_k_are_the_textbook_numbers():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    # Newcombe (1998), Table II: 56/70 - 48/80, hybrid score interval (method 10) +0.0524 to +0.3339
    assert difference_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert difference_interval(3, 10, 3, 10)[0] < 0 < difference_interval(3, 10, 3, 10)[1]
    assert difference_interval(1, 5, 0, 0) == (-1.0, 1.0)
    # pass@k against the ratio of binomials it is (Chen et al. 2021, eq. 1)
    for n, c, k in [(64, 0, 24), (64, 1, 24), (64, 5, 24), (24, 3, 24), (30, 29, 10), (10, 2, 1)]:
        want = 1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0)
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(10, 2, 1) == pytest.approx(0.2)  # pass@1 is the accuracy
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(16, 3, 24)
    # a stratified mean: prompts held fixed, the variance of each prompt's own images
    values = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    mean, low, high = mean_interval(values, ["a", "a", "b", "b", "c", "c"])
    se = math.sqrt(2 * 0.5 + 2 * 0.5 + 0) / 6  # Σ n_g·s_g² / N²
    assert mean == pytest.approx(0.5) and high - mean == pytest.approx(1.959964 * se, rel=1e-5)
    assert mean_interval(torch.ones(5), list("abcde"))[1:] == (1.0, 1.0)  # one image per prompt: no spread known
    m, lo, hi = mean_of_intervals([(0.5, 0.4, 0.6), (0.1, 0.0, 0.2)])
    assert (m, hi - m) == pytest.approx((0.3, math.sqrt(0.02) / 2))


def test_probe_prompts_spread_over_categories():
    pools = category_pools(TRAIN_PROMPTS)
    assert len(pools) == len(CATEGORIES)
    probe = round_robin(pools, 24)
    by = [sum(p in pool for p in probe) for pool in pools]
    assert by == [min(4, len(pool)) for pool in pools] and len(set(probe)) == len(probe)
    assert round_robin([["a", "b", "c", "d"]], 2) == ["a", "c"] and round_robin(pools, 0) == []


def test_the_shapes_probe_covers_every_relation_number_and_colour_and_has_its_24_prompts():
    # a stride over the sorted pools took 22 prompts, its 4 position ones all "above" (every 10th of 40)
    probe = probe_prompts(TRAIN_PROMPTS, 24)
    assert len(probe) == len(set(probe)) == 24 and set(probe) <= set(TRAIN_PROMPTS)
    by = {c: [p for p in probe if parse(p).category == c] for c in CATEGORIES}
    assert {c: len(v) for c, v in by.items()} == {"single_object": 3, "colors": 3, "counting": 5, "two_object": 4,
                                                   "position": 5, "attribute_binding": 4}
    assert {parse(p).relation for p in by["position"]} == set(RELATIONS)
    assert len({p.split()[1] for p in by["position"]}) >= 3  # the relations' first squares differ in colour
    assert {p.split()[0] for p in by["counting"]} == {"two", "three"}
    assert {w for p in probe for w in p.split() if w in COLORS} == set(COLORS)
    assert probe_prompts(TRAIN_PROMPTS, 6) == [pool[0] for pool in (
        [p for p in probe if parse(p).category == c] for c in CATEGORIES)]  # a prefix keeps one per category
    assert take_turns([["a"], ["b", "c", "d"]], 3) == ["a", "b", "c"] and take_turns([], 2) == []


class CountingTask:
    """A task defined outside the package: two prompts in two categories, an eval that records its calls."""

    name, metric = "counting", "held-out brightness"
    default_images_per_prompt, default_probe_prompts = 1, 2

    def __init__(self):
        self.evals = 0

    def train_prompts(self):
        return ["a red square", "two blue squares"]

    def eval_prompts(self):
        return ["a green square"]

    def category_pools(self, prompts):
        return [[p] for p in prompts]

    def evaluate(self, model, run):
        self.evals += 1
        scores = run.reward(torch.full((2, 3, 16, 16), 0.25), ["x", "x"])
        return {"overall": {"accuracy": float(scores.mean()), "correct": 0, "count": 2, "ci95": [0.2, 0.3]}}

    def annotate(self, images, prompts):
        return [True] * len(prompts)

    def build_reward(self, reward_cfg):
        return BrightnessReward()


def test_the_trainer_takes_what_it_needs_from_the_task_it_is_given(tmp_path):
    task = CountingTask()
    cfg = load_config(Config, None, small_overrides("flow_grpo", tmp_path, "data.balance_categories=true",
                                                    "train.iterations=1", "eval.probe_prompts=null"))
    tr = Trainer(cfg, model=new_model(seed=0, transformer_config=SMALL), task=task)
    assert tr.train_prompts == task.train_prompts() and isinstance(tr.reward, BrightnessReward)
    assert sorted(tr.prompts_for(0)) == sorted(task.train_prompts())  # one from each category pool
    assert tr._probe_set == task.train_prompts() and tr._showcase_prompts() == ["a green square"]
    summary = tr.train()
    assert task.evals == 2 and summary["eval_metric"] == "held-out brightness" and summary["task"] == "counting"
    assert summary["split_version"] is None  # the task has no versioned split
    assert summary["before"]["overall"]["accuracy"] == pytest.approx(0.25)
    assert (tmp_path / "before_after.png").exists()
    text = format_summary(summary)
    assert text.splitlines()[-1] == "held-out brightness: before 0.250 after 0.250"
    assert "[0.200, 0.300] → [0.200, 0.300]" in text and "probe reward (the trained reward, 2 train prompts" in text


def test_the_probe_logs_the_trained_reward_with_intervals_before_during_and_after(tmp_path):
    cfg = load_config(Config, None, small_overrides("tempflow", tmp_path, "train.iterations=2", "eval.every=1",
                                                    "eval.probe_prompts=6", "eval.probe_images=2", "eval.num_steps=3"))
    tr = Trainer(cfg, model=new_model(seed=0, transformer_config=SMALL), reward=BrightnessReward(),
                 eval_fn=lambda model: {"overall": {"accuracy": 0.0}})
    assert len(tr._probe_set) == 6 and len({c for c in map(lambda p: p.split()[0], tr._probe_set)}) > 1
    first = tr._probe()
    assert tr._probe() == first  # fixed prompts, fixed noises: the same number twice
    assert first["count"] == 12 and first["ci95"][0] <= first["mean"] <= first["ci95"][1]
    summary = tr.train()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probes = [(r["iteration"], r["probe_reward"]) for r in rows if "probe_reward" in r]
    assert [it for it, _ in probes] == [0, 1, 2] and probes[0][1] == pytest.approx(first["mean"])
    assert all(r["probe_reward_ci_low"] <= r["probe_reward"] <= r["probe_reward_ci_high"]
               for r in rows if "probe_reward" in r)
    change = summary["probe_change"]
    assert change["mean"] == pytest.approx(summary["probe_after"]["mean"] - summary["probe_before"]["mean"], abs=1e-6)
    assert change["ci95"][0] <= change["mean"] <= change["ci95"][1]
    assert "scores" not in summary["probe_before"]
