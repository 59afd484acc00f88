"""Sampling: schedules, steppers, rollout plans, the trunk-sharing rollout engine, segment runners.

    from tempflow_fast.sampling import Bifurcation, rollout
    result = rollout(model, prompts, Bifurcation(num_steps=10, seeds_per_prompt=4, branches=6), seed=0)

See engine.py for what a rollout returns and plans.py for the plans.
"""

from tempflow_fast.sampling.accounting import RolloutStats, min_nfe, recompute_prefix_nfe
from tempflow_fast.sampling.engine import BranchSamples, RolloutResult, TrainedStates, Trajectories, rollout
from tempflow_fast.sampling.plans import Bifurcation, FullSDE, RolloutLayout, SingularSDE, SlidingWindowSDE
from tempflow_fast.sampling.runners import CompiledRunner, CudaGraphRunner, EagerRunner, make_runner
from tempflow_fast.sampling.schedules import flow_sigmas, interval_calls, interval_indices, interval_sigmas
from tempflow_fast.sampling.simple import initial_noise, sample

__all__ = [
    "Bifurcation", "BranchSamples", "CompiledRunner", "CudaGraphRunner", "EagerRunner", "FullSDE", "RolloutLayout",
    "RolloutResult", "RolloutStats", "SingularSDE", "SlidingWindowSDE", "TrainedStates", "Trajectories",
    "flow_sigmas", "initial_noise", "interval_calls", "interval_indices", "interval_sigmas", "make_runner",
    "min_nfe", "recompute_prefix_nfe", "rollout", "sample",
]
