"""NFE and image accounting for rollouts, measured and analytical (design.md §3.1).

NFE counts latent rows evaluated by the model (one row through `velocity` = 1 NFE), not batched
calls, so counts compare across batch sizes and machines. Phases:

- trunk:       ODE trunk calls, from the initial noise up to v(x_kmax) (to σ = 0 with trunk images)
- branch:      calls made only to start a branch. Always 0 in the engine, since the SDE step at k
               reuses the trunk's v(x_k); non-zero in the "recompute prefixes" count below
- completion:  calls advancing branches after their SDE step at the primary granularity Λ[0]
               (includes the SDE tails of FullSDE / SlidingWindowSDE), with the plan's completion
               solver (solvers.completion_calls)
- granularity: extra calls for the other granularities λ in Λ[1:] (their first call, at k+1, is
               shared with Λ[0] and not counted again)

Images by phase: trunk (ODE trunk images), completion / granularity (final branch images at Λ[0]
/ at the others), tweedie (decoded x̂0 estimates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from tempflow_fast.sampling.plans import RolloutLayout
from tempflow_fast.sampling.schedules import granularity_calls
from tempflow_fast.sampling.solvers import completion_calls

NFE_PHASES = ("trunk", "branch", "completion", "granularity")
IMAGE_PHASES = ("trunk", "completion", "granularity", "tweedie")


@dataclass
class RolloutStats:
    nfe: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(NFE_PHASES, 0))
    images: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(IMAGE_PHASES, 0))
    padded_rows: int = 0        # bucket padding rows the model also evaluated (not NFE)
    batched_calls: int = 0      # model invocations after bucketing

    @property
    def total_nfe(self) -> int:
        return sum(self.nfe.values())

    @property
    def total_images(self) -> int:
        return sum(self.images.values())

    def as_dict(self) -> Dict[str, int]:
        out = {f"nfe/{k}": v for k, v in self.nfe.items()}
        out.update({f"images/{k}": v for k, v in self.images.items()})
        out.update(nfe_total=self.total_nfe, images_total=self.total_images, padded_rows=self.padded_rows,
                   batched_calls=self.batched_calls)
        return out


def _branch_completion(layout: RolloutLayout, k: int) -> Dict[str, int]:
    """Calls one branch from step k needs after its SDE step, split into completion / granularity."""
    T = layout.num_steps
    lams = layout.granularities
    if layout.custom_completion:  # a completion solver's calls (the engine allows it with Λ = (1,) only)
        return {"completion": completion_calls(T, k + 1, layout.completion_solver, layout.completion_steps),
                "granularity": 0}
    stride = layout.completion_stride
    first = granularity_calls(T, k, lams[0], stride)
    extra = sum(granularity_calls(T, k, lam, stride) - 1 for lam in lams[1:])
    return {"completion": first, "granularity": extra}


def min_nfe(layout: RolloutLayout, num_prompts: int) -> Dict[str, int]:
    """NFE by phase with trunk sharing (what the engine does): one trunk per (prompt, seed), the
    SDE step at k reusing v(x_k), each branch finishing from k+1 at every granularity."""
    trunks = num_prompts * layout.seeds_per_prompt
    out = {"trunk": trunks * layout.trunk_calls, "branch": 0, "completion": 0, "granularity": 0}
    for k in layout.branch_steps:
        per = _branch_completion(layout, k)
        out["completion"] += trunks * layout.branches * per["completion"]
        out["granularity"] += trunks * layout.branches * per["granularity"]
    return out


def recompute_prefix_nfe(layout: RolloutLayout, num_prompts: int) -> Dict[str, int]:
    """NFE of a per-branch plan with no sharing: every branch integrates its own prefix to x_k and
    evaluates v(x_k) (k+1 calls, counted as "branch"), and finishes each granularity separately.
    Trunk images, when asked for, still cost one trunk per (prompt, seed)."""
    trunks = num_prompts * layout.seeds_per_prompt
    T = layout.num_steps
    out = {"trunk": trunks * T if layout.trunk_images else 0, "branch": 0, "completion": 0, "granularity": 0}
    for k in layout.branch_steps:
        n = trunks * layout.branches
        out["branch"] += n * (k + 1)
        out["completion"] += n * _branch_completion(layout, k)["completion"]
        out["granularity"] += n * sum(granularity_calls(T, k, lam, layout.completion_stride)
                                      for lam in layout.granularities[1:])
    return out
