import math

import pytest
import torch

from tempflow_fast.algorithms.advantages import (
    multi_granularity_advantages,
    normalize_in_groups,
    stepwise_gain_advantages,
)
from tempflow_fast.algorithms.step_weights import flow_sde_noise_std, noise_aware_weights


def test_group_normalisation_matches_formula():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 2.0, 0.0])
    g = torch.tensor([7, 7, 7, 3, 3, 9, 9, 9])  # ids need not be contiguous or sorted
    out = normalize_in_groups(r, g)
    for gid in g.unique():
        m = g == gid
        vals = r[m]
        if vals.max() == vals.min():
            continue
        want = (vals - vals.mean()) / (vals.std(unbiased=False) + 1e-4)
        torch.testing.assert_close(out.advantages[m], want)
    # group 3 = {1.0, 0.5} has spread; only no group is zero-std here
    assert out.zero_std_ratio == 0.0
    glob = normalize_in_groups(r, g, global_std=True)
    m = g == 7
    torch.testing.assert_close(glob.advantages[m], (r[m] - r[m].mean()) / (r.std(unbiased=False) + 1e-4))


def test_zero_std_groups_are_flagged_and_silent():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    out = normalize_in_groups(r, g)
    assert out.zero_std.tolist() == [True, True, True, False, False, False]
    assert out.advantages[:3].abs().sum() == 0
    assert out.zero_std_ratio == pytest.approx(0.5)
    assert out.advantages[3:].sum().abs() < 1e-5


def test_multi_granularity_sum():
    torch.manual_seed(0)
    r = torch.rand(3, 12)
    g = torch.tensor([0] * 6 + [1] * 6)
    out = multi_granularity_advantages(r, g)
    want = sum(normalize_in_groups(r[j], g).advantages for j in range(3))
    torch.testing.assert_close(out.advantages, want)


def test_stepwise_gains():
    tw = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    final = torch.tensor([1.0, 0.0])
    out = stepwise_gain_advantages(tw, final, torch.tensor([0, 0]))
    # gains: traj0 [0, 1, 0], traj1 [1, 0, -1]; per-step normalisation across the two trajectories
    adv = out.advantages.view(2, 3)
    assert adv[0, 0] < 0 < adv[1, 0]
    assert adv[0, 1] > 0 > adv[1, 1]
    assert adv[0, 2] > 0 > adv[1, 2]
    torch.testing.assert_close(adv.abs(), torch.full((2, 3), 0.5 / (0.5 + 1e-4)))


def test_noise_aware_weights():
    T = 10
    sigmas = torch.linspace(1, 0, T + 1)
    eta = 0.7
    std = flow_sde_noise_std(sigmas, eta)
    # hand formula at step 3
    s, sn = 0.7, 0.6
    want = eta * math.sqrt(s / (1 - s)) * math.sqrt(s - sn)
    assert std[3].item() == pytest.approx(want, rel=1e-6)
    # σ = 1 guard uses sigmas[1]
    assert std[0].item() == pytest.approx(eta * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1), rel=1e-6)
    w = noise_aware_weights(sigmas, eta, list(range(9)))
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)
    assert w[0] > w[4] > w[8]
    with pytest.raises(ValueError, match="trained_steps"):
        noise_aware_weights(sigmas, eta, [10])
