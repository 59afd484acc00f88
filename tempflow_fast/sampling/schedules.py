"""Flow-matching sigma schedules and the interval sub-schedules of G²RPO.

`flow_sigmas` returns `sigmas[0] = 1 … sigmas[T] = 0` (T+1 values, fp32) equal to what diffusers'
`FlowMatchEulerDiscreteScheduler` holds in `.sigmas` after `set_timesteps`, reproduced here so the
sampler needs torch only:

- static shift (SD3, Flow-GRPO): a scheduler built with `shift=s` and `set_timesteps(T)`. Note that
  diffusers shifts twice in this path: the construction-time table is shifted, its smallest value
  `shift(1/num_train_timesteps)` bounds the `linspace`, and that linspace is shifted again. We
  copy that exactly, because Flow-GRPO's numbers come from it.
- dynamic shift (FLUX): a scheduler built with `use_dynamic_shifting=True`, driven the way
  `FluxPipeline` drives it: `sigmas = linspace(1, 1/T, T)` and
  `mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)`,
  exponential time shift `e^mu / (e^mu + (1/t - 1))` (or diffusers' linear one, `mu / (mu + (1/t - 1))`).
  The constants default to FLUX.1's (256 / 4096 tokens, shifts 0.5 / 1.15).
- terminal stretch (Qwen-Image: `shift_terminal=0.02`): after either shift, diffusers' `stretch_shift_to_terminal`
  rescales `1 - σ` so that the last σ before 0 equals `shift_terminal`.

The schedule of a loaded model: `FlowSchedule.from_scheduler_config` reads `shift`, `use_dynamic_shifting`
and the dynamic-shift constants from a diffusers scheduler config (the FLUX and SD3 adapters keep one as
`model.schedule`), and `model_sigmas(model, T, shift, dynamic_shift)` samples on it: the constants always
come from the model, `shift` / `dynamic_shift` from the caller unless they are None. A scheduler option this
module does not reproduce (Karras / exponential / beta sigmas, `invert_sigmas`) raises
ValueError instead of sampling on a different schedule than the model's own.

Interval sub-schedules (G²RPO granularities): after the SDE step at index k the branch sits at
index k+1 and has T-k-1 steps left. At granularity λ it visits indices k+1, k+1+λ, k+1+2λ, … and
always ends on index T (σ = 0): when (T-k-1) is not a multiple of λ, the last step is the short
remainder from the last multiple to T. It therefore takes ceil((T-k-1)/λ) model calls, and the
first of them (at index k+1) is the same for every λ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps (T) must be an int >= 2, got {num_steps!r}")


def flux_shift_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift `mu` (diffusers' `calculate_shift`), linear in seq length."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    b = base_shift - m * base_image_seq_len
    return image_seq_len * m + b


TIME_SHIFT_TYPES = ("exponential", "linear")


def flow_sigmas(num_steps: int, shift: float = 1.0, *, image_seq_len: Optional[int] = None,
                dynamic_shift: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                num_train_timesteps: int = 1000, time_shift_type: str = "exponential",
                shift_terminal: Optional[float] = None) -> torch.Tensor:
    """Sigmas (T+1,) fp32 from 1 down to 0, equal to diffusers' for the same settings (see module doc)."""
    _check_num_steps(num_steps)
    if shift_terminal is not None and not 0.0 <= shift_terminal < 1.0:
        raise ValueError(f"shift_terminal must be in [0, 1), got {shift_terminal!r}")
    if dynamic_shift:
        if image_seq_len is None or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive int with dynamic_shift, got {image_seq_len!r}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
        mu = flux_shift_mu(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
        # diffusers casts the pipeline's linspace to fp32 before shifting, and numpy keeps fp32
        # through the shift expression; follow the same dtype path to get identical bits.
        t = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
        if time_shift_type == "exponential":
            sig = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** 1.0)
        else:
            sig = mu / (mu + (1.0 / t - 1.0) ** 1.0)
    else:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        train = torch.from_numpy(
            np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        ) / num_train_timesteps
        train = shift * train / (1 + (shift - 1) * train)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
        sig = t / num_train_timesteps
        sig = shift * sig / (1 + (shift - 1) * sig)
    if shift_terminal:  # diffusers' stretch_shift_to_terminal, in the same dtype
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    out = torch.from_numpy(np.asarray(sig)).to(torch.float32)
    return torch.cat([out, torch.zeros(1, dtype=torch.float32)])


@dataclass(frozen=True)
class FlowSchedule:
    """What a diffusers FlowMatchEulerDiscrete scheduler config says about the sigma schedule (module doc);
    the defaults are FLUX.1's constants with no shift."""

    shift: float = 1.0
    dynamic_shift: bool = False            # the config's use_dynamic_shifting
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    num_train_timesteps: int = 1000
    time_shift_type: str = "exponential"
    shift_terminal: Optional[float] = None  # the last σ before 0 after the terminal stretch (Qwen-Image: 0.02)

    # scheduler options that change the schedule in ways flow_sigmas does not reproduce
    UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")

    @classmethod
    def from_scheduler_config(cls, config) -> "FlowSchedule":
        """From a scheduler's `.config` (a FrozenDict or any mapping); keys it lacks keep the defaults."""
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        for key in cls.UNSUPPORTED:
            if get(key, None):
                raise ValueError(f"scheduler config sets {key}={get(key)!r}, which flow_sigmas does not reproduce; "
                                 f"the engine would sample on a different schedule than the model's own")
        d = cls()
        return cls(shift=float(get("shift", d.shift)), dynamic_shift=bool(get("use_dynamic_shifting", d.dynamic_shift)),
                   base_shift=float(get("base_shift", d.base_shift)), max_shift=float(get("max_shift", d.max_shift)),
                   base_image_seq_len=int(get("base_image_seq_len", d.base_image_seq_len)),
                   max_image_seq_len=int(get("max_image_seq_len", d.max_image_seq_len)),
                   num_train_timesteps=int(get("num_train_timesteps", d.num_train_timesteps)),
                   time_shift_type=str(get("time_shift_type", d.time_shift_type)),
                   shift_terminal=float(get("shift_terminal")) if get("shift_terminal", None) else None)

    def sigmas(self, num_steps: int, image_seq_len: Optional[int] = None, *, shift: Optional[float] = None,
               dynamic_shift: Optional[bool] = None) -> torch.Tensor:
        """flow_sigmas on this schedule; `shift` / `dynamic_shift` override the config's when not None."""
        return flow_sigmas(num_steps, self.shift if shift is None else shift, image_seq_len=image_seq_len,
                           dynamic_shift=self.dynamic_shift if dynamic_shift is None else dynamic_shift,
                           base_shift=self.base_shift, max_shift=self.max_shift,
                           base_image_seq_len=self.base_image_seq_len, max_image_seq_len=self.max_image_seq_len,
                           num_train_timesteps=self.num_train_timesteps, time_shift_type=self.time_shift_type,
                           shift_terminal=self.shift_terminal)


def model_sigmas(model, num_steps: int, shift: Optional[float] = None,
                 dynamic_shift: Optional[bool] = None) -> torch.Tensor:
    """The schedule `model` samples on: its scheduler's constants (`model.schedule`, a FlowSchedule; FLUX's
    defaults for a model without one), with `shift` / `dynamic_shift` from the caller, or from the model's
    scheduler config where they are None."""
    schedule = getattr(model, "schedule", None) or FlowSchedule()
    return schedule.sigmas(num_steps, getattr(model, "image_seq_len", None), shift=shift, dynamic_shift=dynamic_shift)


def interval_indices(num_steps: int, start: int, granularity: int) -> List[int]:
    """Indices visited from `start` to T at granularity λ: start, start+λ, …, then T (see module doc)."""
    _check_num_steps(num_steps)
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity (λ) must be an int >= 1, got {granularity!r}")
    if not 0 <= start <= num_steps:
        raise ValueError(f"start must be in 0..{num_steps}, got {start!r}")
    return list(range(start, num_steps, granularity)) + [num_steps]


def interval_sigmas(sigmas: torch.Tensor, start: int, granularity: int) -> torch.Tensor:
    """The sub-schedule of `sigmas` (T+1,) from index `start` at granularity λ, ending on σ = 0."""
    idx = interval_indices(sigmas.numel() - 1, start, granularity)
    return sigmas[torch.tensor(idx, device=sigmas.device)]


def interval_calls(num_steps: int, start: int, granularity: int) -> int:
    """Model calls to finish from index `start` at granularity λ: ceil((T - start)/λ)."""
    return len(interval_indices(num_steps, start, granularity)) - 1


COMPLETION_STRIDES = ("uniform", "official")


def granularity_indices(num_steps: int, branch_step: int, granularity: int, stride: str = "uniform") -> List[int]:
    """Indices a branch that took its SDE step at k visits at granularity λ, from k+1 to T.

    "uniform": interval_indices from k+1 (every λ-th step, a short remainder step last). "official", G²RPO's code
    (fastvideo/train_g2rpo_hps_clip.py: sample_reference_model, `sigma_schedule[:k+2]` + `sigma_schedule[k+2::g]`,
    the image being x̂0 of the last state the ODE leaves): one step k+1 → k+2, then every λ-th step, and where the
    stride does not land on T the last state it reaches is skipped, so the step before it goes to σ = 0 (the Euler
    step to σ = 0 is x̂0)."""
    if stride == "uniform":
        return interval_indices(num_steps, branch_step + 1, granularity)
    if stride != "official":
        raise ValueError(f"completion stride must be one of {COMPLETION_STRIDES}, got {stride!r}")
    start = branch_step + 1
    interval_indices(num_steps, start, granularity)  # the same argument checks
    visited = [start] + list(range(start + 1, num_steps + 1, granularity))
    return visited if visited[-1] == num_steps else visited[:-1] + [num_steps]


def granularity_calls(num_steps: int, branch_step: int, granularity: int, stride: str = "uniform") -> int:
    """Model calls of `granularity_indices`: ceil((T-k-1)/λ) uniform, 1 + floor((T-k-2)/λ) official."""
    return len(granularity_indices(num_steps, branch_step, granularity, stride)) - 1


def linspace_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """σ = shift·t / (1 + (shift - 1)·t) on t = linspace(1, 0, T+1) in fp32: the schedule of G²RPO's and
    DanceGRPO's code (`sd3_time_shift(shift, torch.linspace(1, 0, T + 1))`), not diffusers' doubly shifted one."""
    _check_num_steps(num_steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = torch.linspace(1, 0, num_steps + 1)
    return (shift * t) / (1 + (shift - 1) * t)
