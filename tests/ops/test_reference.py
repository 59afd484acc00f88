"""The oracle checks itself: the reference's explicit backward formulas equal autograd through
its own forward formulas (fp64), so a backend matching the reference matches the true gradient."""

import torch

from tempflow_fast.ops import reference as R


def _f64(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_gaussian_log_prob_backward_is_the_gradient():
    samples, mean = _f64(3, 4, 10, seed=0), _f64(3, 10, seed=1).requires_grad_()
    std, grad = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), _f64(3, 4, seed=2)
    (want,) = torch.autograd.grad((R.gaussian_log_prob_fwd(samples, mean, std) * grad).sum(), mean)
    torch.testing.assert_close(R.gaussian_log_prob_bwd(grad, samples, mean.detach(), std), want)


def test_sde_step_backward_is_the_gradient_with_prev_held_fixed():
    x, v = _f64(2, 9, seed=3).requires_grad_(), _f64(2, 9, seed=4).requires_grad_()
    noise, gp, gm, gl = _f64(2, 9, seed=5), _f64(2, 9, seed=6), _f64(2, 9, seed=7), _f64(2, seed=8)
    a, b, std = (torch.tensor(p, dtype=torch.float64) for p in ([0.9, 1.1], [-0.2, -0.05], [0.3, 0.7]))
    for prev_given in (False, True):
        mu = a[:, None] * x + b[:, None] * v
        prev = mu.detach() + std[:, None] * noise if prev_given else mu + std[:, None] * noise
        logp = R.gaussian_log_prob_fwd(prev.detach()[:, None], mu, std)[:, 0]  # prev as data (Flow-GRPO)
        objective = (mu * gm).sum() + (logp * gl).sum() + (0 if prev_given else (prev * gp).sum())
        want = torch.autograd.grad(objective, [x, v])
        got = R.sde_step_bwd(gp, gm, gl, x.detach(), v.detach(), prev.detach(), a, b, std, prev_given)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_loss_backwards_are_the_gradient_away_from_ties():
    n, k, d = 3, 4, 6
    mean = _f64(n, d, seed=9).requires_grad_()
    samples = mean.detach()[:, None] + 0.7 * _f64(n, k, d, seed=10)
    std = torch.tensor([0.6, 0.8, 1.1], dtype=torch.float64)
    logp0 = R.gaussian_log_prob_fwd(samples, mean.detach(), std)
    old = logp0 - 0.5 * _f64(n, k, seed=11)
    adv, weights = 2.0 * _f64(n, k, seed=12), torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    ref_mean, kl_std = mean.detach() + 0.3 * _f64(n, d, seed=13), torch.tensor([0.9, 1.2, 0.7], dtype=torch.float64)
    out = R.flow_grpo_loss_fwd(mean, samples, std, old, adv, weights, ref_mean, kl_std, 0.2, 1.5, 0.3)
    (want,) = torch.autograd.grad(3.0 * out[0], mean)
    got = R.flow_grpo_loss_bwd(torch.tensor(3.0, dtype=torch.float64), mean.detach(), samples, std, out[1].detach(),
                               old, adv, weights, ref_mean, kl_std, 0.2, 1.5, 0.3)
    torch.testing.assert_close(got, want)

    logp = logp0.reshape(-1).clone().requires_grad_()
    w = weights[:, None].expand(n, k).reshape(-1)
    loss = R.grpo_clip_loss_fwd(logp, old.reshape(-1), adv.reshape(-1), w, 0.2, 1.5)[0]
    (want,) = torch.autograd.grad(loss, logp)
    got = R.grpo_clip_loss_bwd(torch.tensor(1.0, dtype=torch.float64), logp.detach(), old.reshape(-1),
                               adv.reshape(-1), w, 0.2, 1.5)
    torch.testing.assert_close(got, want)


def test_ppo_rule_zero_gradient_where_the_clipped_term_strictly_wins():
    # A > 0, r = e^0.5 > 1 + ε: clipped term -A(1+ε) > -A·r wins, gradient 0; A < 0 there: unclipped wins
    logp, old = torch.tensor([0.5, 0.5]), torch.tensor([0.0, 0.0])
    adv, w = torch.tensor([1.0, -1.0]), torch.ones(2)
    g = R.grpo_clip_loss_bwd(torch.tensor(1.0), logp, old, adv, w, 0.2, 5.0)
    assert g[0].item() == 0.0
    torch.testing.assert_close(g[1], torch.tensor(0.5 * torch.e**0.5))
