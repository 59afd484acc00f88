"""Solvers for the deterministic ODE completions after a branch step (beyond the papers).

After its SDE step at k a branch is finished by the probability-flow ODE from index k+1 to σ = 0, and the only
use of that run is its final image's reward. Any ODE solver will do, so a completion can take fewer model calls
than the T-k-1 Euler steps of the schedule (`sampling.completion_solver`, `sampling.completion_steps`):

- `euler`:    x' = x + (σ' - σ)·v, one call per step (the papers' completion).
- `heun`:     Heun's second-order method as diffusers' `FlowMatchHeunDiscreteScheduler` takes it: an Euler
              predictor to σ', a second call there, the step with the mean of both velocities; the last step
              (to σ = 0) is a plain Euler step. n steps cost 2n - 1 calls.
- `dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2), multistep in the data prediction
              x̂0 = x - σ·v with α = 1 - σ, λ = log(α/σ), as diffusers' `DPMSolverMultistepScheduler` with
              `prediction_type="flow_prediction"`, `use_flow_sigmas=True`, midpoint solver, `lower_order_final`:
              the first step and the step to σ = 0 are first order (= Euler), the others reuse the previous
              x̂0; one call per step.
- `tweedie`:  the Tweedie shortcut: Euler along the schedule for n - 1 steps, then at the n-th state score
              x̂0 = x - σ·v (the Euler step from σ straight to 0). n = 1 scores x̂0 at the first state after the
              branch step. n calls.

Which indices a completion visits (`completion_indices`): all of k+1 … T when `steps` is None or at least the
T-k-1 steps left (Euler then reproduces the schedule's own completion exactly); otherwise `steps` steps on
schedule indices spread evenly over k+1 … T (the tweedie shortcut: the first `steps` indices, then T). Every
evaluation is at a schedule index, so the engine batches completions with trunk rows and other branches at
the same σ as before; Heun evaluates twice at an index (corrector, then the next predictor).

`Completion` is one batch of rows' solver state, stepped by the engine one model evaluation at a time;
`solve` runs one to the end with a velocity function (the reference and the tests).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

from tempflow_fast.sampling.steppers import ode_step

COMPLETION_SOLVERS = ("euler", "heun", "dpmpp_2m", "tweedie")
# solvers whose completion is a run of plain Euler steps along its indices (a runner's ode_segment can take it)
EULER_PATH_SOLVERS = ("euler", "tweedie")


def check_completion(solver: str, steps: Optional[int]) -> None:
    if solver not in COMPLETION_SOLVERS:
        raise ValueError(f"completion_solver must be one of {COMPLETION_SOLVERS}, got {solver!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"completion_steps must be None or an int >= 1, got {steps!r}")


def completion_indices(num_steps: int, start: int, solver: str = "euler", steps: Optional[int] = None) -> List[int]:
    """Schedule indices a completion from index `start` visits, ending on T (see module doc)."""
    check_completion(solver, steps)
    if not 0 <= start < num_steps:
        raise ValueError(f"start must be in 0..T-1 = 0..{num_steps - 1}, got {start!r}")
    left = num_steps - start
    if solver == "tweedie":
        n = 1 if steps is None else min(steps, left)
        return list(range(start, start + n)) + [num_steps]
    if steps is None or steps >= left:
        return list(range(start, num_steps + 1))
    return [start + (2 * j * left + steps) // (2 * steps) for j in range(steps + 1)]  # j·left/steps, half up


def solver_calls(solver: str, indices: Sequence[int]) -> int:
    """Model calls of a completion along `indices` (each row)."""
    n = len(indices) - 1
    return 2 * n - 1 if solver == "heun" else n


def completion_calls(num_steps: int, start: int, solver: str = "euler", steps: Optional[int] = None) -> int:
    """Model calls per row of the completion from index `start`."""
    return solver_calls(solver, completion_indices(num_steps, start, solver, steps))


def _lam(sigma: float) -> float:
    return math.log(1.0 - sigma) - math.log(sigma)


class Completion:
    """The solver state of one batch of rows: evaluate v at (`x`, σ[`index`]), hand it to `advance`, repeat until
    `done`; the end point is then `x`. σ values are the schedule's Python floats `sig`, indexed by schedule index."""

    def __init__(self, solver: str, x: torch.Tensor, indices: Sequence[int], sig: Sequence[float]):
        check_completion(solver, None)
        if len(indices) < 2:
            raise ValueError(f"indices must hold at least 2 schedule indices, got {list(indices)}")
        self.solver, self.x, self.path, self.sig = solver, x, list(indices), sig
        self.pos = 0             # x sits at path[pos]
        self.index = self.path[0]  # the schedule index of the next evaluation
        self._start = None       # Heun: (x, v, dt) of the step whose corrector is pending
        self._prev = None        # DPM-Solver++(2M): (x̂0, λ) of the previous step

    @property
    def done(self) -> bool:
        return self.pos == len(self.path) - 1 and self._start is None

    def advance(self, v: torch.Tensor) -> None:
        """Take the velocity at (x, σ[index]) and move to the next evaluation (or the end)."""
        if self.done:
            raise RuntimeError("advance() after the completion reached σ = 0")
        s, s_next = self.sig[self.path[self.pos]], self.sig[self.path[self.pos + 1]]
        if self.solver == "heun":
            if self._start is None:
                if s_next == 0.0:  # the last step is first order, as in diffusers
                    self._move(ode_step(self.x, v, s, s_next))
                    return
                self._start = (self.x, v, s_next - s)
                self.x = ode_step(self.x, v, s, s_next)  # predictor; the corrector's call is at σ'
                self.index = self.path[self.pos + 1]
                return
            x0, v0, dt = self._start
            self._start = None
            self._move((x0.float() + (0.5 * (v0.float() + v.float())) * dt).to(x0.dtype))
            return
        if self.solver == "dpmpp_2m":
            data = self.x.float() - s * v.float()  # x̂0
            prev, self._prev = self._prev, (data, _lam(s) if 0.0 < s < 1.0 else None)
            if s_next == 0.0 or prev is None or prev[1] is None:
                self._move(ode_step(self.x, v, s, s_next))  # first order: the DDIM step, which is Euler here
                return
            lam, lam_next = _lam(s), _lam(s_next)
            h, h_prev = lam_next - lam, lam - prev[1]
            d1 = (data - prev[0]) * (h / h_prev)
            alpha_next = 1.0 - s_next
            x = (s_next / s) * self.x.float() - (alpha_next * math.expm1(-h)) * (data + 0.5 * d1)
            self._move(x.to(self.x.dtype))
            return
        self._move(ode_step(self.x, v, s, s_next))  # euler, tweedie (its last step is x̂0)

    def _move(self, x: torch.Tensor) -> None:
        self.x = x
        self.pos += 1
        self.index = self.path[self.pos]


def solve(velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, indices: Sequence[int],
          sig: Sequence[float], solver: str = "euler") -> torch.Tensor:
    """Run a completion of rows `x` along schedule `indices` with `velocity(x, sigma) -> v`; returns the end."""
    c = Completion(solver, x, indices, sig)
    while not c.done:
        c.advance(velocity(c.x, sig[c.index]))
    return c.x
