"""Segmented rollouts with asynchronous scoring: segment j is scored on the scorer thread while segment j+1
samples; the merged result is the concatenation of the segments, and async scoring changes no number."""

import threading

import torch
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.sampling.engine import concat_results, rollout
from tempflow_fast.sampling.plans import Bifurcation


def test_concat_results_offsets_rows():
    model = new_model(seed=0, transformer_config=dict(num_layers=1, num_single_layers=1,
                                                                   num_attention_heads=2, attention_head_dim=32))
    plan = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=2, bifurcation_steps=(0, 1))
    a = rollout(model, ["a red square"], plan, seed=1)
    b = rollout(model, ["two blue squares", "green squares"], plan, seed=2)
    m = concat_results([a, b])
    assert len(m.states) == len(a.states) + len(b.states)
    assert len(m.trajectories) == len(a.trajectories) + len(b.trajectories)
    assert m.trajectories.prompt.tolist() == a.trajectories.prompt.tolist() + (b.trajectories.prompt + 1).tolist()
    # every merged sample still points at its own state and trajectory
    i = len(a.samples) + 3
    j = 3
    assert torch.equal(m.states.latents[m.samples.state[i]], b.states.latents[b.samples.state[j]])
    assert m.samples.trajectory[i] == b.samples.trajectory[j] + len(a.trajectories)
    assert torch.equal(m.images[1], torch.cat([a.images[1], b.images[1]]))
    assert m.cond["token_ids"].shape[0] == 3
    assert m.stats.total_nfe == a.stats.total_nfe + b.stats.total_nfe


class ThreadRecordingReward:
    def __init__(self):
        self.threads = set()

    def __call__(self, images, prompts):
        self.threads.add(threading.get_ident())
        return images.mean(dim=(1, 2, 3)).float()


def test_async_segments_match_inline(tmp_path, make_trainer):
    runs = {}
    for mode in ("inline", "async"):
        tr = make_trainer(tmp_path / mode, "tempflow", "train.rollout_segments=2", "train.prompts_per_iteration=2",
                          f"train.async_reward={'true' if mode == 'async' else 'false'}")
        reward = ThreadRecordingReward()
        tr.reward = reward
        if tr.scorer is not None:
            tr.scorer.reward = reward
        runs[mode] = (tr.run_iteration(0), reward.threads)
    inline, asynch = runs["inline"][0], runs["async"][0]
    for key in ("loss", "reward_mean", "trained_samples", "nfe_total"):
        assert inline[key] == asynch[key], key
    assert runs["inline"][1] == {threading.get_ident()}
    assert threading.get_ident() not in runs["async"][1]


class TwoPartReward:
    """Stands in for a composite: exposes each call's raw component scores as `last_components`."""

    def __call__(self, images, prompts):
        bright, red = images.mean(dim=(1, 2, 3)), images[:, 0].mean(dim=(1, 2))
        self.last_components = {"bright": bright, "red": red}
        return (bright + red).float()


def test_reward_components_are_logged(tmp_path, make_trainer):
    for mode in ("false", "true"):
        tr = make_trainer(tmp_path / mode, "flow_grpo", f"train.async_reward={mode}", "train.rollout_segments=2")
        tr.reward = TwoPartReward()
        if tr.scorer is not None:
            tr.scorer.reward = tr.reward
        m = tr.run_iteration(0)
        assert abs(m["reward_component/bright"] + m["reward_component/red"] - m["reward_mean"]) < 1e-5


def test_cuda_graph_runner_falls_back_on_cpu_with_same_numbers(tmp_path, make_trainer):
    import pytest

    eager = make_trainer(tmp_path / "eager", "tempflow").run_iteration(0)
    with pytest.warns(UserWarning, match="cuda_graph runner needs CUDA"):
        tr = make_trainer(tmp_path / "graph", "tempflow", "sampling.runner=cuda_graph", "sampling.buckets=[8,64]")
    graph = tr.run_iteration(0)
    assert graph["loss"] == pytest.approx(eager["loss"], abs=1e-6)
    assert graph["nfe_total"] == eager["nfe_total"]
