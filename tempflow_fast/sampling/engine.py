"""The rollout engine: (model, prompts, plan, seed) → everything the GRPO update needs.

How it runs (design.md §3.1, §3.4). Every plan is normalised to a `RolloutLayout` (plans.py):
per prompt N seeds, an ODE trunk per seed, K SDE children at each branch step k, and tails from
k+1 to σ = 0 (SDE while the step index is below `tail_sde_until`, ODE after) at each granularity
λ in Λ. The engine walks the step index i = 0 … T-1 once. At each i it gathers every live row
whose next model call is at σ_i — trunk rows and the branches of all earlier k at all
granularities — and evaluates them in one batched call (cut into fixed bucket sizes by the
segment runner). Then:

- a trunk row takes its ODE step; if i is a branch step, its K children take the SDE step from
  (x_i, v(x_i)) with K independent noises — the trunk's velocity is reused, no extra call;
- a branch row takes its tail step to index min(i+λ, T); a child's first call (at k+1) is shared
  by all its granularities, after which it splits into one row per λ;
- with a single granularity and an ODE from k+1 on (TempFlow's completions), a branch row is
  stepped by its completion solver instead (`layout.completion_solver` / `completion_steps`,
  solvers.py): every evaluation still falls on a schedule index, so it joins the same batched
  calls; Heun evaluates twice at an index (its corrector, then its next predictor), so the walk
  repeats an index while rows are due there.

All randomness (initial noises, SDE noises) is drawn from one generator in a fixed order, outside
the model call, so equal seeds give identical rollouts whatever the runner or bucket sizes.

What comes back (`RolloutResult`), built so the trainer never needs the plan type:

- `states` (S rows, `TrainedStates`): the states the update trains on — latents x, σ, σ', SDE std,
  step index i, prompt (row of `cond`), seed. One per (prompt, seed, k) for a branch point (its K
  samples share it, so the trainer runs ONE policy forward per state and scores the K samples with
  `fused_flow_grpo_loss`), one per trajectory step for SDE tails (K = 1 per state). The SDE kind
  and η are `result.sde` / `result.noise_level`, one per rollout.
- `samples` (M rows, `BranchSamples`): per sampled SDE transition, `state` (row of `states`),
  `sample` (x_{i+1}), `old_log_prob`, `trajectory` (row of `trajectories`).
- `trajectories` (B rows, `Trajectories`): group keys `prompt`, `seed`, `branch_step` (k), `branch`
  (0..K-1). Rewards are per trajectory; an algorithm groups them with these keys (TempFlow's seed
  groups: (prompt, seed, k); Flow-GRPO: prompt) and broadcasts advantages to samples through
  `samples.trajectory`.
- `final_latents[λ]`, `images[λ]` (B, …): each trajectory's end at every granularity λ in Λ.
- `trunk_latents` / `trunk_images` (P·N rows, keys `trunk_prompt`, `trunk_seed`) when the plan
  finishes its trunks; `tweedie_images` (B, T, 3, H, W) when it asks for x̂0 = x - σ·v at every
  state i = 0 … T-1 of every trajectory (states up to k come from its trunk; no extra calls).
- `stats` (`RolloutStats`): NFE and images by phase, bucket padding, batched calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from tempflow_fast.images import to_uint8
from tempflow_fast.models.base import Cond, cond_batch_size
from tempflow_fast.sampling.accounting import RolloutStats
from tempflow_fast.sampling.plans import RolloutLayout
from tempflow_fast.sampling.runners import EagerRunner
from tempflow_fast.sampling.schedules import granularity_indices, interval_indices, model_sigmas
from tempflow_fast.sampling.simple import initial_noise
from tempflow_fast.sampling.solvers import EULER_PATH_SOLVERS, Completion, completion_indices
from tempflow_fast.sampling.steppers import ode_step, sde_step


@dataclass
class TrainedStates:
    latents: torch.Tensor      # (S, *latent_shape) x_i
    sigma: torch.Tensor        # (S,) σ_i
    sigma_next: torch.Tensor   # (S,) σ_{i+1}
    std: torch.Tensor          # (S,) SDE std of the step
    step: torch.Tensor         # (S,) long, i
    prompt: torch.Tensor       # (S,) long, row of result.cond
    seed: torch.Tensor         # (S,) long, seed index within the prompt

    def __len__(self) -> int:
        return self.sigma.shape[0]


@dataclass
class BranchSamples:
    state: torch.Tensor          # (M,) long, row of result.states
    sample: torch.Tensor         # (M, *latent_shape) x_{i+1}
    old_log_prob: torch.Tensor   # (M,) fp32, log N(x_{i+1}; μ_old, std²), mean over elements
    trajectory: torch.Tensor     # (M,) long, row of result.trajectories

    def __len__(self) -> int:
        return self.state.shape[0]


@dataclass
class Trajectories:
    prompt: torch.Tensor       # (B,) long
    seed: torch.Tensor         # (B,) long
    branch_step: torch.Tensor  # (B,) long, k
    branch: torch.Tensor       # (B,) long, 0..K-1

    def __len__(self) -> int:
        return self.prompt.shape[0]


@dataclass
class RolloutResult:
    states: TrainedStates
    samples: BranchSamples
    trajectories: Trajectories
    final_latents: Dict[int, torch.Tensor]
    images: Dict[int, torch.Tensor]
    trunk_prompt: torch.Tensor
    trunk_seed: torch.Tensor
    trunk_latents: Optional[torch.Tensor]
    trunk_images: Optional[torch.Tensor]
    tweedie_images: Optional[torch.Tensor]
    cond: Cond
    sigmas: torch.Tensor
    sde: str
    noise_level: float
    layout: RolloutLayout
    stats: RolloutStats


@dataclass
class _Cohort:
    """Rows that share their next call index and their path from there on."""

    x: torch.Tensor
    index: int
    prompt: torch.Tensor
    seed: torch.Tensor
    traj: Optional[torch.Tensor]       # None for the trunk cohort
    lams: tuple                        # granularities this cohort still stands for
    primary: bool                      # counts as "completion" (else "granularity")
    completion: Optional[Completion] = None  # a solver-stepped ODE completion (x and index follow it)
    branch_step: int = -1                    # k of the SDE step the rows' branches left from (-1: trunk)


def _check_layout(layout: RolloutLayout) -> None:
    if layout.tweedie and layout.granularities != (1,):
        raise ValueError(f"tweedie estimates need a single granularity (1,), got {layout.granularities}")
    if layout.tail_sde_until > min(layout.branch_steps) + 1 and layout.granularities != (1,):
        raise ValueError(f"SDE tails need granularities (1,), got {layout.granularities}")
    if layout.custom_completion and not _solver_completions(layout):
        raise ValueError(f"completion_solver={layout.completion_solver!r} / completion_steps="
                         f"{layout.completion_steps!r} apply to ODE completions after a branch step (one granularity, "
                         f"no SDE tail, no Tweedie estimates); this plan has none")


def _solver_completions(layout: RolloutLayout) -> bool:
    """True when every branch finishes by an ODE from k+1 that a completion solver may take."""
    return (layout.granularities == (1,) and not layout.tweedie
            and layout.tail_sde_until <= min(layout.branch_steps) + 1)


IMAGE_FORMATS = ("float", "uint8_cpu")


def decode_images(model, latents: torch.Tensor, batch: int, image_format: str = "float") -> torch.Tensor:
    """Decode `batch` latents at a time; with "uint8_cpu" each chunk leaves the device as uint8 at once, so
    decoded images never pile up on the GPU (a 1024 px image is 12.6 MB in fp32, 3.1 MB as uint8)."""
    out = []
    for i in range(0, latents.shape[0], batch):
        img = model.decode(latents[i:i + batch])
        out.append(to_uint8(img).cpu() if image_format == "uint8_cpu" else img)
    return torch.cat(out)


def _ode_only(layout: RolloutLayout, sig, path) -> bool:
    """True when every step along index `path` is a plain Euler step (no SDE draw, no Tweedie estimate)."""
    if layout.tweedie:
        return False
    for a, b in zip(path[:-1], path[1:]):
        if a < layout.tail_sde_until and not (layout.sde == "ddim" and sig[b] == 0.0):
            return False
    return True


@torch.no_grad()
def rollout(model, prompts: Sequence[str], plan, *, seed: Optional[int] = None,
            generator: Optional[torch.Generator] = None, runner=None, cond: Optional[Cond] = None,
            sigmas: Optional[torch.Tensor] = None, decode_batch: Optional[int] = None,
            image_format: str = "float") -> RolloutResult:
    """Run `plan` (any object with `.layout()`, see plans.py) for `prompts`; see the module doc.

    Pass exactly one of `seed` / `generator`. `runner` defaults to an EagerRunner whose calls are capped at
    the model's default rows per call (models/memory.py); `cond` skips `model.encode_prompts`; `sigmas`
    overrides the plan's schedule (T+1 values). Images are decoded `decode_batch` at a time (default sized by
    resolution, models/memory.py) and kept as the decoder returns them ("float") or as uint8 on the host
    ("uint8_cpu"). With `runner.segments` on, every run of plain Euler steps to σ = 0 (ODE completions with an
    Euler-path solver, the trunks after their last branch step) goes through `runner.ode_segment` in one piece.
    The schedule is the model's (`schedules.model_sigmas`): its scheduler's dynamic-shift constants, and its shift
    and dynamic shift where the plan leaves them None.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if (seed is None) == (generator is None):
        raise ValueError("pass exactly one of seed / generator")
    if not callable(getattr(plan, "layout", None)):
        raise ValueError(f"plan must be a rollout plan with .layout() (see sampling/plans.py), got {type(plan).__name__}")
    layout: RolloutLayout = plan.layout()
    _check_layout(layout)
    T, N, K = layout.num_steps, layout.seeds_per_prompt, layout.branches
    P = len(prompts)
    cond = model.encode_prompts(list(prompts)) if cond is None else cond
    if cond_batch_size(cond) != P:
        raise ValueError(f"cond has batch {cond_batch_size(cond)} but there are {P} prompts")
    device = next(iter(cond.values())).device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if sigmas is None:
        sigmas = model_sigmas(model, T, layout.shift, layout.dynamic_shift)
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    if sigmas.shape != (T + 1,):
        raise ValueError(f"sigmas must have shape (T+1,) = ({T + 1},), got {tuple(sigmas.shape)}")
    sig = sigmas.tolist()
    sigma_max = sig[1]
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    from tempflow_fast.models.memory import default_decode_batch, default_max_rows_per_call

    if decode_batch is None:
        decode_batch = default_decode_batch(model)
    if not isinstance(decode_batch, int) or decode_batch < 1:
        raise ValueError(f"decode_batch must be an int >= 1, got {decode_batch!r}")
    runner = EagerRunner(model, max_rows=default_max_rows_per_call(model)) if runner is None else runner
    segments = bool(getattr(runner, "segments", False))
    pad0, calls0 = runner.padded_rows, runner.batched_calls
    stats = RolloutStats()

    R = P * N
    trunk_prompt = torch.arange(R, device=device) // N
    trunk_seed = torch.arange(R, device=device) % N
    B = R * K * len(layout.branch_steps)
    x0 = initial_noise(model, R, generator).to(device)

    cohorts: List[_Cohort] = [_Cohort(x0, 0, trunk_prompt, trunk_seed, None, (), True)]
    st_chunks, smp_chunks, traj_chunks = [], [], []
    n_states = n_traj = 0
    final = {lam: torch.empty((B, *x0.shape[1:]), device=device) for lam in layout.granularities}
    trunk_final = None
    tw_trunk: Dict[int, torch.Tensor] = {}
    tw_branch: List[tuple] = []
    traj_trunk_row: List[torch.Tensor] = []

    def add_states(x, s_i, s_next, std, i, prompt, seed_):
        nonlocal n_states
        n = x.shape[0]
        st_chunks.append((x, torch.full((n,), s_i, device=device), torch.full((n,), s_next, device=device),
                          std.float(), torch.full((n,), i, device=device, dtype=torch.long), prompt, seed_))
        n_states += n
        return torch.arange(n_states - n, n_states, device=device)

    solver_tails = _solver_completions(layout)
    i = 0
    while i < T:
        active = [c for c in cohorts if c.index == i]
        if not active:
            i += 1
            continue
        cohorts = [c for c in cohorts if c.index != i]
        x = torch.cat([c.x for c in active])
        rows = torch.cat([c.prompt for c in active])
        v_all = runner(x, torch.full((x.shape[0],), sig[i], device=device), cond, rows).float()
        for c, v in zip(active, v_all.split([c.x.shape[0] for c in active])):
            n = c.x.shape[0]
            phase = "trunk" if c.traj is None else ("completion" if c.primary else "granularity")
            stats.nfe[phase] += n
            if layout.tweedie:
                est = c.x - sig[i] * v
                if c.traj is None:
                    tw_trunk[i] = est
                else:
                    tw_branch.append((c.traj, i, est))
            if c.traj is None:
                if i in layout.branch_steps:
                    # The K children of every trunk row: one SDE step from (x_k, v(x_k)), K noises.
                    xs, vs = c.x.repeat_interleave(K, 0), v.repeat_interleave(K, 0)
                    xi = torch.randn(xs.shape, generator=generator, device=device)
                    out = sde_step(layout.sde, xs, vs, sig[i], sig[i + 1], layout.noise_level,
                                   sigma_max=sigma_max, noise=xi)
                    sid = add_states(c.x, sig[i], sig[i + 1], out.std.reshape(-1)[::K], i, c.prompt, c.seed)
                    tid = torch.arange(n_traj, n_traj + n * K, device=device)
                    n_traj += n * K
                    traj_chunks.append((c.prompt.repeat_interleave(K), c.seed.repeat_interleave(K),
                                        torch.full((n * K,), i, device=device),
                                        torch.arange(K, device=device).repeat(n)))
                    traj_trunk_row.append(torch.arange(n, device=device).repeat_interleave(K))
                    smp_chunks.append((sid.repeat_interleave(K), out.prev_sample.float(), out.log_prob.float(), tid))
                    child_prompt = c.prompt.repeat_interleave(K)
                    lam = layout.granularities[0]
                    if solver_tails:
                        path = completion_indices(T, i + 1, layout.completion_solver, layout.completion_steps)
                        x_child = out.prev_sample.float()
                        if segments and layout.completion_solver in EULER_PATH_SOLVERS:
                            final[lam][tid] = runner.ode_segment(x_child, [sig[j] for j in path], cond, child_prompt)
                            stats.nfe["completion"] += n * K * (len(path) - 1)
                        else:
                            cohorts.append(_Cohort(x_child, i + 1, child_prompt, c.seed.repeat_interleave(K), tid,
                                                   (lam,), True, Completion(layout.completion_solver, x_child, path,
                                                                            sig)))
                    else:
                        cohorts.append(_Cohort(out.prev_sample.float(), i + 1, child_prompt,
                                               c.seed.repeat_interleave(K), tid, layout.granularities, True,
                                               branch_step=i))
                if (segments and layout.trunk_images and not layout.tweedie and i + 1 < T
                        and i + 1 > max(layout.branch_steps)):
                    # past the last branch step the trunk only finishes its image: one segment to σ = 0
                    trunk_final = runner.ode_segment(ode_step(c.x, v, sig[i], sig[i + 1]), sig[i + 1:], cond, c.prompt)
                    stats.nfe["trunk"] += n * (T - i - 1)
                elif i + 1 < layout.trunk_calls:
                    cohorts.append(_Cohort(ode_step(c.x, v, sig[i], sig[i + 1]), i + 1, c.prompt, c.seed, None,
                                           (), True))
                elif layout.trunk_images and i + 1 == T:
                    trunk_final = ode_step(c.x, v, sig[i], sig[i + 1])
                continue
            if c.completion is not None:
                c.completion.advance(v)
                if c.completion.done:
                    final[c.lams[0]][c.traj] = c.completion.x
                else:
                    c.x, c.index = c.completion.x, c.completion.index
                    cohorts.append(c)
                continue
            for lam in c.lams:
                if layout.completion_stride == "uniform":
                    nxt = min(i + lam, T)
                    path = interval_indices(T, nxt, lam) if nxt < T else [T]
                else:  # the granularity's own index path from k+1 (schedules.granularity_indices)
                    full = granularity_indices(T, c.branch_step, lam, layout.completion_stride)
                    path = full[full.index(i) + 1:]
                    nxt = path[0]
                primary = c.primary and lam == layout.granularities[0]
                # DDIM-style SDE has zero std on the step to σ = 0; that step is the Euler step.
                stochastic = i < layout.tail_sde_until and not (layout.sde == "ddim" and sig[nxt] == 0.0)
                if stochastic:
                    xi = torch.randn(c.x.shape, generator=generator, device=device)
                    out = sde_step(layout.sde, c.x, v, sig[i], sig[nxt], layout.noise_level,
                                   sigma_max=sigma_max, noise=xi)
                    sid = add_states(c.x, sig[i], sig[nxt], out.std.reshape(-1), i, c.prompt, c.seed)
                    smp_chunks.append((sid, out.prev_sample.float(), out.log_prob.float(), c.traj))
                    x_next = out.prev_sample.float()
                else:
                    x_next = ode_step(c.x, v, sig[i], sig[nxt])
                if nxt == T:
                    final[lam][c.traj] = x_next
                elif segments and _ode_only(layout, sig, path):
                    final[lam][c.traj] = runner.ode_segment(x_next, [sig[j] for j in path], cond, c.prompt)
                    stats.nfe["completion" if primary else "granularity"] += c.x.shape[0] * (len(path) - 1)
                else:
                    cohorts.append(_Cohort(x_next, nxt, c.prompt, c.seed, c.traj, (lam,), primary,
                                           branch_step=c.branch_step))

    stats.padded_rows = runner.padded_rows - pad0
    stats.batched_calls = runner.batched_calls - calls0

    def cat(chunks, j, shape_tail=()):
        if not chunks:
            return torch.empty((0, *shape_tail), device=device)
        return torch.cat([ch[j] for ch in chunks])

    lat_tail = tuple(x0.shape[1:])
    states = TrainedStates(cat(st_chunks, 0, lat_tail), cat(st_chunks, 1), cat(st_chunks, 2), cat(st_chunks, 3),
                           cat(st_chunks, 4).long(), cat(st_chunks, 5).long(), cat(st_chunks, 6).long())
    samples = BranchSamples(cat(smp_chunks, 0).long(), cat(smp_chunks, 1, lat_tail), cat(smp_chunks, 2),
                            cat(smp_chunks, 3).long())
    trajectories = Trajectories(*(cat(traj_chunks, j).long() for j in range(4)))

    images = {}
    for j, lam in enumerate(layout.granularities):
        images[lam] = decode_images(model, final[lam], decode_batch, image_format)
        stats.images["completion" if j == 0 else "granularity"] += B
    trunk_images = None
    if trunk_final is not None:
        trunk_images = decode_images(model, trunk_final, decode_batch, image_format)
        stats.images["trunk"] += R
    tweedie_images = None
    if layout.tweedie:
        tw = torch.empty((B, T, *lat_tail), device=device)
        row = torch.cat(traj_trunk_row)
        k_of = trajectories.branch_step
        for i, est in tw_trunk.items():
            # States up to and including k are the trunk's: every trajectory branching at k >= i shares them.
            sel = (k_of >= i).nonzero().squeeze(1)
            tw[sel, i] = est[row[sel]]
        for traj, i, est in tw_branch:
            tw[traj, i] = est
        tweedie_images = decode_images(model, tw.reshape(B * T, *lat_tail), decode_batch, image_format)
        tweedie_images = tweedie_images.reshape(B, T, *tweedie_images.shape[1:])
        stats.images["tweedie"] += B * T

    return RolloutResult(states, samples, trajectories, final, images, trunk_prompt, trunk_seed, trunk_final,
                         trunk_images, tweedie_images, cond, sigmas, layout.sde, layout.noise_level, layout, stats)


def concat_results(results: Sequence[RolloutResult]) -> RolloutResult:
    """One RolloutResult from several rollouts of the same plan over disjoint prompt lists (segments), as if
    they had been one rollout over the concatenated prompts: row indices (states, trajectories, prompts)
    are offset, tensors concatenated, counts added. Groups never cross prompts, so credit on the merged
    result equals credit per segment."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    if any(r.layout != first.layout or not torch.equal(r.sigmas, first.sigmas) for r in results):
        raise ValueError("concat_results: every segment must come from the same plan and schedule")

    def offsets(sizes):
        out, total = [], 0
        for s in sizes:
            out.append(total)
            total += s
        return out

    st_off = offsets([len(r.states) for r in results])
    tr_off = offsets([len(r.trajectories) for r in results])
    pr_off = offsets([cond_batch_size(r.cond) for r in results])
    cat = lambda xs: torch.cat(list(xs))  # noqa: E731
    states = TrainedStates(
        cat(r.states.latents for r in results), cat(r.states.sigma for r in results),
        cat(r.states.sigma_next for r in results), cat(r.states.std for r in results),
        cat(r.states.step for r in results), cat(r.states.prompt + o for r, o in zip(results, pr_off)),
        cat(r.states.seed for r in results))
    samples = BranchSamples(
        cat(r.samples.state + o for r, o in zip(results, st_off)), cat(r.samples.sample for r in results),
        cat(r.samples.old_log_prob for r in results),
        cat(r.samples.trajectory + o for r, o in zip(results, tr_off)))
    trajectories = Trajectories(
        cat(r.trajectories.prompt + o for r, o in zip(results, pr_off)), cat(r.trajectories.seed for r in results),
        cat(r.trajectories.branch_step for r in results), cat(r.trajectories.branch for r in results))
    optional = lambda name: None if getattr(first, name) is None else cat(getattr(r, name) for r in results)  # noqa: E731
    stats = RolloutStats()
    for r in results:
        for k, v in r.stats.nfe.items():
            stats.nfe[k] += v
        for k, v in r.stats.images.items():
            stats.images[k] += v
        stats.padded_rows += r.stats.padded_rows
        stats.batched_calls += r.stats.batched_calls
    return RolloutResult(
        states, samples, trajectories,
        {lam: cat(r.final_latents[lam] for r in results) for lam in first.final_latents},
        {lam: cat(r.images[lam] for r in results) for lam in first.images},
        cat(r.trunk_prompt + o for r, o in zip(results, pr_off)), cat(r.trunk_seed for r in results),
        optional("trunk_latents"), optional("trunk_images"), optional("tweedie_images"),
        {k: cat(r.cond[k] for r in results) for k in first.cond}, first.sigmas, first.sde, first.noise_level,
        first.layout, stats)
