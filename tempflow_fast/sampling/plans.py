"""Rollout plans: pure data saying which trajectories to sample and where the SDE steps are.

An algorithm (tempflow_fast/algorithms) produces a plan; the engine (`engine.py`) executes any
plan through one normalised description, `RolloutLayout`, so adding a method never touches the
engine. Every plan is the same tree, per prompt:

    N seeds (initial noises) ── ODE trunk ── at each k in the branch set: K SDE children
    from x_k ── each child continues ("tail") from index k+1 to T: SDE while the index is below
    `tail_sde_until`, ODE after, at every granularity λ in Λ.

- `FullSDE` (Flow-GRPO; with `tweedie=True` Stepwise-Flow-GRPO): G independent noises per
  prompt, SDE at every step. Layout: N = G seeds, K = 1, branch set {0}, tail all SDE.
- `Bifurcation` (TempFlow-GRPO): N seeds × K branches at each k in `bifurcation_steps`, ODE
  everywhere else. Seed groups = (prompt, seed, k).
- `SingularSDE` (G²RPO): G branches at each k in M, ODE tails at granularities Λ.
- `SlidingWindowSDE` (MixGRPO): ODE before the window (shared by the K samples of a seed), SDE on
  steps window_start … window_start+window_size-1, ODE after.

`Bifurcation` and `SingularSDE` (with Λ = (1,)) finish their branches by an ODE whose only use is the final
image's reward; `completion_solver` / `completion_steps` choose how (solvers.py; default: the schedule's
Euler steps). `shift` / `dynamic_shift` None mean the loaded model's own scheduler config
(schedules.model_sigmas).

Validation (ValueError naming the field): T < 2, k outside 0..T-2, λ < 1, K < 1, N < 1, bad SDE
kind, η <= 0, window outside the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from tempflow_fast.sampling.schedules import COMPLETION_STRIDES
from tempflow_fast.sampling.solvers import check_completion
from tempflow_fast.sampling.steppers import check_sde_kind


@dataclass(frozen=True)
class RolloutLayout:
    """The engine's view of any plan (see module docstring for the tree it describes)."""

    num_steps: int                  # T
    seeds_per_prompt: int           # N initial noises per prompt
    branches: int                   # K SDE children per (prompt, seed, k)
    branch_steps: Tuple[int, ...]   # the k's, sorted, each in 0..T-2 (T-1 for FullSDE's own tail is not a branch)
    tail_sde_until: int             # tail step i (from index i to i+1) is SDE iff i < tail_sde_until
    granularities: Tuple[int, ...]  # Λ; Λ[0] is the primary completion, the rest count as "granularity" calls
    trunk_images: bool              # finish each trunk to σ=0 and decode it (costs T - max(k) - 1 calls per seed)
    tweedie: bool                   # decode x̂0 = x - σ·v at every state of every trajectory
    sde: str                        # "flow" or "ddim"
    noise_level: float              # η
    shift: Optional[float]          # None = the model's scheduler config (schedules.model_sigmas)
    dynamic_shift: Optional[bool]   # None = likewise
    completion_solver: str = "euler"        # ODE completions after the branch step (solvers.py)
    completion_steps: Optional[int] = None  # solver steps per completion; None = the schedule's remaining steps
    completion_stride: str = "uniform"      # granularity paths (schedules.granularity_indices): uniform | official

    @property
    def custom_completion(self) -> bool:
        return self.completion_solver != "euler" or self.completion_steps is not None

    @property
    def trunk_calls(self) -> int:
        """Model calls per trunk: up to v(x_kmax), or to σ = 0 when its image is wanted."""
        return self.num_steps if self.trunk_images else max(self.branch_steps) + 1


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_common(num_steps, sde, noise_level, shift=None) -> None:
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps (T) must be an int >= 2, got {num_steps!r}")
    check_sde_kind(sde, allow_none=False)
    if not noise_level > 0:
        raise ValueError(f"noise_level (η) must be > 0, got {noise_level!r}")
    if shift is not None and not shift > 0:
        raise ValueError(f"shift must be > 0 (or None: the model's), got {shift!r}")


def _check_steps(name: str, steps, num_steps: int) -> Tuple[int, ...]:
    steps = tuple(steps)
    if not steps:
        raise ValueError(f"{name} must not be empty")
    for k in steps:
        if not isinstance(k, int) or not 0 <= k <= num_steps - 2:
            raise ValueError(f"{name} entries (k) must be ints in 0..T-2 = 0..{num_steps - 2}, got {k!r} in {steps}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"{name} has repeated steps: {steps}")
    return tuple(sorted(steps))


def _check_granularities(granularities) -> Tuple[int, ...]:
    lams = tuple(granularities)
    if not lams:
        raise ValueError("granularities (Λ) must not be empty")
    for lam in lams:
        if not isinstance(lam, int) or lam < 1:
            raise ValueError(f"granularities (Λ) entries λ must be ints >= 1, got {lam!r} in {lams}")
    if len(set(lams)) != len(lams):
        raise ValueError(f"granularities (Λ) has repeated values: {lams}")
    return lams


@dataclass(frozen=True)
class FullSDE:
    """Flow-GRPO: `samples_per_prompt` (G) independent trajectories, SDE at every step.

    With `tweedie=True` (Stepwise-Flow-GRPO) the engine also decodes x̂0 = x - σ·v at every state;
    it reuses the velocity of the step, so it costs no model call. With sde="ddim" the last step
    (to σ = 0) has std 0 and is taken as the deterministic Euler step, not trained.
    """

    num_steps: int = 10
    samples_per_prompt: int = 24
    sde: str = "flow"
    noise_level: float = 0.7
    tweedie: bool = False
    shift: Optional[float] = 1.0
    dynamic_shift: Optional[bool] = False

    def __post_init__(self):
        _check_common(self.num_steps, self.sde, self.noise_level, self.shift)
        _positive_int("samples_per_prompt (G)", self.samples_per_prompt)

    def layout(self) -> RolloutLayout:
        return RolloutLayout(self.num_steps, self.samples_per_prompt, 1, (0,), self.num_steps, (1,), False,
                             self.tweedie, self.sde, self.noise_level, self.shift, self.dynamic_shift)


@dataclass(frozen=True)
class Bifurcation:
    """TempFlow-GRPO: per prompt N seeds; ODE trunk; at each k one SDE step with K noises; ODE to σ = 0."""

    num_steps: int = 10
    seeds_per_prompt: int = 4
    branches: int = 6
    bifurcation_steps: Optional[Tuple[int, ...]] = None   # None = every k in 0..T-2
    sde: str = "flow"
    noise_level: float = 0.7
    trunk_images: bool = True
    shift: Optional[float] = 1.0
    dynamic_shift: Optional[bool] = False
    completion_solver: str = "euler"
    completion_steps: Optional[int] = None

    def __post_init__(self):
        _check_common(self.num_steps, self.sde, self.noise_level, self.shift)
        _positive_int("seeds_per_prompt (N)", self.seeds_per_prompt)
        _positive_int("branches (K)", self.branches)
        check_completion(self.completion_solver, self.completion_steps)
        steps = range(self.num_steps - 1) if self.bifurcation_steps is None else self.bifurcation_steps
        object.__setattr__(self, "bifurcation_steps", _check_steps("bifurcation_steps", steps, self.num_steps))

    def layout(self) -> RolloutLayout:
        return RolloutLayout(self.num_steps, self.seeds_per_prompt, self.branches, self.bifurcation_steps, 0, (1,),
                             self.trunk_images, False, self.sde, self.noise_level, self.shift, self.dynamic_shift,
                             self.completion_solver, self.completion_steps)


@dataclass(frozen=True)
class SingularSDE:
    """G²RPO: G branches from one SDE step at each k in M; ODE tails at every granularity λ in Λ."""

    num_steps: int = 16
    branches: int = 12
    sde_steps: Optional[Tuple[int, ...]] = None            # M; None = first half, k in 0..T/2-1
    granularities: Tuple[int, ...] = (1, 2, 3)
    seeds_per_prompt: int = 1
    sde: str = "flow"
    noise_level: float = 0.7
    trunk_images: bool = True
    shift: Optional[float] = 1.0
    dynamic_shift: Optional[bool] = False
    completion_solver: str = "euler"          # only with granularities (1,): Λ > 1 defines its own tails
    completion_steps: Optional[int] = None
    completion_stride: str = "uniform"        # "official": G²RPO's code's paths (schedules.granularity_indices)

    def __post_init__(self):
        _check_common(self.num_steps, self.sde, self.noise_level, self.shift)
        _positive_int("branches (G)", self.branches)
        if self.completion_stride not in COMPLETION_STRIDES:
            raise ValueError(f"completion_stride must be one of {COMPLETION_STRIDES}, got {self.completion_stride!r}")
        _positive_int("seeds_per_prompt (N)", self.seeds_per_prompt)
        check_completion(self.completion_solver, self.completion_steps)
        steps = range(max(1, self.num_steps // 2)) if self.sde_steps is None else self.sde_steps
        object.__setattr__(self, "sde_steps", _check_steps("sde_steps (M)", steps, self.num_steps))
        object.__setattr__(self, "granularities", _check_granularities(self.granularities))
        if self.layout().custom_completion and self.granularities != (1,):
            raise ValueError(f"completion_solver / completion_steps need granularities (Λ) (1,), got "
                             f"{self.granularities}: coarser granularities are tails of their own")

    def layout(self) -> RolloutLayout:
        return RolloutLayout(self.num_steps, self.seeds_per_prompt, self.branches, self.sde_steps, 0,
                             self.granularities, self.trunk_images, False, self.sde, self.noise_level, self.shift,
                             self.dynamic_shift, self.completion_solver, self.completion_steps, self.completion_stride)


@dataclass(frozen=True)
class SlidingWindowSDE:
    """MixGRPO: SDE on steps window_start … window_start+window_size-1, ODE elsewhere.

    The K samples of a seed share the ODE prefix before the window (one trunk); K = 1 with
    N = group size gives independent noises per sample.
    """

    num_steps: int = 10
    window_start: int = 0
    window_size: int = 4
    seeds_per_prompt: int = 1
    samples_per_seed: int = 12
    sde: str = "flow"
    noise_level: float = 0.7
    shift: Optional[float] = 1.0
    dynamic_shift: Optional[bool] = False

    def __post_init__(self):
        _check_common(self.num_steps, self.sde, self.noise_level, self.shift)
        _positive_int("seeds_per_prompt (N)", self.seeds_per_prompt)
        _positive_int("samples_per_seed (K)", self.samples_per_seed)
        _positive_int("window_size", self.window_size)
        if not isinstance(self.window_start, int) or not 0 <= self.window_start <= self.num_steps - 2:
            raise ValueError(f"window_start must be in 0..T-2 = 0..{self.num_steps - 2}, got {self.window_start!r}")
        if self.window_start + self.window_size > self.num_steps:
            raise ValueError(f"window_start + window_size must be <= T = {self.num_steps}, got "
                             f"{self.window_start} + {self.window_size}")

    def layout(self) -> RolloutLayout:
        return RolloutLayout(self.num_steps, self.seeds_per_prompt, self.samples_per_seed, (self.window_start,),
                             self.window_start + self.window_size, (1,), False, False, self.sde, self.noise_level,
                             self.shift, self.dynamic_shift)
