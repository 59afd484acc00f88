"""What the distributed tests and their worker processes share: the small tiny-FLUX settings, the rewards,
the trainer they build, the torchrun launch and the one-process reference run (a plain module: the workers
import it by path, outside pytest).

Scenarios (`make_trainer`):
- "brightness": the shapes train prompts and a continuous reward, so every group has spread and every
  rank trains the same number of micro-batches.
- "gated": three prompts naming red and one not, the brightness reward only for the red ones: the other
  prompt's groups have no spread and are skipped, so with 4 prompts on 2 ranks one rank trains half as many
  micro-batches as the other (ZeRO must pad).
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
WORLD = 2

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)
GATED_PROMPTS = ["a blue square above a red square", "a blue square and two red squares", "a blue square",
                 "a green square above a red square"]


class BrightnessReward:
    """A continuous reward, so every group has spread and every sample is trained."""

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)).float()


class RedOnlyBrightnessReward:
    """Brightness for prompts naming red, 0 for the others (their groups carry no signal)."""

    def __call__(self, images, prompts):
        gate = images.new_tensor([1.0 if "red" in p else 0.0 for p in prompts])
        return (images.mean(dim=(1, 2, 3)) * gate).float()


def no_eval(model):
    return {"overall": {"accuracy": 0.0}}


def small_overrides(method, out, *extra):
    return [
        f"method={method}", f"output_dir={out}", "train.iterations=2", "train.prompts_per_iteration=2",
        "log.progress=false", "log.tensorboard=false", "sampling.num_steps=4",
        "tempflow.num_seeds=2", "tempflow.branches=3", "flow_grpo.group_size=4", "stepwise.group_size=3",
        "train.learning_rate=1e-3", "train.clip_range=0.2", *extra,
    ]


def make_trainer(run_dir, method, scenario, extra, ctx, resume=False):
    """A Trainer on the small random tiny FLUX for `scenario` (module docstring) in process context `ctx`."""
    from tempflow_fast.config import load_config
    from tempflow_fast.tasks.shapes.task import new_model
    from tempflow_fast.training import trainer as trainer_mod
    from tempflow_fast.training.train_config import Config

    if scenario == "brightness":
        reward, prompts, extra = BrightnessReward(), None, list(extra)
    elif scenario == "gated":
        reward, prompts = RedOnlyBrightnessReward(), GATED_PROMPTS
        extra = [f"train.prompts_per_iteration={len(GATED_PROMPTS)}", *extra]
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    cfg = load_config(Config, None, small_overrides(method, run_dir, *extra))
    return trainer_mod.Trainer(cfg, model=new_model(seed=0, transformer_config=SMALL), reward=reward,
                               train_prompts=prompts, eval_fn=no_eval, resume=resume, dist=ctx)


def run_workers(tmp_path, name, method, scenario, extra, timeout=300):
    """Launch ddp_worker.py on WORLD gloo processes with torchrun; returns rank 0's record."""
    import torch

    out_file = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(HERE / "ddp_worker.py"), str(out_file), str(tmp_path / name), method, scenario, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out_file, weights_only=False)


def one_process_reference(run_dir, method, scenario, extra, monkeypatch, iterations=2):
    """(params, metrics) per iteration, and the trainer, of ONE process training on the same global batch as the WORLD ranks.

    It rolls out each rank's share of the prompts with that rank's seed (the ranks draw distinct noises, so
    one generator over the whole batch would sample other images) and trains on the concatenation: same
    rollouts, one update over the global batch, on the explicit path (no DeepSpeed)."""
    import torch

    from tempflow_fast.sampling.engine import concat_results
    from tempflow_fast.training import trainer as trainer_mod
    from tempflow_fast.training.distributed import DistContext

    real_rollout = trainer_mod.rollout
    seed_to_iteration = {trainer_mod._seed_for(0, 2, it): it for it in range(iterations)}

    def per_rank_rollouts(model, prompts, plan, *, seed, runner, **options):
        it = seed_to_iteration[seed]
        shards = [DistContext(r, WORLD).shard(prompts) for r in range(WORLD)]
        return concat_results([real_rollout(model, shard, plan, seed=trainer_mod._seed_for(0, 2, it, r),
                                            runner=runner, **options) for r, shard in enumerate(shards)])

    monkeypatch.setattr(trainer_mod, "rollout", per_rank_rollouts)
    tr = make_trainer(run_dir, method, scenario, extra, DistContext())
    params, metrics = [], []
    for it in range(iterations):
        metrics.append(tr.run_iteration(it))
        params.append(torch.cat([p.detach().reshape(-1) for _, p in tr.named_params]))
    monkeypatch.setattr(trainer_mod, "rollout", real_rollout)
    return params, metrics, tr
