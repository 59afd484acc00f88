"""The policy update: ONE policy forward per shared state, its K samples scored by `fused_flow_grpo_loss`
(design.md §3.2).

`build_update_batch` turns a rollout + credit into state groups: every trained state with the K samples
that left it (K = branches for a bifurcation point, 1 for an SDE tail), minus the samples whose group
carried no signal (zero reward spread) and those the credit leaves untrained (Flow-GRPO's timestep_fraction).
States are bucketed by K so each fused-loss call sees a fixed (N, K, D) shape. `split_parts` divides them into
disjoint parts, one optimizer step each (train.optimizer_steps_per_epoch). `policy_loss` runs the policy (and, with β > 0, the reference) once per state of a
micro-batch and returns the loss scaled by the micro-batch's share of all samples, so summing the
micro-batches' losses gives the mean over every sample and trained step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from tempflow_fast import ops
from tempflow_fast.models.base import select_cond


@dataclass
class StateGroup:
    """S trained states sharing K: state latents and their K samples, ready for the fused loss."""

    latents: torch.Tensor  # (S, *L) x_i
    sigma: torch.Tensor  # (S,)
    sigma_next: torch.Tensor  # (S,)
    std: torch.Tensor  # (S,)
    prompt: torch.Tensor  # (S,) row of the rollout's cond
    weights: torch.Tensor  # (S,) step weights
    samples: torch.Tensor  # (S, K, *L) x_{i+1}
    old_log_prob: torch.Tensor  # (S, K)
    advantages: torch.Tensor  # (S, K)
    step: Optional[torch.Tensor] = None  # (S,) step index k (per-step statistics)
    unit: Optional[torch.Tensor] = None  # (S,) what split_parts keeps together: the trajectory of its first sample

    def __len__(self) -> int:
        return self.sigma.shape[0]

    @property
    def num_samples(self) -> int:
        return self.samples.shape[0] * self.samples.shape[1]

    def take(self, index: torch.Tensor) -> "StateGroup":
        return StateGroup(*(None if getattr(self, f) is None else getattr(self, f).index_select(0, index)
                            for f in self.__dataclass_fields__))


def build_update_batch(result, credit, *, skip_zero_std: bool = True) -> List[StateGroup]:
    """State groups (one per distinct K) from a RolloutResult and a Credit."""
    smp, st = result.samples, result.states
    keep = ~credit.zero_std if skip_zero_std else torch.ones_like(credit.zero_std)
    if credit.trained is not None:
        keep = keep & credit.trained
    idx = keep.nonzero().squeeze(1)
    if idx.numel() == 0:
        return []
    state_of = smp.state[idx]
    order = torch.argsort(state_of, stable=True)
    idx, state_of = idx[order], state_of[order]
    states, counts = torch.unique_consecutive(state_of, return_counts=True)
    groups = []
    starts = torch.cumsum(counts, 0) - counts
    for k in counts.unique().tolist():
        sel = (counts == k).nonzero().squeeze(1)
        rows = (starts[sel][:, None] + torch.arange(k, device=starts.device)[None, :]).reshape(-1)
        sample_idx = idx[rows]
        sid = states[sel]
        latent_shape = smp.sample.shape[1:]
        groups.append(
            StateGroup(
                latents=st.latents[sid],
                sigma=st.sigma[sid],
                sigma_next=st.sigma_next[sid],
                std=st.std[sid],
                prompt=st.prompt[sid],
                weights=credit.state_weights[sid].float(),
                samples=smp.sample[sample_idx].view(len(sid), k, *latent_shape),
                old_log_prob=smp.old_log_prob[sample_idx].view(len(sid), k),
                advantages=credit.advantages[sample_idx].view(len(sid), k).float(),
                step=st.step[sid],
                unit=smp.trajectory[sample_idx].view(len(sid), k)[:, 0],
            )
        )
    return groups


def split_parts(groups: List[StateGroup], parts: int, gen: torch.Generator) -> List[List[StateGroup]]:
    """`parts` disjoint lists of state groups: the units (StateGroup.unit) in a random order from `gen`, cut into
    `parts` runs of equal count. A shared state's K samples stay together (one forward each), and so do the
    steps of a full-SDE trajectory, as Flow-GRPO's code splits its trajectories (scripts/train_sd3.py: main,
    `gradient_accumulation_steps = num_batches_per_epoch // 2` batches of trajectories per optimizer step)."""
    if parts == 1:
        return [groups]
    units = torch.unique(torch.cat([g.unit for g in groups])) if groups else torch.empty(0, dtype=torch.long)
    order = units[torch.randperm(len(units), generator=gen).to(units.device)]
    part_of = {int(u): j * parts // max(1, len(order)) for j, u in enumerate(order.tolist())}
    out = []
    for j in range(parts):
        chosen = []
        for g in groups:
            idx = torch.tensor([i for i, u in enumerate(g.unit.tolist()) if part_of[u] == j], dtype=torch.long,
                               device=g.unit.device)
            if idx.numel():
                chosen.append(g.take(idx))
        out.append(chosen)
    return out


def sde_mean(sde: str, x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level: float, sigma_max: float,
             any_sample: torch.Tensor) -> torch.Tensor:
    """μ_θ of the SDE step from x with velocity v (gradient flows through v). `any_sample` only fills the op's
    prev_sample slot; the mean does not depend on it."""
    if sde == "flow":
        out = ops.flow_sde_step(x, v, sigma, sigma_next, noise_level, sigma_max=sigma_max, prev_sample=any_sample)
    else:
        out = ops.ddim_sde_step(x, v, sigma, sigma_next, noise_level, prev_sample=any_sample)
    return out.mean


def policy_loss(
    model,
    group: StateGroup,
    *,
    cond,
    sde: str,
    noise_level: float,
    sigma_max: float,
    total_samples: int,
    clip_range: float,
    adv_clip: float,
    beta: float = 0.0,
    kl_convention: str = "flow_grpo",
    reference: Optional[Callable] = None,
):
    """(scaled loss, LossOutput) for one micro-batch of states; one policy forward for all its samples."""
    x = group.latents
    rows = select_cond(cond, group.prompt)
    v = model.velocity(x, group.sigma, rows)
    mean = sde_mean(sde, x, v, group.sigma, group.sigma_next, noise_level, sigma_max, group.samples[:, 0])
    ref_mean, kl_std = None, None
    if beta > 0.0:
        if reference is None:
            raise ValueError("beta > 0 needs a reference policy")
        with torch.no_grad():
            v_ref = reference(x, group.sigma, rows)
            ref_mean = sde_mean(sde, x, v_ref, group.sigma, group.sigma_next, noise_level, sigma_max,
                                group.samples[:, 0]).detach()
        # Flow-GRPO's convention divides by the SDE's s (std without sqrt(-dt)); the exact Gaussian KL by std.
        kl_std = group.std / torch.sqrt(group.sigma - group.sigma_next) if kl_convention == "flow_grpo" else group.std
    out = ops.fused_flow_grpo_loss(
        mean, group.samples, group.std, group.old_log_prob, group.advantages,
        clip_range=clip_range, weights=group.weights, adv_clip=adv_clip, ref_mean=ref_mean, beta=beta, kl_std=kl_std,
    )
    return out.loss * (group.num_samples / total_samples), out


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else math.isfinite(x)
