"""The methods: each gives a rollout plan, per-sample advantages and per-state weights."""

from tempflow_fast.algorithms.flow_grpo import FlowGRPO
from tempflow_fast.algorithms.g2rpo import G2RPO
from tempflow_fast.algorithms.stepwise import StepwiseFlowGRPO
from tempflow_fast.algorithms.tempflow import TempFlowGRPO

__all__ = ["FlowGRPO", "TempFlowGRPO", "G2RPO", "StepwiseFlowGRPO", "from_config"]


def from_config(cfg):
    """The algorithm object for `cfg.method` (a tempflow_fast.training.train_config.Config)."""
    s = cfg.sampling
    own = s.schedule_from_model  # shift / dynamic shift None: the loaded model's scheduler config decides
    common = dict(num_steps=s.num_steps, noise_level=s.noise_level, shift=None if own else s.shift,
                  dynamic_shift=None if own else s.dynamic_shift)
    completion = dict(completion_solver=s.completion_solver, completion_steps=s.completion_steps)
    if completion != dict(completion_solver="euler", completion_steps=None) and (
            cfg.method in ("flow_grpo", "stepwise") or (cfg.method == "tempflow" and not cfg.tempflow.bifurcation)):
        raise ValueError("config fields 'sampling.completion_solver' / 'sampling.completion_steps': they apply to the "
                         "ODE completions after a branch step (tempflow with bifurcation, g2rpo with granularities "
                         f"[1]); method {cfg.method!r} here has none")
    if cfg.method == "flow_grpo":
        return FlowGRPO(group_size=cfg.flow_grpo.group_size, **common)
    if cfg.method == "tempflow":
        t = cfg.tempflow
        return TempFlowGRPO(num_seeds=t.num_seeds, branches=t.branches, bifurcation_steps=t.bifurcation_steps,
                            bifurcation=t.bifurcation, noise_aware_weights=t.noise_aware_weights,
                            seed_grouping=t.seed_grouping, adaptive_bifurcation=t.adaptive_bifurcation,
                            adaptive_floor=t.adaptive_floor, adaptive_budget=t.adaptive_budget, **completion, **common)
    if cfg.method == "g2rpo":
        g = cfg.g2rpo
        return G2RPO(branches=g.branches, branch_steps=g.branch_steps, granularities=tuple(g.granularities),
                     **completion, **common)
    if cfg.method == "stepwise":
        return StepwiseFlowGRPO(group_size=cfg.stepwise.group_size, sde=cfg.stepwise.sde, **common)
    raise ValueError(f"config field 'method': unknown method {cfg.method!r}")
