import math

import pytest

from tempflow_fast.training.schedule import learning_rate_at
from tempflow_fast.training.train_config import TrainConfig


def rates(**kw):
    cfg = TrainConfig(**kw)
    cfg.validate()
    return [learning_rate_at(cfg, i) for i in range(cfg.iterations)]


def test_constant_is_the_learning_rate():
    assert rates(iterations=5, learning_rate=3e-5) == [3e-5] * 5


def test_warmup_then_cosine_to_the_floor():
    r = rates(iterations=11, learning_rate=1e-4, lr_schedule="cosine", lr_warmup_iterations=2, lr_min_ratio=0.1)
    assert r[0] == pytest.approx(5e-5) and r[1] == pytest.approx(1e-4)  # warm-up: (i + 1) / W of the peak
    assert r[2] == pytest.approx(1e-4)  # decay starts at the peak ...
    assert r[-1] == pytest.approx(1e-5)  # ... and ends at lr_min_ratio × peak on the last iteration
    mid = 2 + (11 - 1 - 2) // 2  # half way through the decay: the mean of peak and floor
    assert r[mid] == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5))
    assert all(a >= b for a, b in zip(r[2:], r[3:]))


def test_linear_decay():
    r = rates(iterations=5, learning_rate=4e-5, lr_schedule="linear")
    assert r == pytest.approx([4e-5, 3e-5, 2e-5, 1e-5, 0.0])


def test_trainer_sets_and_logs_the_rate(tmp_path, make_trainer):
    tr = make_trainer(tmp_path, "flow_grpo", "train.iterations=3", "train.lr_schedule=cosine")
    for i, want in enumerate([1e-3, 5e-4, 0.0]):
        m = tr.run_iteration(i)
        assert m["learning_rate"] == pytest.approx(want, abs=1e-12)
        assert all(math.isclose(g["lr"], want, abs_tol=1e-12) for g in tr.optimizer.param_groups)
