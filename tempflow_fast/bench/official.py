"""The public codes' structure as the bench's baseline, transcribed into this codebase's terms.

The prefix-recompute reference (reference.py) shares nothing; the public codes already share some work, so the
speedups the bench reports against them (`tempflow-fast bench official`) are measured against this module:

TempFlow-GRPO (Shredded-Pork/TempFlow-GRPO: `flow_grpo/diffusers_patch/flux_pipeline_with_logprob_perstep.py`
@e66824e, `scripts/train_flux_pr.py` @28a9b9b, `config/dgx.py: flux_pr`):
- rollout: one sampler call per (prompt, seed) (`sample.train_batch_size = 1`): the trunk is one row; at each
  branch step k one call on the trunk row, then its K SDE samples (from the trunk's v(x_k), K noises) finished
  together, K rows per call for the T-k-1 ODE steps, and decoded together; the trunk's own image at the end;
- update: one row per branch sample per trained step (`latents.repeat_interleave(exploration_k)`), one call of
  the K rows of a (seed, k) (`train.batch_size = 1` sample × 6 rows), with gradient checkpointing
  (`enable_gradient_checkpointing()`), and with β > 0 a reference forward (adapters disabled) on the same rows;
  gradients accumulated over every call of the iteration.

Flow-GRPO (yifan123/flow_grpo: `scripts/train_sd3.py`, `config/grpo.py: geneval_sd3`, `pickscore_sd3`):
- rollout: sampler calls of `sample.train_batch_size = 9` trajectories, SDE at every step (T calls each);
- update: calls of `train.batch_size = 9` rows per trained step, a reference forward per row when β > 0.

What is kept from this codebase so both sides compute the same thing: the plan (branch steps, T, N, K, G), the
schedule, the SDE math (`sampling.steppers`, `training.update.sde_mean`), the credit and its step weights, the KL
convention, and which samples are trained (zero-spread groups skipped, `credit.trained`). TempFlow's public code
also branches at the last step: a method choice, not structure, left out (its 1.73·std step weights are
`tempflow.step_weight_scale`, carried by the credit like any weights). All noise is drawn up front in the engine's order (`engine_noise`), so with the same generator the baseline and the engine
see the same noises and give the same images; the public code draws per call, which changes no cost.

`ForwardCounter` counts what goes through the transformer on either side: calls, rows, rows with gradient, and
the block recomputations of gradient checkpointing, from which forward-equivalents follow (FORWARD_EQUIVALENTS).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from tempflow_fast.models.base import select_cond
from tempflow_fast.sampling.accounting import RolloutStats
from tempflow_fast.sampling.engine import (BranchSamples, RolloutResult, TrainedStates, Trajectories,
                                           decode_images)
from tempflow_fast.sampling.schedules import model_sigmas
from tempflow_fast.sampling.simple import initial_noise
from tempflow_fast.sampling.steppers import ode_step, sde_step
from tempflow_fast.training.update import sde_mean

FLOW_GRPO_SAMPLE_BATCH = 9    # sample.train_batch_size of Flow-GRPO's SD3 configs
FLOW_GRPO_TRAIN_BATCH = 9     # train.batch_size = sample.train_batch_size
# The FLOP model of the FLUX.1-dev extrapolation: one row-forward at 1024 px (4096 image + 512 text tokens) is
# 2 × 11.9 G parameters × 4608 tokens ≈ 110 TFLOP of matmuls plus attention 4 × 57 blocks × 3072 × 4608² ≈ 15
# TFLOP; seconds assume ASSUMED_TFLOPS sustained (bf16, H100/H200 class).
FLUX_1024_TFLOP_PER_ROW = 125.0
ASSUMED_TFLOPS = 800.0
# forward-equivalents of one row: a no-grad forward 1, a forward+backward 3 (backward ≈ 2 forwards), a block
# recomputed by gradient checkpointing 1 per full recompute (counted per row through block 0)
FORWARD_EQUIVALENTS = {"forward": 1.0, "forward_backward": 3.0, "recompute": 1.0}


class ForwardCounter:
    """Counts transformer work through forward pre-hooks: `calls`, `rows`, `grad_rows` (rows of calls with
    gradient), `recompute_rows` (rows block 0 ran again in backward under gradient checkpointing)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        blocks = getattr(transformer, "transformer_blocks", None)
        self.block = blocks[0] if blocks else None
        self.reset()
        self._handles = [transformer.register_forward_pre_hook(self._top, with_kwargs=True)]
        if self.block is not None:
            self._handles.append(self.block.register_forward_pre_hook(self._block, with_kwargs=True))

    def reset(self) -> None:
        self.calls = self.rows = self.grad_rows = self._block_grad_rows = 0

    @staticmethod
    def _batch(args, kwargs) -> int:
        x = args[0] if args else kwargs["hidden_states"]
        return x.shape[0]

    def _top(self, module, args, kwargs):
        n = self._batch(args, kwargs)
        self.calls += 1
        self.rows += n
        if torch.is_grad_enabled():
            self.grad_rows += n

    def _block(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self._block_grad_rows += self._batch(args, kwargs)

    @property
    def recompute_rows(self) -> int:
        return self._block_grad_rows - self.grad_rows

    @property
    def forward_equivalents(self) -> float:
        e = FORWARD_EQUIVALENTS
        return ((self.rows - self.grad_rows) * e["forward"] + self.grad_rows * e["forward_backward"]
                + self.recompute_rows * e["recompute"])

    def snapshot(self) -> Dict[str, float]:
        return {"calls": self.calls, "rows": self.rows, "grad_rows": self.grad_rows,
                "recompute_rows": self.recompute_rows, "forward_equivalents": self.forward_equivalents}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ForwardCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def engine_noise(model, layout, num_prompts: int, generator: torch.Generator):
    """(x_T (R, …), {step: noise}) drawn in the order the engine draws them: the R = P·N initial noises, then at
    each stochastic step (in step order) one draw for all its rows — at a branch step the K children of trunk
    row r are rows r·K … r·K+K-1; in a full-SDE tail the R trajectories."""
    R = num_prompts * layout.seeds_per_prompt
    device = generator.device
    x0 = initial_noise(model, R, generator).to(device)
    shape = tuple(x0.shape[1:])
    noise = {k: torch.randn((R * layout.branches, *shape), generator=generator, device=device)
             for k in layout.branch_steps}
    if layout.tail_sde_until > min(layout.branch_steps) + 1:  # full SDE: every later step draws too
        sig = None
        for i in range(min(layout.branch_steps) + 1, layout.tail_sde_until):
            if layout.sde == "ddim":
                sig = sig if sig is not None else model_sigmas(model, layout.num_steps, layout.shift,
                                                               layout.dynamic_shift).tolist()
                if sig[i + 1] == 0.0:
                    continue
            noise[i] = torch.randn((R * layout.branches, *shape), generator=generator, device=device)
    return x0, noise


class _Recorder:
    """Collects states, samples and trajectories at their engine row positions, so the baseline's result has
    exactly the engine's layout (credit, update batches and tests treat both alike)."""

    def __init__(self, S: int, M: int, B: int, lat, device):
        f = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.states = TrainedStates(f(S, *lat), f(S), f(S), f(S), f(S, dtype=torch.long), f(S, dtype=torch.long),
                                    f(S, dtype=torch.long))
        self.samples = BranchSamples(f(M, dtype=torch.long), f(M, *lat), f(M), f(M, dtype=torch.long))
        self.traj = Trajectories(f(B, dtype=torch.long), f(B, dtype=torch.long), f(B, dtype=torch.long),
                                 f(B, dtype=torch.long))
        self.final = f(B, *lat)

    def state(self, sid, x, s, s_next, std, i, prompt, seed):
        st = self.states
        st.latents[sid], st.sigma[sid], st.sigma_next[sid], st.std[sid] = x, s, s_next, std
        st.step[sid], st.prompt[sid], st.seed[sid] = i, prompt, seed

    def sample(self, mids, sid, x_next, log_prob, tids):
        smp = self.samples
        smp.state[mids], smp.sample[mids], smp.old_log_prob[mids], smp.trajectory[mids] = sid, x_next, log_prob, tids


@torch.no_grad()
def official_rollout(model, prompts: Sequence[str], plan, *, seed: Optional[int] = None,
                     generator: Optional[torch.Generator] = None, decode_batch: int = 64,
                     image_format: str = "float") -> RolloutResult:
    """Run `plan` with the public code's sampler structure (module doc): a `Bifurcation` / `SingularSDE` with one
    granularity as TempFlow's per-(prompt, seed) sampler, a `FullSDE` as Flow-GRPO's batched sampler."""
    layout = plan.layout()
    T, N, K = layout.num_steps, layout.seeds_per_prompt, layout.branches
    full_sde = layout.tail_sde_until > min(layout.branch_steps) + 1
    if layout.granularities != (1,) or layout.tweedie or layout.custom_completion or (full_sde and K != 1):
        raise ValueError("official_rollout transcribes TempFlow's branching sampler (one granularity, Euler "
                         "completions) and Flow-GRPO's full-SDE sampler; this plan is neither")
    P = len(prompts)
    cond = model.encode_prompts(list(prompts))
    device = next(iter(cond.values())).device
    if (seed is None) == (generator is None):
        raise ValueError("pass exactly one of seed / generator")
    generator = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
    sigmas = model_sigmas(model, T, layout.shift, layout.dynamic_shift).to(device)
    sig = sigmas.tolist()
    x_init, noise = engine_noise(model, layout, P, generator)
    lat = tuple(x_init.shape[1:])
    R = P * N
    stats = RolloutStats()
    calls = [0]

    def call(x, i, prompt_rows, phase):
        stats.nfe[phase] += x.shape[0]
        calls[0] += 1
        return model.velocity(x, torch.full((x.shape[0],), sig[i], device=device),
                              select_cond(cond, prompt_rows)).float()

    def step(x, v, i, j, xi):
        """x_i → x_j: the SDE step where `xi` is given, else Euler."""
        if xi is None:
            return ode_step(x, v, sig[i], sig[j]), None
        out = sde_step(layout.sde, x, v, sig[i], sig[j], layout.noise_level, sigma_max=sig[1], noise=xi)
        return out.prev_sample.float(), out

    if full_sde:
        sde_steps = sorted(noise)
        rec = _Recorder(R * len(sde_steps), R * len(sde_steps), R, lat, device)
        rec.traj.prompt[:] = torch.arange(R, device=device) // N
        rec.traj.seed[:] = torch.arange(R, device=device) % N
        for start in range(0, R, FLOW_GRPO_SAMPLE_BATCH):
            rows = torch.arange(start, min(start + FLOW_GRPO_SAMPLE_BATCH, R), device=device)
            x = x_init[rows]
            for i in range(T):
                v = call(x, i, rows // N, "trunk" if i < layout.trunk_calls else "completion")  # engine's phases
                xi = noise[i][rows] if i in noise else None
                x_next, out = step(x, v, i, i + 1, xi)
                if out is not None:
                    sid = sde_steps.index(i) * R + rows
                    rec.state(sid, x, sig[i], sig[i + 1], out.std.reshape(-1), i, rows // N, rows % N)
                    rec.sample(sid, sid, x_next, out.log_prob.float(), rows)
                x = x_next
            rec.final[rows] = x
        images = decode_images(model, rec.final, decode_batch, image_format)
        stats.images["completion"] += R
        stats.batched_calls = calls[0]
        return RolloutResult(rec.states, rec.samples, rec.traj, {1: rec.final}, {1: images},
                             torch.arange(R, device=device) // N, torch.arange(R, device=device) % N, None, None,
                             None, cond, sigmas, layout.sde, layout.noise_level, layout, stats)

    ks = list(layout.branch_steps)
    B = R * K * len(ks)
    rec = _Recorder(R * len(ks), B, B, lat, device)
    images = None
    trunk_final = torch.zeros((R, *lat), device=device)
    trunk_images = []
    for r in range(R):  # one sampler call per (prompt, seed)
        p = torch.tensor([r // N], device=device)
        x = x_init[r:r + 1]
        for i in range(T):
            v = call(x, i, p, "trunk")
            if i in layout.branch_steps:
                j = ks.index(i)
                sid = j * R + r
                tids = torch.arange(j * R * K + r * K, j * R * K + (r + 1) * K, device=device)
                y, out = step(x.expand(K, *lat), v.expand(K, *lat), i, i + 1, noise[i][r * K:(r + 1) * K])
                rec.state(sid, x[0], sig[i], sig[i + 1], out.std.reshape(-1)[0], i, r // N, r % N)
                rec.sample(tids, sid, y, out.log_prob.float(), tids)
                rec.traj.prompt[tids], rec.traj.seed[tids], rec.traj.branch_step[tids] = r // N, r % N, i
                rec.traj.branch[tids] = torch.arange(K, device=device)
                for t in range(i + 1, T):  # the K branches finished together
                    y, _ = step(y, call(y, t, p.expand(K), "completion"), t, t + 1, None)
                rec.final[tids] = y
                branch_images = decode_images(model, y, decode_batch, image_format)
                images = branch_images.new_zeros((B, *branch_images.shape[1:])) if images is None else images
                images[tids.to(images.device)] = branch_images
                stats.images["completion"] += K
            x = ode_step(x, v, sig[i], sig[i + 1])
        trunk_final[r] = x[0]
        if layout.trunk_images:
            trunk_images.append(decode_images(model, x, decode_batch, image_format))
            stats.images["trunk"] += 1
    stats.batched_calls = calls[0]
    trunk_prompt = torch.arange(R, device=device) // N
    return RolloutResult(rec.states, rec.samples, rec.traj, {1: rec.final}, {1: images}, trunk_prompt,
                         torch.arange(R, device=device) % N, trunk_final if layout.trunk_images else None,
                         torch.cat(trunk_images) if trunk_images else None, None, cond, sigmas, layout.sde,
                         layout.noise_level, layout, stats)


def official_update(model, result: RolloutResult, credit, *, clip_range: float, adv_clip: float = 5.0,
                    beta: float = 0.0, kl_convention: str = "flow_grpo", reference=None,
                    skip_zero_std: bool = True) -> Dict[str, float]:
    """One pass of the public code's update over `result` (module doc), gradients accumulated into the model's
    parameters (the caller steps the optimizer): one row per trained sample; one call per (seed, k) of its K
    branch rows for a branching plan (TempFlow's), else per trained step of each batch of FLOW_GRPO_TRAIN_BATCH
    trajectories (Flow-GRPO's); the loss a mean over every row. Returns {"loss", "rows", "calls"}."""
    smp, st = result.samples, result.states
    keep = ~credit.zero_std if skip_zero_std else torch.ones_like(credit.zero_std)
    if credit.trained is not None:  # the steps the method trains (Flow-GRPO's timestep_fraction)
        keep = keep & credit.trained
    idx = keep.nonzero().squeeze(1)
    total = idx.numel()
    out = {"loss": 0.0, "rows": total, "calls": 0}
    if total == 0:
        return out
    if result.layout.branches > 1:  # TempFlow: a call per trained state, its K rows
        key = smp.state[idx]
    else:  # Flow-GRPO: a call per (batch of trajectories, trained step)
        key = (smp.trajectory[idx] // FLOW_GRPO_TRAIN_BATCH) * result.layout.num_steps + st.step[smp.state[idx]]
    order = torch.argsort(key, stable=True)
    idx, key = idx[order], key[order]
    _, counts = torch.unique_consecutive(key, return_counts=True)
    chunks = list(idx.split(counts.tolist()))
    sigma_max = float(result.sigmas[1])
    for rows in chunks:
        sid = smp.state[rows]
        x, s, s_next, std = st.latents[sid], st.sigma[sid], st.sigma_next[sid], st.std[sid]
        c = select_cond(result.cond, st.prompt[sid])
        v = model.velocity(x, s, c)  # one row per sample: the K rows of a state repeat its latent
        mean = sde_mean(result.sde, x, v, s, s_next, result.noise_level, sigma_max, smp.sample[rows])
        lp = gaussian_row_log_prob(smp.sample[rows], mean, std)
        ratio = torch.exp(lp - smp.old_log_prob[rows])
        adv = credit.advantages[rows].float().clamp(-adv_clip, adv_clip)
        w = credit.state_weights[sid].float()
        policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)) * w
        loss = policy.mean()
        if beta > 0.0:
            if reference is None:
                raise ValueError("beta > 0 needs a reference policy")
            with torch.no_grad():
                ref_mean = sde_mean(result.sde, x, reference(x, s, c), s, s_next, result.noise_level, sigma_max,
                                    smp.sample[rows])
            k = std / torch.sqrt(s - s_next) if kl_convention == "flow_grpo" else std
            kl = ((mean.float() - ref_mean.float()) ** 2).flatten(1).mean(1) / (2 * k ** 2)
            loss = loss + beta * kl.mean()
        loss = loss * (rows.numel() / total)  # gradient accumulation: the mean over every row
        loss.backward()
        out["loss"] += float(loss.detach())
        out["calls"] += 1
    return out


def gaussian_row_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; μ, std²) per row, averaged over the row's elements (design.md §1), in fp32, as the public code's
    `sde_step_with_logprob` computes it."""
    s = std.float().reshape(-1, *([1] * (x.dim() - 1)))
    lp = -((x.float() - mean.float()) ** 2) / (2 * s ** 2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)
