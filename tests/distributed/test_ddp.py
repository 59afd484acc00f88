"""Data-parallel training over gloo: 2 processes (torchrun) against 1 process with the same global batch
(ddp_common.one_process_reference). The 2-process run must keep bit-identical weights on both ranks, land
on the reference's weights within fp32 noise, resume exactly and skip a rank's non-finite step on every rank.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from tempflow_fast.training.distributed import DistContext

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ddp_common", HERE / "ddp_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_two_processes_match_one_process(tmp_path, monkeypatch):
    # TempFlow with the global std: advantages need every rank's rewards
    method, scenario, extra = "tempflow", "brightness", ("train.global_std=true",)
    record = common.run_workers(tmp_path, "ddp", method, scenario, extra)

    assert record["max_rank_diff"] == [0.0, 0.0]  # ranks bit-identical after every step
    assert record["resumed_equal_all_ranks"] and record["continued_equal_all_ranks"]
    assert record["continued_loss"][0] == record["continued_loss"][1] and record["continued_moved"] > 0.0
    assert record["nan_skipped_all_ranks"] and record["nan_rank_diff"] == 0.0
    assert record["padding_passes"] == [0.0, 0.0]
    assert record["lora_names"] and all("lora" in n for n in record["lora_names"])
    assert record["lora_rank_diff"] == 0.0 and record["lora_moved"] > 0.0

    params, metrics, _ = common.one_process_reference(tmp_path / "single", method, scenario, extra, monkeypatch)
    for it in range(2):
        torch.testing.assert_close(record["params"][it], params[it], atol=2e-6, rtol=0)
        for key in ("reward_mean", "reward_group_std", "zero_std_ratio", "loss", "clip_frac"):
            assert record["metrics"][it][key] == pytest.approx(metrics[it][key], rel=1e-5, abs=1e-6), key
    # the check above is not vacuous: training moved the weights far more than the tolerance
    assert float((params[1] - params[0]).abs().max()) > 1e-4

    # resuming on another world size is refused
    with pytest.raises(ValueError, match="same world size"):
        common.make_trainer(tmp_path / "ddp", method, scenario, extra, DistContext(), resume=True)


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
