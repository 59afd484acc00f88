"""Data-parallel training over gloo: 2 processes (torchrun) against 1 process with the same global batch.

The one-process reference rolls out each rank's half of the prompts with that rank's seed (the two
ranks draw distinct noises, so one generator over the whole batch would sample other images) and
trains on the concatenation: same rollouts, one update over the global batch. The 2-process run must
keep bit-identical weights on both ranks and land on the reference's weights within fp32 noise.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tempflow_fast.sampling.engine import concat_results
from tempflow_fast.training import trainer as trainer_mod
from tempflow_fast.training.distributed import DistContext

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ddp_common", HERE / "ddp_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

WORLD = 2


def one_process_reference(run_dir, method, extra, monkeypatch):
    from tempflow_fast.config import load_config
    from tempflow_fast.models.tiny_flux import TinyFluxAdapter
    from tempflow_fast.training.train_config import Config

    real_rollout = trainer_mod.rollout
    seed_to_iteration = {trainer_mod._seed_for(0, 2, it): it for it in range(2)}

    def per_rank_rollouts(model, prompts, plan, *, seed, runner):
        it = seed_to_iteration[seed]
        shards = [DistContext(r, WORLD).shard(prompts) for r in range(WORLD)]
        return concat_results([real_rollout(model, shard, plan, seed=trainer_mod._seed_for(0, 2, it, r),
                                             runner=runner) for r, shard in enumerate(shards)])

    monkeypatch.setattr(trainer_mod, "rollout", per_rank_rollouts)
    cfg = load_config(Config, None, common.small_overrides(method, run_dir, *extra))
    tr = trainer_mod.Trainer(cfg, model=TinyFluxAdapter.create(seed=0, transformer_config=common.SMALL),
                             reward=common.BrightnessReward(), eval_fn=common.no_eval, dist=DistContext())
    params, metrics = [], []
    for it in range(2):
        metrics.append(tr.run_iteration(it))
        params.append(torch.cat([p.detach().reshape(-1) for _, p in tr.named_params]))
    monkeypatch.setattr(trainer_mod, "rollout", real_rollout)
    return params, metrics


def test_two_processes_match_one_process(tmp_path, monkeypatch):
    # TempFlow with the global std: advantages need every rank's rewards
    method, extra = "tempflow", ("train.global_std=true",)
    out_file = tmp_path / "ranks.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(HERE / "ddp_worker.py"), str(out_file), str(tmp_path / "ddp"), method, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = torch.load(out_file, weights_only=False)

    assert record["max_rank_diff"] == [0.0, 0.0]  # ranks bit-identical after every step
    assert record["resumed_equal_all_ranks"]
    assert record["lora_names"] and all("lora" in n for n in record["lora_names"])
    assert record["lora_rank_diff"] == 0.0 and record["lora_moved"] > 0.0

    params, metrics = one_process_reference(tmp_path / "single", method, extra, monkeypatch)
    for it in range(2):
        torch.testing.assert_close(record["params"][it], params[it], atol=2e-6, rtol=0)
        for key in ("reward_mean", "reward_group_std", "zero_std_ratio", "loss", "clip_frac"):
            assert record["metrics"][it][key] == pytest.approx(metrics[it][key], rel=1e-5, abs=1e-6), key
    # the check above is not vacuous: training moved the weights far more than the tolerance
    assert float((params[1] - params[0]).abs().max()) > 1e-4

    # resuming on another world size is refused
    from tempflow_fast.config import load_config
    from tempflow_fast.models.tiny_flux import TinyFluxAdapter
    from tempflow_fast.training.train_config import Config

    cfg = load_config(Config, None, common.small_overrides(method, tmp_path / "ddp", *extra))
    with pytest.raises(ValueError, match="same world size"):
        trainer_mod.Trainer(cfg, model=TinyFluxAdapter.create(seed=0, transformer_config=common.SMALL),
                            reward=common.BrightnessReward(), eval_fn=common.no_eval, resume=True, dist=DistContext())


def test_shard_keeps_whole_prompts_and_checks_divisibility():
    prompts = ["a", "b", "c", "d"]
    assert [DistContext(r, 2).shard(prompts) for r in range(2)] == [["a", "b"], ["c", "d"]]
    assert DistContext().shard(prompts) == prompts
    with pytest.raises(ValueError, match="prompts_per_iteration"):
        DistContext(0, 3).shard(prompts)


@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "0", "TEMPFLOW_FAST_DIST_BACKEND": "mpi"}, "TEMPFLOW_FAST_DIST_BACKEND"),
])
def test_environment_errors_name_the_variable(monkeypatch, env, match):
    from tempflow_fast.training.distributed import from_environment

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        from_environment()


def test_one_process_without_torchrun_environment(monkeypatch):
    from tempflow_fast.training.distributed import from_environment

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = from_environment()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.active) == (0, 1, True, False)
    x = torch.arange(3.0)
    assert ctx.all_gather_rows(x)[0] is x and ctx.all_sum(5) == 5 and ctx.all_true(False) is False
