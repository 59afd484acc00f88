"""Composite rewards (weights, normalisation, logged components), AsyncScorer ordering, the
`reward:` config section, and the optional-dependency errors of HPS / ImageReward."""

import sys
import threading
import time

import pytest
import torch

from tempflow_fast.config import load_config
from tempflow_fast.rewards import AsyncScorer, CompositeReward, RewardConfig, build_reward
from tempflow_fast.tasks.shapes.detector import ShapesReward


class Fixed:
    """Returns preset scores (one tensor per call, in order), recording its calls."""

    def __init__(self, name, *batches):
        self.name, self.batches, self.calls = name, [torch.tensor(b, dtype=torch.float32) for b in batches], 0

    def __call__(self, images, prompts):
        out = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return out


def _images(b):
    return torch.zeros(b, 3, 4, 4)


def test_plain_weighted_sum_and_logged_components():
    a, b = Fixed("a", [1.0, 2.0, 3.0]), Fixed("b", [10.0, 0.0, -10.0])
    comp = CompositeReward([(a, 0.5), (b, 2.0)], normalize="none")
    out = comp(_images(3), ["x"] * 3)
    torch.testing.assert_close(out, torch.tensor([20.5, 1.0, -18.5]))
    assert set(comp.last_components) == {"a", "b"}
    torch.testing.assert_close(comp.last_components["b"], torch.tensor([10.0, 0.0, -10.0]))
    assert comp.last_means == {"a": 2.0, "b": 0.0}


def test_batch_normalisation_is_a_per_call_z_score():
    a, b = Fixed("a", [1.0, 2.0, 3.0]), Fixed("b", [100.0, 300.0, 200.0])
    out = CompositeReward([(a, 1.0), (b, 1.0)], normalize="batch")(_images(3), ["x"] * 3)
    z = lambda v: (torch.tensor(v) - torch.tensor(v).mean()) / torch.tensor(v).std(unbiased=False)
    torch.testing.assert_close(out, z([1.0, 2.0, 3.0]) + z([100.0, 300.0, 200.0]))


def test_running_normalisation_accumulates_across_calls_and_resumes():
    a = Fixed("a", [0.0, 2.0], [4.0, 6.0])
    comp = CompositeReward([(a, 3.0)], normalize="running")
    first = comp(_images(2), ["x"] * 2)
    torch.testing.assert_close(first, 3.0 * torch.tensor([-1.0, 1.0]))  # first call: its own mean 1, std 1
    second = comp(_images(2), ["x"] * 2)
    all_ = torch.tensor([0.0, 2.0, 4.0, 6.0])
    torch.testing.assert_close(second, 3.0 * (torch.tensor([4.0, 6.0]) - all_.mean()) / all_.std(unbiased=False))
    resumed = CompositeReward([(Fixed("a", [4.0, 6.0]), 3.0)], normalize="running")
    resumed.load_state_dict({"a": {"count": 2, "mean": 1.0, "m2": 2.0}})
    torch.testing.assert_close(resumed(_images(2), ["x"] * 2), second)
    assert comp.state_dict()["a"]["count"] == 4


def test_constant_and_nan_scores_stay_finite_where_they_should():
    comp = CompositeReward([(Fixed("flat", [1.0, 1.0, 1.0]), 1.0), (Fixed("holes", [1.0, float("nan"), 3.0]), 1.0)])
    out = comp(_images(3), ["x"] * 3)
    assert out[0] == -1.0 and torch.isnan(out[1]) and out[2] == 1.0  # flat component contributes 0
    assert comp.last_means["holes"] == 2.0


def test_composite_argument_errors():
    with pytest.raises(ValueError, match="distinct string names"):
        CompositeReward([(Fixed("a", [1.0]), 1.0), (Fixed("a", [1.0]), 1.0)])
    with pytest.raises(ValueError, match="normalize must be one of"):
        CompositeReward([(Fixed("a", [1.0]), 1.0)], normalize="minmax")
    with pytest.raises(ValueError, match=r"returned shape \(2,\), expected \(3,\)"):
        CompositeReward([(Fixed("a", [1.0, 2.0]), 1.0)])(_images(3), ["x"] * 3)


def test_async_scorer_preserves_order_and_overlaps():
    started = []

    class Slow:
        name = "slow"

        def __call__(self, images, prompts):
            started.append(prompts[0])
            time.sleep(0.02 * (3 - int(prompts[0])))  # earlier batches take longer
            return images.flatten(1).mean(1)

    with AsyncScorer(Slow()) as scorer:
        t0 = time.monotonic()
        futures = [scorer.submit(torch.full((2, 3, 2, 2), float(i)), [str(i)] * 2) for i in range(3)]
        submitted = time.monotonic() - t0
        results = [f.result(timeout=10) for f in futures]
    assert submitted < 0.05  # submit does not wait for scoring
    assert started == ["0", "1", "2"]
    for i, r in enumerate(results):
        assert torch.equal(r, torch.full((2,), float(i)))


def test_async_scorer_runs_off_the_calling_thread_and_reraises():
    class Failing:
        name = "failing"

        def __call__(self, images, prompts):
            raise RuntimeError(f"scored on {threading.current_thread().name}")

    with AsyncScorer(Failing()) as scorer:
        with pytest.raises(RuntimeError, match="scored on reward"):
            scorer.submit(torch.zeros(1, 3, 2, 2), ["x"]).result(timeout=10)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        AsyncScorer(Failing(), workers=0)


def test_async_scorer_gives_the_in_process_scores():
    from tempflow_fast.tasks.shapes.grammar import TRAIN_PROMPTS
    from tempflow_fast.tasks.shapes.render import render
    import numpy as np

    prompts = list(TRAIN_PROMPTS[:6])
    images = render(prompts, np.random.default_rng(3))
    with AsyncScorer(ShapesReward()) as scorer:
        assert torch.equal(scorer.submit(images, prompts).result(timeout=30), ShapesReward()(images, prompts))


def test_config_from_yaml_with_components(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("name: composite\nnormalize: batch\ncomponents:\n"
                    "  - {name: shapes, weight: 2.0, label: geneval_like}\n"
                    "  - {name: server, url: 'http://127.0.0.1:9/', weight: 0.5, timeout_s: 3}\n")
    cfg = load_config(RewardConfig, path, ["async_workers=2"])
    assert cfg.components[1].timeout_s == 3.0 and cfg.async_workers == 2
    reward = build_reward(cfg)
    assert isinstance(reward, CompositeReward) and reward.normalize == "batch"
    assert [(r.name, w) for r, w in reward.components] == [("geneval_like", 2.0), ("server", 0.5)]


@pytest.mark.parametrize("overrides, match", [
    (["name=pickscore"], "config section 'components\\[0\\]': path is required for the 'pickscore' reward"),
    (["name=aesthetic", "path=/x"], "head_path"),
    (["name=server"], "url is required"),
    (["name=shapes", "scale=2.0"], "scale applies to"),
    (["name=clip", "path=/x", "shapes_score=partial"], "shapes_score applies to the 'shapes' reward only"),
    (["name=shapes", "shapes_score=lenient"], "shapes_score.*expected one of"),
    (["name=server", "url=http://x/", "timeout_s=0"], "timeout_s must be > 0"),
    (["name=hps", "path=/x", "device=tpu"], "device must be"),
    (["name=clip", "dtype=float64"], "expected one of"),
])
def test_config_errors_name_the_field(tmp_path, overrides, match):
    import yaml

    # each case is the one component of a composite, so the message must also say which component
    component = {o.split("=", 1)[0]: yaml.safe_load(o.split("=", 1)[1]) for o in overrides}
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump({"name": "composite", "components": [component]}))
    with pytest.raises(ValueError, match=match) as info:
        load_config(RewardConfig, path)
    assert "components[0]" in str(info.value)


def test_shapes_score_reaches_the_reward():
    assert build_reward(RewardConfig(name="shapes")).mode == "strict"
    assert build_reward(RewardConfig(name="shapes", shapes_score="partial")).mode == "partial"


def test_composite_config_needs_components_and_no_nesting():
    with pytest.raises(ValueError, match="at least one reward"):
        RewardConfig(name="composite").validate()
    with pytest.raises(ValueError, match="cannot be composites"):
        RewardConfig(name="composite", components=[RewardConfig(name="composite")]).validate()
    with pytest.raises(ValueError, match="cfg must be a RewardConfig"):
        build_reward({"name": "shapes"})


@pytest.mark.parametrize("module, name, match", [("open_clip", "hps", "open_clip_torch"),
                                                  ("ImageReward", "imagereward", "image-reward")])
def test_missing_optional_packages_name_the_extra(monkeypatch, tmp_path, module, name, match):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    cfg = RewardConfig(name=name, path=str(tmp_path / "ckpt.pt"), device="cpu")
    with pytest.raises(ImportError, match=rf"tempflow_fast\[rewards\].*{match}"):
        build_reward(cfg)


def test_async_futures_carry_their_own_components():
    comp = CompositeReward([(Fixed("a", [1.0], [2.0]), 1.0), (Fixed("b", [5.0], [7.0]), 1.0)], normalize="none")
    with AsyncScorer(comp) as scorer:
        first, second = scorer.submit(_images(1), ["x"]), scorer.submit(_images(1), ["y"])
        assert float(first.result(timeout=10)) == 6.0 and float(second.result(timeout=10)) == 9.0
    assert {k: float(v) for k, v in first.components.items()} == {"a": 1.0, "b": 5.0}
    assert {k: float(v) for k, v in second.components.items()} == {"a": 2.0, "b": 7.0}


def test_async_close_without_waiting_cancels_batches_not_started():
    gate = threading.Event()

    class Gated:
        name = "gated"

        def __call__(self, images, prompts):
            gate.wait(10)
            return torch.zeros(images.shape[0])

    scorer = AsyncScorer(Gated())
    running = scorer.submit(_images(1), ["x"])
    queued = scorer.submit(_images(1), ["y"])
    time.sleep(0.05)
    scorer.close(wait=False)
    assert queued.cancelled()
    gate.set()
    assert float(running.result(timeout=10)) == 0.0
