"""One rank of the 2-process test (launched by torchrun from test_ddp.py, not collected by pytest).

argv: OUT_FILE RUN_DIR METHOD [--set overrides...]. Runs 2 iterations on the small random tiny FLUX,
checks after each that every rank holds bit-identical trainable parameters, then saves a checkpoint
(rank 0 writes), resumes it in a fresh trainer on every rank and checks the loaded weights, and runs
one LoRA step. Rank 0 writes the per-iteration parameters and metrics to OUT_FILE for the test to
compare with one process.
"""

import sys

import torch
import torch.distributed as dist

from tempflow_fast.config import load_config
from tempflow_fast.models.tiny_flux import TinyFluxAdapter
from tempflow_fast.training.distributed import from_environment
from tempflow_fast.training.train_config import Config
from tempflow_fast.training.trainer import Trainer

from ddp_common import SMALL, BrightnessReward, no_eval, small_overrides


def flat(trainer):
    return torch.cat([p.detach().reshape(-1) for _, p in trainer.named_params])


def make(run_dir, method, extra, ctx, resume=False):
    cfg = load_config(Config, None, small_overrides(method, run_dir, *extra))
    return Trainer(cfg, model=TinyFluxAdapter.create(seed=0, transformer_config=SMALL), reward=BrightnessReward(),
                   eval_fn=no_eval, resume=resume, dist=ctx)


def main():
    torch.set_num_threads(1)
    out_file, run_dir, method, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    ctx = from_environment("gloo")
    assert ctx.world_size == 2
    tr = make(run_dir, method, extra, ctx)
    record = {"params": [], "metrics": [], "max_rank_diff": []}
    for it in range(2):
        m = tr.run_iteration(it)
        p = flat(tr)
        others = [torch.empty_like(p) for _ in range(ctx.world_size)]
        dist.all_gather(others, p)
        record["max_rank_diff"].append(max(float((o - p).abs().max()) for o in others))
        record["params"].append(p)
        record["metrics"].append(m)
    tr.iteration = 2
    tr.save()
    resumed = make(run_dir, method, extra, ctx, resume=True)
    record["resumed_equal"] = bool(torch.equal(flat(resumed), flat(tr))) and resumed.iteration == 2
    ok = torch.tensor([1.0 if record["resumed_equal"] else 0.0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    record["resumed_equal_all_ranks"] = bool(ok.item() == 1.0)
    # LoRA (adapters only, KL to the adapter-free reference): one step, ranks still bit-identical
    lora = make(run_dir + "-lora", method, [*extra, "train.lora.enabled=true", "train.lora.rank=4",
                                            "train.lora.alpha=8", "train.beta=0.01"], ctx)
    before = flat(lora)
    lora.run_iteration(0)
    p = flat(lora)
    others = [torch.empty_like(p) for _ in range(ctx.world_size)]
    dist.all_gather(others, p)
    record["lora_names"] = [n for n, _ in lora.named_params]
    record["lora_rank_diff"] = max(float((o - p).abs().max()) for o in others)
    record["lora_moved"] = float((p - before).abs().max())
    if ctx.is_main:
        torch.save(record, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
