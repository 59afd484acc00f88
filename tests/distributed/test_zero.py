"""DeepSpeed ZeRO-2 / ZeRO-3 over gloo: 2 processes (torchrun) against 1 process on the explicit path with
the same global batch (ddp_common.one_process_reference).

The "gated" scenario gives the ranks unequal micro-batch counts, so the rank with fewer must run padding
passes (ZeRO reduces gradients during every backward). ZeRO-3 runs with a persistence threshold of 0, so
every parameter, however small, is really partitioned.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tempflow_fast.training.distributed import DistContext
from tempflow_fast.training.train_config import Config

HERE = Path(__file__).parent
CONFIGS = HERE.parents[1] / "configs"
_spec = importlib.util.spec_from_file_location("ddp_common", HERE / "ddp_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def zero_overrides(tmp_path, stage):
    config = json.loads((CONFIGS / f"deepspeed_zero{stage}.json").read_text())
    if stage == 3:  # partition every parameter of the tiny model (the shipped default keeps small ones whole)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return ("distributed.backend=deepspeed", f"distributed.deepspeed_config={path}")


# global std (advantages need every rank's rewards), several micro-batches per rank, the KL to the frozen
# reference and the EMA (both need whole weights under ZeRO-3), a learning-rate schedule (set on the engine's
# optimizer: 1e-3, then 5e-4)
TRAIN = ("train.global_std=true", "train.states_per_forward=2", "train.beta=0.01", "train.ema_decay=0.5",
         "train.lr_schedule=linear", "train.lr_min_ratio=0.5")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_match_one_process(tmp_path, monkeypatch, stage):
    pytest.importorskip("deepspeed")
    method, scenario = "tempflow", "gated"
    extra = (*TRAIN, *zero_overrides(tmp_path, stage))
    record = common.run_workers(tmp_path, f"zero{stage}", method, scenario, extra)

    assert record["max_rank_diff"] == [0.0, 0.0]  # ranks bit-identical after every step
    assert all(p > 0 for p in record["padding_passes"])  # the ranks' micro-batch counts differed
    assert record["resumed_equal_all_ranks"] and record["continued_equal_all_ranks"]
    assert record["continued_loss"][0] == record["continued_loss"][1] and record["continued_moved"] > 0.0
    assert record["nan_skipped_all_ranks"] and record["nan_rank_diff"] == 0.0

    params, metrics, single = common.one_process_reference(tmp_path / "single", method, scenario, TRAIN, monkeypatch)
    ema = torch.cat([single.ema.shadow[n].reshape(-1) for n, _ in single.named_params])
    torch.testing.assert_close(record["ema"], ema, atol=2e-6, rtol=0)
    assert torch.equal(record["export"], record["ema"])  # the export holds the whole EMA weights
    assert record["swapped_back_all_ranks"]
    for it in range(2):
        torch.testing.assert_close(record["params"][it], params[it], atol=2e-6, rtol=0)
        assert record["policy_passes"][it] == metrics[it]["policy_passes"]  # padding is counted apart
        for key in ("reward_mean", "zero_std_ratio", "loss", "clip_frac", "kl", "grad_norm"):
            assert record["metrics"][it][key] == pytest.approx(metrics[it][key], rel=1e-5, abs=1e-6), key
    # the check above is not vacuous: training moved the weights far more than the tolerance
    assert float((params[1] - params[0]).abs().max()) > 1e-4

    # resuming on another world size is refused (before any engine is built)
    with pytest.raises(ValueError, match="same world size"):
        common.make_trainer(tmp_path / f"zero{stage}", method, scenario, extra, DistContext(), resume=True)


def _config(*overrides):
    from tempflow_fast.config import load_config

    return load_config(Config, None, list(overrides))


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs(stage):
    from tempflow_fast.training.zero import deepspeed_config

    ds = deepspeed_config(_config("distributed.backend=deepspeed",
                                  f"distributed.deepspeed_config={CONFIGS / f'deepspeed_zero{stage}.json'}",
                                  "train.learning_rate=3e-5", "train.grad_clip=0.5"))
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["optimizer"]["params"]["lr"] == 3e-5 and ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("overrides, field", [
    (("distributed.backend=deepspeed", "distributed.zero_stage=1"), "distributed.zero_stage"),
    (("distributed.zero_stage=3",), "distributed.backend"),
])
def test_bad_distributed_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        _config(*overrides)


def test_deepspeed_config_conflicts_name_the_field(tmp_path):
    from tempflow_fast.training.zero import check_supported, deepspeed_config

    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="distributed.deepspeed_config.*train.learning_rate"):
        deepspeed_config(_config("distributed.backend=deepspeed", f"distributed.deepspeed_config={owned}"))
    with pytest.raises(ValueError, match="distributed.zero_stage"):
        deepspeed_config(_config("distributed.backend=deepspeed", "distributed.zero_stage=2",
                                 f"distributed.deepspeed_config={CONFIGS / 'deepspeed_zero3.json'}"))
    with pytest.raises(ValueError, match="distributed.deepspeed_config"):
        deepspeed_config(_config("distributed.backend=deepspeed", f"distributed.deepspeed_config={tmp_path / 'no.json'}"))
    with pytest.raises(ValueError, match="distributed.backend.*LoRA"):
        check_supported(_config("distributed.backend=deepspeed", "train.lora.enabled=true"), 2)
    with pytest.raises(ValueError, match="sampling.runner"):
        check_supported(_config("distributed.backend=deepspeed", "sampling.runner=compile"), 3)
    with pytest.raises(ValueError, match="model.compile_blocks"):
        check_supported(_config("distributed.backend=deepspeed", "model.compile_blocks=true"), 3)
    fp16 = tmp_path / "fp16.json"
    fp16.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match="distributed.deepspeed_config.*fp16"):
        deepspeed_config(_config("distributed.backend=deepspeed", f"distributed.deepspeed_config={fp16}"))


def test_deepspeed_without_launcher_names_the_field(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="distributed.backend.*launcher"):
        common.make_trainer(tmp_path, "tempflow", "brightness", ["distributed.backend=deepspeed"], DistContext())


def test_interrupted_staged_write_leaves_previous_checkpoint(tmp_path):
    from tempflow_fast.training import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, model_state={"w": torch.ones(2)}, state={"iteration": 1}, config_yaml="")
    # the ranks wrote their shards, then the run died before rank 0 completed the checkpoint
    staging = ckpt.staging_dir(root, 2)
    ckpt.clear_staging(staging)
    (staging / "deepspeed").mkdir()
    (staging / "deepspeed" / "shard.pt").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(root) == root / "iter-000001"
    assert torch.equal(ckpt.load_checkpoint(root / "iter-000001")["model"]["w"], torch.ones(2))
    # a completed staged write keeps the shards and becomes the latest checkpoint
    path = ckpt.save_checkpoint(root, 2, model_state={"w": torch.zeros(2)}, state={"iteration": 2}, config_yaml="",
                                staged=staging)
    assert ckpt.latest_checkpoint(root) == path and (path / "deepspeed" / "shard.pt").is_file()
    assert not staging.exists()
