"""train.async_rollout: iteration n+1's rollout samples in the background with the weights before update n while
that update runs (training/async_rollout.py). The rollouts are compared with ones sampled in the foreground by
the weights they should have come from, the copy's memory is checked (frozen weights shared), and resume is exact
with a rollout in flight at the checkpoint."""

import json
import threading

import pytest
import torch

from tempflow_fast.config import load_config
from tempflow_fast.training.async_rollout import SerializedReward
from tempflow_fast.training.train_config import Config

ASYNC = "train.async_rollout=true"


def latents(result):
    return result.final_latents[1]


def test_each_rollout_is_sampled_by_the_weights_one_update_behind(tmp_path, make_trainer):
    lagged = make_trainer(tmp_path / "async", "tempflow", ASYNC, "train.iterations=3")
    sync = make_trainer(tmp_path / "sync", "tempflow", "train.iterations=3")
    base = make_trainer(tmp_path / "base", "tempflow", "train.iterations=3")  # stays at θ_0

    def foreground(trainer, iteration):  # what `trainer`'s current weights sample for this iteration
        return latents(trainer._rollout(trainer.dist.shard(trainer.prompts_for(iteration)), iteration,
                                        trainer._plan_for(iteration))[0])

    m0, s0 = lagged.run_iteration(0), sync.run_iteration(0)
    assert m0["rollout_policy_lag"] == 0 and m0["loss"] == s0["loss"]  # the first rollout is the run's own
    assert torch.equal(latents(lagged._last_result), latents(sync._last_result))
    for (_, p), (_, q) in zip(lagged.named_params, sync.named_params):
        assert torch.equal(p, q)  # θ_1 alike

    m1 = lagged.run_iteration(1)
    assert m1["rollout_policy_lag"] == 1
    assert torch.equal(latents(lagged._last_result), foreground(base, 1))  # rollout 2 by θ_0 ...
    assert not torch.equal(latents(lagged._last_result), foreground(sync, 1))  # ... not by θ_1
    # its importance ratios are against θ_0's log-probs: the first inner step is already off-policy
    assert m1["approx_kl"] > 0 and m0["approx_kl"] == 0

    theta_1 = foreground(sync, 2)  # sync holds θ_1, the weights lagged had before its update 2
    lagged.run_iteration(2)
    assert torch.equal(latents(lagged._last_result), theta_1)
    assert lagged._background.pending is None  # the last iteration launches nothing
    for t in (lagged, sync, base):
        t.close()


def test_behaviour_copy_shares_frozen_weights(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path / "lora", "tempflow", ASYNC, "train.lora.enabled=true", "train.lora.rank=4")
    behaviour = trainer._behaviour_policy()
    live = dict(trainer.model.module.named_parameters())
    copied = dict(behaviour.adapter.module.named_parameters())
    trainable = {n for n, _ in trainer.named_params}
    assert trainable and all("lora" in n for n in trainable)
    for n, p in copied.items():
        assert (p.data_ptr() == live[n].data_ptr()) == (n not in trainable), n
        assert not p.requires_grad
    shared, own = behaviour.shared_bytes()
    assert own == sum(p.numel() * 4 for _, p in trainer.named_params) and shared > 10 * own
    trainer.close()


def test_resume_with_a_rollout_in_flight_continues_exactly(tmp_path, make_trainer):
    args = ("tempflow", ASYNC, "train.iterations=4", "checkpoint.every=1", "train.ema_decay=0.9")
    full = make_trainer(tmp_path / "a", *args)
    losses = [full.run_iteration(i)["loss"] for i in range(4)]
    part = make_trainer(tmp_path / "b", *args)
    for i in range(2):
        part.run_iteration(i)
        part.iteration = i + 1
        part.save()
    assert part._background.pending[0] == 2  # iteration 3's rollout was running when the run stopped
    part.close()
    resumed = make_trainer(tmp_path / "b", *args, resume=True)
    m = resumed.run_iteration(2)
    assert m["rollout_policy_lag"] == 1 and m["loss"] == losses[2]
    assert resumed.run_iteration(3)["loss"] == losses[3]
    for (n, p), (_, q) in zip(full.named_params, resumed.named_params):
        assert torch.equal(p, q), n
    full.close()
    resumed.close()


def test_train_loop_with_evals_during_background_rollouts(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path / "run", "flow_grpo", ASYNC, "train.iterations=3", "eval.every=1")
    summary = trainer.train()
    assert summary["iterations"] == 3 and trainer._background is None
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lags = [r["rollout_policy_lag"] for r in lines if "rollout_policy_lag" in r]
    assert lags == [0.0, 1.0, 1.0]
    assert sum("probe_reward" in r for r in lines) == 4  # before, after iterations 1 and 2, at the end


@pytest.mark.parametrize("extra, says", [
    (["method=diffusion_nft"], "diffusion_nft already samples with an old policy"),
    (["distributed.backend=deepspeed"], "ZeRO shards them"),
    (["model.compile_blocks=true"], "model.compile_blocks"),
])
def test_refused_combinations_name_the_field(tmp_path, extra, says):
    with pytest.raises(ValueError, match="train.async_rollout") as err:
        load_config(Config, None, [f"output_dir={tmp_path}", ASYNC, *extra])
    assert says in str(err.value)


def test_serialized_reward_one_call_at_a_time_with_per_thread_components():
    inside, overlap = [0], [False]

    class Composite:
        def __init__(self):
            self.last_components = {}

        def __call__(self, images, prompts):
            inside[0] += 1
            overlap[0] |= inside[0] > 1
            threading.Event().wait(0.01)
            self.last_components = {"who": images.clone()}
            inside[0] -= 1
            return images

    reward = SerializedReward(Composite())
    seen = {}

    def call(k):
        reward(torch.full((1,), float(k)), ["p"])
        seen[k] = float(reward.last_components["who"])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap[0] and seen == {k: float(k) for k in range(6)}


def test_memory_model_counts_the_copy_and_the_rollout_beside_the_update():
    from tempflow_fast.models.memory import estimate_for

    common = dict(lora_rank=32, lora_targets=("to_q", "to_k", "to_v", "to_out.0"), states_per_forward=2,
                  gpu_memory=80 * 2**30)
    sync = estimate_for("flux", "black-forest-labs/FLUX.1-dev", **common)
    lagged = estimate_for("flux", "black-forest-labs/FLUX.1-dev", async_rollout=True, **common)
    assert lagged.behaviour == 4 * lagged.trainable > 0 and sync.behaviour == 0
    rollout = lagged.max_rows_per_call * lagged.rollout_per_row
    assert lagged.phases()["update forward+backward"] == (sync.phases()["update forward+backward"]
                                                          + lagged.behaviour + max(rollout, lagged.decode_batch
                                                                                   * lagged.decode_per_image))
