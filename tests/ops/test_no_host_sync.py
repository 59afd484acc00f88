"""No host synchronisation on the hot path of the public ops (issue 15 item 10): no `.item()`,
`float(t)`, `bool(t)` or other read of tensor data from Python in the forward or the backward, so a
CUDA training step never waits for the device. Value checks that must read data run only when
asked for (`TEMPFLOW_FAST_CHECK_VALUES=1` / `ops.set_value_checks(True)`).

Without a GPU this is shown twice: on CPU with every Python-side read of tensor data made to raise
while the ops run (the check itself is shown to catch the value checks when they are on), and on
the meta device, which has no data at all, with the default settings. With a GPU, torch's own
sync debug mode runs the Triton backend's forward and backward at "error"."""

import pytest
import torch

import tempflow_fast.ops as ops

_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


class HostRead(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _default_value_checks(monkeypatch):
    monkeypatch.delenv(ops.CHECK_VALUES_ENV, raising=False)
    previous = ops.set_value_checks(None)
    yield
    ops.set_value_checks(previous)


@pytest.fixture
def no_host_reads(monkeypatch):
    """A context in which reading tensor data from Python raises HostRead."""
    import contextlib

    @contextlib.contextmanager
    def trap():
        with monkeypatch.context() as m:
            for name in _READS:
                def read(self, *args, _name=name, **kwargs):
                    raise HostRead(f"Tensor.{_name} called on a {tuple(self.shape)} tensor inside an op")
                m.setattr(torch.Tensor, name, read)
            yield
    return trap


def _step_and_update(device):
    """Every public op, forward and backward, as a training step calls them: per-row σ tensors
    (rows at different steps), tensor std / kl_std / weights, a reference mean."""
    g = torch.Generator().manual_seed(0)
    n, k, d = 2, 3, 24
    x = torch.randn(n, d, generator=g).to(device)
    v = torch.randn(n, d, generator=g).to(device).requires_grad_()
    noise = torch.randn(n, d, generator=g).to(device)
    sigma, sigma_next = torch.tensor([0.9, 0.6]).to(device), torch.tensor([0.8, 0.5]).to(device)
    mean = torch.randn(n, d, generator=g).to(device).requires_grad_()
    samples = torch.randn(n, k, d, generator=g).to(device)
    old, adv = torch.randn(n, k, generator=g).to(device), torch.randn(n, k, generator=g).to(device)
    weights, ref_mean = torch.rand(n, generator=g).to(device) + 0.5, torch.randn(n, d, generator=g).to(device)

    def run():
        step = ops.flow_sde_step(x, v, sigma, sigma_next, torch.full((n,), 0.7, device=device),
                                 sigma_max=torch.full((n,), 0.95, device=device), noise=noise)
        ddim = ops.ddim_sde_step(x, v, sigma, sigma_next, 0.5, prev_sample=step.prev_sample.detach())
        fused = ops.fused_flow_grpo_loss(mean, samples, step.std, old, adv, clip_range=0.2, weights=weights,
                                         ref_mean=ref_mean, beta=0.04, kl_std=step.std * 2)
        logp = ops.gaussian_log_prob(samples, mean, step.std)
        clip = ops.grpo_clip_loss(logp, old, adv, clip_range=0.2, weights=weights[:, None])
        total = fused.loss + clip.loss + step.log_prob.sum() + ddim.log_prob.sum() + step.mean.square().mean()
        total.backward()
        return total
    return run, (mean, v)


def test_forward_and_backward_read_no_tensor_data(no_host_reads):
    run, leaves = _step_and_update("cpu")
    with ops.use_backend("torch"), no_host_reads():
        total = run()
    assert torch.isfinite(total)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in leaves)


@pytest.mark.parametrize("enable", ["env", "setter"])
def test_value_checks_read_data_only_when_asked_for(no_host_reads, monkeypatch, enable):
    """The trap catches a host read: with value checks on, the same step trips it."""
    if enable == "env":
        monkeypatch.setenv(ops.CHECK_VALUES_ENV, "1")
    else:
        ops.set_value_checks(True)
    assert ops.value_checks_enabled()
    run, _ = _step_and_update("cpu")
    with ops.use_backend("torch"), no_host_reads(), pytest.raises(HostRead, match="__bool__"):
        run()


def test_default_runs_on_a_device_without_host_data():
    """Meta tensors have no data: any value check or .item() there raises. The public layer, the
    custom ops and their autograd run through without one."""
    run, (mean, v) = _step_and_update("meta")
    total = run()
    assert total.device.type == "meta" and mean.grad.shape == mean.shape and v.grad.shape == v.shape
    ops.set_value_checks(True)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the checks read data, so they cannot run here
        run()


def test_value_check_flag_values(monkeypatch):
    assert not ops.value_checks_enabled()  # the default: off, on every device
    for raw, want in (("1", True), ("true", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv(ops.CHECK_VALUES_ENV, raw)
        assert ops.value_checks_enabled() is want
    monkeypatch.setenv(ops.CHECK_VALUES_ENV, "1")
    assert ops.set_value_checks(False) is None and not ops.value_checks_enabled()  # the setter wins
    assert ops.set_value_checks(None) is False and ops.value_checks_enabled()
    monkeypatch.setenv(ops.CHECK_VALUES_ENV, "maybe")
    with pytest.raises(ValueError, match="TEMPFLOW_FAST_CHECK_VALUES must be 1 or 0"):
        ops.value_checks_enabled()
    with pytest.raises(ValueError, match="set_value_checks"):
        ops.set_value_checks("yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's sync debug mode)")
def test_triton_hot_path_does_not_synchronise_on_cuda():
    from tempflow_fast.ops.testing import require

    require("triton")
    run, _ = _step_and_update("cuda")
    with ops.use_backend("triton"):
        run()  # compile the kernels first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
