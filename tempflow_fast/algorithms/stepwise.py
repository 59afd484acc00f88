"""Stepwise-Flow-GRPO: SDE trajectories (DDIM-style SDE by default) with Tweedie estimates x̂0 = x - σ·v
at every state; the reward of x̂0 before and after a step gives that step's gain; advantages are the
gains normalised per step across the prompt's group. Like Flow-GRPO, only the first int(T·timestep_fraction)
steps are trained (0.99: 9 of 10; with the DDIM-style SDE the last step is deterministic and untrained anyway).

Steps whose transition std is below `min_std` are not trained either. The DDIM-style SDE's std is σ'·sin(η·π/2), so
on diffusers' schedule (last nonzero sigma 1/1000) the step into σ' = 0.001 has std 9e-4: almost deterministic,
its exact Gaussian log-prob moves ~100× more per change of v than any other step's (|b|/std), one update takes its
ratio to approx-KL ~100, and with a continuous reward (whose gains on that step are tiny but nonzero, so normalised
to unit size) its gradient swamps every other step's — Stepwise did not learn JPEG compressibility at all
(docs/results.md). Flow-GRPO's CPS code trains that step with a constant-free log-prob, -(x'-μ)², which weights it
by std² ≈ 1e-6, i.e. not at all in effect; here it is left out by name. On the shapes reward that step's gains are
always 0 (no group), so nothing changes there."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tempflow_fast.algorithms.advantages import stepwise_gain_advantages
from tempflow_fast.algorithms.base import Credit, Rewards, trained_step_count
from tempflow_fast.algorithms.step_weights import ddim_sde_noise_std, flow_sde_noise_std
from tempflow_fast.sampling.plans import FullSDE


@dataclass
class StepwiseFlowGRPO:
    num_steps: int = 10
    group_size: int = 24
    sde: str = "ddim"
    noise_level: float = 0.7
    shift: float = 1.0
    dynamic_shift: bool = False  # FLUX's resolution-dependent shift
    timestep_fraction: float = 0.99  # trains steps 0 .. int(T·fraction) - 1
    min_std: float = 0.01  # steps whose transition std is below this are not trained (module doc)
    name: str = "stepwise"

    def __post_init__(self):
        trained_step_count(self.num_steps, self.timestep_fraction)
        if not 0.0 <= self.min_std < 1.0:
            raise ValueError(f"min_std must be in [0, 1), got {self.min_std!r}")

    def transition_std(self, sigmas: torch.Tensor) -> torch.Tensor:
        """(T,) std of each step's injected noise under this method's SDE (0 at the DDIM-style step to σ' = 0)."""
        noise_std = ddim_sde_noise_std if self.sde == "ddim" else flow_sde_noise_std
        return noise_std(sigmas.detach().cpu(), self.noise_level)

    def trained_steps(self, sigmas: torch.Tensor) -> list:
        """The steps credit trains: the first int(T·timestep_fraction) whose transition std is ≥ min_std."""
        last = trained_step_count(self.num_steps, self.timestep_fraction)
        std = self.transition_std(sigmas)
        return [k for k in range(last) if float(std[k]) >= self.min_std]

    def plan(self) -> FullSDE:
        return FullSDE(self.num_steps, self.group_size, self.sde, self.noise_level, tweedie=True, shift=self.shift, dynamic_shift=self.dynamic_shift)

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        if rewards.tweedie is None:
            raise ValueError("stepwise credit needs rewards.tweedie (B, T): the rollout must decode Tweedie estimates")
        traj = result.trajectories
        smp = result.samples
        step_of_sample = result.states.step[smp.state]
        allowed = self.trained_steps(result.sigmas)
        trained = sorted(k for k in set(step_of_sample.tolist()) if k in allowed)
        if not trained:
            raise ValueError(f"stepwise: no step to train: every step's transition std is below min_std = "
                             f"{self.min_std} or past timestep_fraction = {self.timestep_fraction}")
        stats = stepwise_gain_advantages(rewards.tweedie, rewards.final[1], traj.prompt, steps=trained)
        column = torch.full((rewards.tweedie.shape[1],), -1, dtype=torch.long, device=step_of_sample.device)
        column[trained] = torch.arange(len(trained), device=step_of_sample.device)
        adv = stats.advantages.view(-1, len(trained))
        zero = stats.zero_std.view(-1, len(trained))
        col = column[step_of_sample]
        safe = col.clamp(min=0)  # untrained steps (column -1) read column 0, and are masked out by `trained`
        return Credit(adv[smp.trajectory, safe], zero[smp.trajectory, safe],
                      torch.ones(len(result.states), device=adv.device),
                      {"zero_std_ratio": stats.zero_std_ratio}, trained=col >= 0)
