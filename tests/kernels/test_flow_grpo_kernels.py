"""The Triton launchers called directly against the reference primitives, on shapes chosen for
the kernels' tiling: K not a power of two (padded K rows), D split over several programs with a
ragged last chunk, and the (N, S) partial sums combined by the finalize kernels."""

import torch

from tempflow_fast.ops import reference as R
from tempflow_fast.ops.testing import assert_close_scaled, require

N, K, D = 2, 9, 5000


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(N, D, generator=g)
    std = torch.tensor([0.4, 1.1])
    samples = mean[:, None] + std[:, None, None] * torch.randn(N, K, D, generator=g)
    old = R.gaussian_log_prob_fwd(samples, mean, std) + 0.3 * torch.randn(N, K, generator=g)
    tensors = dict(mean=mean, samples=samples, std=std, old=old, adv=2 * torch.randn(N, K, generator=g),
                   weights=torch.tensor([0.5, 1.5]), ref=mean + 0.1 * torch.randn(N, D, generator=g),
                   kl_std=torch.tensor([0.7, 0.9]))
    return {k: v.to(device) for k, v in tensors.items()}


def test_tiling_actually_splits_and_pads():
    from tempflow_fast.ops import triton_backend as T

    block_k, block_d = T._blocks(K, D)
    splits, chunk = T._splits(N, D, block_d, torch.device("cpu"))
    assert block_k > K and splits > 1 and splits * chunk > D  # padded K, several chunks, ragged tail


def test_fused_loss_and_log_prob_primitives_match_reference():
    device = require("triton")
    from tempflow_fast.ops import triton_backend as T

    t = _inputs(device)
    args = (t["mean"], t["samples"], t["std"], t["old"], t["adv"], t["weights"], t["ref"], t["kl_std"], 0.2, 1.5, 0.1)
    got, want = T.flow_grpo_loss_fwd(*args), R.flow_grpo_loss_fwd(*args)
    for name, a, b in zip(("loss", "logp", "ratio", "clip_frac", "approx_kl", "kl"), got, want):
        assert_close_scaled(a, b, 2e-5, name)
    grad_loss = torch.tensor(0.7, device=device)
    bwd = (grad_loss, t["mean"], t["samples"], t["std"], want[1], t["old"], t["adv"], t["weights"], t["ref"],
           t["kl_std"], 0.2, 1.5, 0.1)
    assert_close_scaled(T.flow_grpo_loss_bwd(*bwd), R.flow_grpo_loss_bwd(*bwd), 2e-5, "dmean")

    g = torch.linspace(-1, 1, N * K, device=device).reshape(N, K)
    assert_close_scaled(T.gaussian_log_prob_bwd(g, t["samples"], t["mean"], t["std"]),
                        R.gaussian_log_prob_bwd(g, t["samples"], t["mean"], t["std"]), 2e-5, "dmean")


def test_sde_step_primitives_match_reference():
    device = require("triton")
    from tempflow_fast.ops import triton_backend as T

    t = _inputs(device)
    x, v, noise = t["mean"], t["samples"][:, 0].contiguous(), t["samples"][:, 1].contiguous()
    a, b, std = t["weights"], -t["kl_std"], t["std"]
    for given in (False, True):
        extra = (None, t["ref"]) if given else (noise, None)
        got, want = T.sde_step_fwd(x, v, a, b, std, *extra), R.sde_step_fwd(x, v, a, b, std, *extra)
        for name, p, q in zip(("prev", "mean", "logp"), got, want):
            assert_close_scaled(p, q, 2e-5, name)
        grads = (noise, t["ref"], torch.tensor([0.3, -2.0], device=device))
        for drop in range(3):  # each of grad_prev / grad_mean / grad_logp absent in turn
            g = tuple(None if i == drop else grads[i] for i in range(3))
            bwd = (*g, x, v, want[0], a, b, std, given)
            for name, p, q in zip(("dsample", "dvelocity"), T.sde_step_bwd(*bwd), R.sde_step_bwd(*bwd)):
                assert_close_scaled(p, q, 2e-5, name)
