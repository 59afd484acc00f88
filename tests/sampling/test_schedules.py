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


# --- the loaded model's own schedule (FlowSchedule, model_sigmas) ------------------------------------------------

def _pipeline_sigmas(sched, num_steps, image_seq_len):
    """What a diffusers pipeline samples on: FluxPipeline's call for a dynamic-shift scheduler, else set_timesteps."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = sched.config
    if c.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    else:
        sched.set_timesteps(num_steps)
    return sched.sigmas


@pytest.mark.parametrize("config", [
    dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15),
    dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.3, max_shift=1.4),
    dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5, max_shift=1.15),
    dict(shift=3.0),
    # Qwen-Image's scheduler config
    dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
         shift_terminal=0.02),
    dict(shift=3.0, shift_terminal=0.1),
])
@pytest.mark.parametrize("image_seq_len", [4, 64, 1024])
def test_flow_schedule_equals_the_scheduler(config, image_seq_len):
    from tempflow_fast.sampling.schedules import FlowSchedule

    sched = FlowMatchEulerDiscreteScheduler(**config)
    ours = FlowSchedule.from_scheduler_config(sched.config).sigmas(10, image_seq_len)
    assert torch.equal(ours, _pipeline_sigmas(sched, 10, image_seq_len))


def test_unsupported_scheduler_options_refused():
    from tempflow_fast.sampling.schedules import FlowSchedule

    with pytest.raises(ValueError, match="use_exponential_sigmas"):
        FlowSchedule.from_scheduler_config({"use_exponential_sigmas": True})
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowSchedule.from_scheduler_config({"use_karras_sigmas": True})


def test_a_pipeline_is_sampled_on_its_own_schedule(tmp_path):
    """A FLUX pipeline whose scheduler has 16/256 as base/max image sequence length (FLUX.1's are 256/4096): the
    engine's schedule is the scheduler's, which at 64 image tokens (128 px) is 0.04 in σ from FLUX.1's constants."""
    from diffusers import FluxPipeline

    from tempflow_fast.models.flux import FluxAdapter
    from tempflow_fast.sampling.engine import rollout
    from tempflow_fast.sampling.plans import Bifurcation
    from tempflow_fast.sampling.schedules import model_sigmas
    from tests.models.tiny_pipelines import TEXT_LEN, make_tiny_flux_pipeline

    pipe = FluxPipeline.from_pretrained(make_tiny_flux_pipeline(tmp_path / "pipe"))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, base_image_seq_len=16,
                                                                 max_image_seq_len=256)
    model = FluxAdapter(pipe, resolution=128, max_sequence_length=TEXT_LEN)
    assert model.image_seq_len == 64
    own = _pipeline_sigmas(pipe.scheduler, 10, model.image_seq_len)
    flux1 = flow_sigmas(10, image_seq_len=64, dynamic_shift=True)
    assert (own - flux1).abs().max() > 0.035
    # the scheduler's shift and use_dynamic_shifting (None), or only its constants (dynamic shift asked for)
    assert torch.equal(model_sigmas(model, 10), own)
    assert torch.equal(model_sigmas(model, 10, 1.0, True), own)
    assert torch.equal(model_sigmas(model, 10, 2.0, False), flow_sigmas(10, 2.0))
    plan = Bifurcation(num_steps=10, seeds_per_prompt=1, branches=2, bifurcation_steps=(0,), shift=None,
                       dynamic_shift=None)
    assert torch.equal(rollout(model, ["a red square"], plan, seed=0).sigmas, own)
    # a model without a scheduler config keeps FLUX.1's constants
    assert torch.equal(model_sigmas(type("M", (), {"image_seq_len": 64})(), 10, 1.0, True), flux1)


def test_terminal_stretch_ends_on_shift_terminal():
    sig = flow_sigmas(10, image_seq_len=4096, dynamic_shift=True, max_shift=0.9, max_image_seq_len=8192,
                      shift_terminal=0.02)
    plain = flow_sigmas(10, image_seq_len=4096, dynamic_shift=True, max_shift=0.9, max_image_seq_len=8192)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and abs(float(sig[-2]) - 0.02) < 1e-6 and float(plain[-2]) > 0.1
    assert bool((sig[1:] < sig[:-1]).all())
    with pytest.raises(ValueError, match="shift_terminal"):
        flow_sigmas(10, shift_terminal=1.0)
