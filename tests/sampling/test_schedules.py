import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tempflow_fast.sampling.schedules import (flow_sigmas, flux_shift_mu, interval_calls, interval_indices,
                                              interval_sigmas)


@pytest.mark.parametrize("num_steps", [2, 10, 16, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_equals_diffusers(num_steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    ours = flow_sigmas(num_steps, shift)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    assert torch.equal(ours, sched.sigmas)
    assert ours[0] == 1 and ours[-1] == 0


@pytest.mark.parametrize("num_steps", [10, 28])
@pytest.mark.parametrize("image_seq_len", [64, 1024, 4096])
def test_dynamic_shift_equals_flux_pipeline(num_steps, image_seq_len):
    # How FluxPipeline drives the scheduler: explicit linspace sigmas plus mu from calculate_shift.
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(flux_shift_mu(image_seq_len))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    ours = flow_sigmas(num_steps, image_seq_len=image_seq_len, dynamic_shift=True)
    assert torch.equal(ours, sched.sigmas)


def test_interval_tail_lands_on_zero():
    # T=10, branch at k=2 → start at index 3, 7 steps left.
    assert interval_indices(10, 3, 1) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert interval_indices(10, 3, 2) == [3, 5, 7, 9, 10]      # 7 not a multiple of 2: short last step
    assert interval_indices(10, 3, 3) == [3, 6, 9, 10]
    assert interval_indices(10, 9, 3) == [9, 10]
    for start in range(1, 10):
        for lam in (1, 2, 3, 4):
            assert interval_calls(10, start, lam) == math.ceil((10 - start) / lam)
    sig = flow_sigmas(10, 3.0)
    sub = interval_sigmas(sig, 3, 2)
    assert torch.equal(sub, sig[[3, 5, 7, 9, 10]]) and sub[-1] == 0


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_steps=1), "num_steps"),
    (dict(num_steps=10, shift=0.0), "shift"),
    (dict(num_steps=10, dynamic_shift=True), "image_seq_len"),
])
def test_bad_schedule_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        flow_sigmas(**kwargs)


def test_bad_granularity():
    with pytest.raises(ValueError, match="granularity"):
        interval_indices(10, 3, 0)
