"""The prefix-recompute reference rollout: what a rollout costs with no sharing at all, run on the same model so
the bench can report the engine's speedup over it as a ratio measured in one run. It is a lower bound on
sharing, not the public codes' structure: TempFlow-GRPO's sampler already shares each seed's trunk (the bench
measures that structure separately, official.py).

For every (prompt, seed) it draws one initial noise; for every branch step k and branch b it
recomputes the prefix — the ODE from x_T to x_k and v(x_k), k + 1 model calls — takes the SDE step,
and finishes each granularity λ separately (SDE while the step index is below the layout's
`tail_sde_until`, ODE after; the plan's completion solver where it has one); trunk images, when the plan
asks for them, cost one more ODE trajectory per seed. Each model call is a single row: one forward per branch. The calls it makes are
exactly `sampling.accounting.recompute_prefix_nfe(layout, P)`, which the returned counts let the
bench check.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from tempflow_fast.models.base import select_cond
from tempflow_fast.sampling.accounting import NFE_PHASES
from tempflow_fast.sampling.schedules import model_sigmas
from tempflow_fast.sampling.simple import initial_noise
from tempflow_fast.sampling.solvers import completion_indices, solve
from tempflow_fast.sampling.steppers import ode_step, sde_step


@torch.no_grad()
def per_branch_rollout(model, prompts: Sequence[str], plan, *, seed: int) -> Dict[str, Dict[str, int]]:
    """Run `plan` branch by branch; returns {"nfe": calls by phase, "images": decoded images}."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    layout = plan.layout()
    T = layout.num_steps
    sig = model_sigmas(model, T, layout.shift, layout.dynamic_shift).tolist()
    cond = model.encode_prompts(list(prompts))
    device = next(iter(cond.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    nfe = dict.fromkeys(NFE_PHASES, 0)
    images = 0

    def call_at(x, sigma, c, phase):
        nfe[phase] += x.shape[0]
        return model.velocity(x, torch.full((x.shape[0],), sigma, device=device), c).float()

    def call(x, i, c, phase):
        return call_at(x, sig[i], c, phase)

    for p in range(len(prompts)):
        c = select_cond(cond, torch.tensor([p], device=device))
        for _ in range(layout.seeds_per_prompt):
            x_init = initial_noise(model, 1, gen).to(device)
            if layout.trunk_images:
                x = x_init
                for i in range(T):
                    x = ode_step(x, call(x, i, c, "trunk"), sig[i], sig[i + 1])
                model.decode(x)
                images += 1
            for k in layout.branch_steps:
                for _ in range(layout.branches):
                    x = x_init
                    for i in range(k):  # the prefix, recomputed for this branch
                        x = ode_step(x, call(x, i, c, "branch"), sig[i], sig[i + 1])
                    v = call(x, k, c, "branch")
                    xi = torch.randn(x.shape, generator=gen, device=device)
                    branch_start = sde_step(layout.sde, x, v, sig[k], sig[k + 1], layout.noise_level,
                                            sigma_max=sig[1], noise=xi).prev_sample.float()
                    if layout.custom_completion:
                        path = completion_indices(T, k + 1, layout.completion_solver, layout.completion_steps)
                        x = solve(lambda x_, s_: call_at(x_, s_, c, "completion"), branch_start, path, sig,
                                  layout.completion_solver)
                        model.decode(x)
                        images += 1
                        continue
                    for j, lam in enumerate(layout.granularities):
                        phase = "completion" if j == 0 else "granularity"
                        x, i = branch_start, k + 1
                        while i < T:
                            nxt = min(i + lam, T)
                            v = call(x, i, c, phase)
                            # DDIM-style SDE has zero std on the step to σ = 0: that step is the Euler step
                            if i < layout.tail_sde_until and not (layout.sde == "ddim" and sig[nxt] == 0.0):
                                xi = torch.randn(x.shape, generator=gen, device=device)
                                x = sde_step(layout.sde, x, v, sig[i], sig[nxt], layout.noise_level,
                                             sigma_max=sig[1], noise=xi).prev_sample.float()
                            else:
                                x = ode_step(x, v, sig[i], sig[nxt])
                            i = nxt
                        model.decode(x)
                        images += 1
    return {"nfe": nfe, "images": images}
