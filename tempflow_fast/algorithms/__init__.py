"""The methods: each gives a rollout plan, per-sample advantages and per-state weights."""

from tempflow_fast.algorithms.diffusion_nft import DiffusionNFT
from tempflow_fast.algorithms.flow_grpo import FlowGRPO
from tempflow_fast.algorithms.g2rpo import G2RPO
from tempflow_fast.algorithms.mixgrpo import MixGRPO
from tempflow_fast.algorithms.stepwise import StepwiseFlowGRPO
from tempflow_fast.algorithms.tempflow import TempFlowGRPO

__all__ = ["FlowGRPO", "TempFlowGRPO", "G2RPO", "StepwiseFlowGRPO", "MixGRPO", "DiffusionNFT", "from_config"]


def from_config(cfg):
    """The algorithm object for `cfg.method` (a tempflow_fast.training.train_config.Config)."""
    s = cfg.sampling
    own = s.schedule_from_model  # shift / dynamic shift None: the loaded model's scheduler config decides
    common = dict(num_steps=s.num_steps, noise_level=s.noise_level, shift=None if own else s.shift,
                  dynamic_shift=None if own else s.dynamic_shift)
    completion = dict(completion_solver=s.completion_solver, completion_steps=s.completion_steps)
    if completion != dict(completion_solver="euler", completion_steps=None) and (
            cfg.method in ("flow_grpo", "stepwise", "mixgrpo", "diffusion_nft")
            or (cfg.method == "tempflow" and not cfg.tempflow.bifurcation)):
        raise ValueError("config fields 'sampling.completion_solver' / 'sampling.completion_steps': they apply to the "
                         "ODE completions after a branch step (tempflow with bifurcation, g2rpo with granularities "
                         f"[1]); method {cfg.method!r} here has none")
    mode = cfg.reward.advantage_mode
    if mode != "composite" and cfg.method in ("stepwise", "diffusion_nft"):
        raise ValueError("config field 'reward.advantage_mode': 'per_component' is for flow_grpo, tempflow, g2rpo and "
                         f"mixgrpo; {cfg.method} takes one reward per image from the composite")
    if cfg.method == "flow_grpo":
        return FlowGRPO(group_size=cfg.flow_grpo.group_size, timestep_fraction=cfg.flow_grpo.timestep_fraction,
                        advantage_mode=mode, **common)
    if cfg.method == "tempflow":
        t = cfg.tempflow
        return TempFlowGRPO(num_seeds=t.num_seeds, branches=t.branches, bifurcation_steps=t.bifurcation_steps,
                            bifurcation=t.bifurcation, noise_aware_weights=t.noise_aware_weights,
                            step_weight_scale=t.step_weight_scale, seed_grouping=t.seed_grouping, adaptive_bifurcation=t.adaptive_bifurcation,
                            adaptive_floor=t.adaptive_floor, adaptive_budget=t.adaptive_budget, advantage_mode=mode,
                            **completion, **common)
    if cfg.method == "g2rpo":
        g = cfg.g2rpo
        return G2RPO(branches=g.branches, branch_steps=g.branch_steps, granularities=tuple(g.granularities),
                     sigma_schedule=g.sigma_schedule, completion_stride=g.completion_stride,
                     unbiased_std=g.unbiased_std, std_eps=g.std_eps, advantage_mode=mode, **completion, **common)
    if cfg.method == "stepwise":
        return StepwiseFlowGRPO(group_size=cfg.stepwise.group_size, sde=cfg.stepwise.sde,
                                timestep_fraction=cfg.stepwise.timestep_fraction, min_std=cfg.stepwise.min_std,
                                **common)
    if cfg.method == "mixgrpo":
        m = cfg.mixgrpo
        return MixGRPO(group_size=m.group_size, window_size=m.window_size, shift_interval=m.shift_interval,
                       window_stride=m.window_stride, unbiased_std=m.unbiased_std, std_eps=m.std_eps,
                       advantage_mode=mode, **common)
    if cfg.method == "diffusion_nft":
        d = cfg.diffusion_nft
        return DiffusionNFT(num_steps=s.num_steps, group_size=d.group_size, guidance_strength=d.guidance_strength,
                            timestep_fraction=d.timestep_fraction, old_decay_rate=d.old_decay_rate,
                            old_decay_max=d.old_decay_max, shift=common["shift"], dynamic_shift=common["dynamic_shift"])
    raise ValueError(f"config field 'method': unknown method {cfg.method!r}")
