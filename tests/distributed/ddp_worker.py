"""One rank of the 2-process tests (launched by torchrun through ddp_common.run_workers, not collected by
pytest).

argv: OUT_FILE RUN_DIR METHOD SCENARIO [--set overrides...] (distributed.backend=deepspeed in the overrides
selects ZeRO). Runs 2 iterations on the small random tiny FLUX, checks after each that every rank holds
bit-identical trainable parameters, exports the EMA weights (when train.ema_decay > 0), then saves a checkpoint (rank 0 completes it), resumes it in a fresh
trainer on every rank, checks the loaded weights, runs iteration 3 in both trainers (resume continues
exactly), then an iteration whose loss is NaN on rank 1 only (every rank skips the step). On the DDP
path it also runs one LoRA step. Rank 0 writes what it saw to OUT_FILE.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tempflow_fast.models.tiny_flux import WEIGHTS_NAME

from tempflow_fast.training import trainer as trainer_mod
from tempflow_fast.training.distributed import from_environment

from ddp_common import make_trainer


def flat(trainer):
    with trainer._full_parameters():  # ZeRO-3: whole tensors
        return torch.cat([p.detach().reshape(-1) for _, p in trainer.named_params]).clone()


def max_rank_diff(p):
    others = [torch.empty_like(p) for _ in range(dist.get_world_size())]
    dist.all_gather(others, p)
    return max(float((o - p).abs().max()) for o in others)


def on_all_ranks(flag):
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def all_sum(x):
    t = torch.tensor([float(x)])
    dist.all_reduce(t)
    return float(t.item())


def main():
    torch.set_num_threads(1)
    out_file, run_dir, method, scenario, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    ctx = from_environment("gloo")
    assert ctx.world_size == 2
    tr = make_trainer(run_dir, method, scenario, extra, ctx)
    record = {"params": [], "metrics": [], "max_rank_diff": [], "policy_passes": [], "padding_passes": []}
    for it in range(2):
        m = tr.run_iteration(it)
        p = flat(tr)
        record["max_rank_diff"].append(max_rank_diff(p))
        record["params"].append(p)
        record["metrics"].append(m)
        record["policy_passes"].append(all_sum(m["policy_passes"]))
        record["padding_passes"].append(all_sum(m["padding_passes"]))
    if tr.ema is not None:
        record["ema"] = torch.cat([tr.ema.shadow[n].reshape(-1) for n, _ in tr.named_params])
        # the export of the EMA weights (as train() writes final/): every parameter, whole
        tr._swap_ema()
        tr.export(Path(run_dir) / "export")
        tr._swap_ema()
        record["swapped_back_all_ranks"] = on_all_ranks(torch.equal(flat(tr), record["params"][-1]))
        if ctx.is_main:
            saved = load_file(str(Path(run_dir) / "export" / WEIGHTS_NAME))
            record["export"] = torch.cat([saved[n].reshape(-1) for n, _ in tr.named_params])
    tr.iteration = 2
    tr.save()
    resumed = make_trainer(run_dir, method, scenario, extra, ctx, resume=True)
    record["resumed_equal_all_ranks"] = on_all_ranks(torch.equal(flat(resumed), flat(tr)) and resumed.iteration == 2)
    # resume continues exactly: the next iteration gives the same loss and weights in both trainers
    m_cont, m_res = tr.run_iteration(2), resumed.run_iteration(2)
    record["continued_loss"] = (m_cont["loss"], m_res["loss"])
    record["continued_equal_all_ranks"] = on_all_ranks(torch.equal(flat(resumed), flat(tr)))
    record["continued_moved"] = float((flat(tr) - record["params"][1]).abs().max())

    # a NaN loss on rank 1 only: every rank skips the step and the weights stay equal
    real_loss, calls = trainer_mod.policy_loss, {"n": 0}

    def nan_on_rank_1(*args, **kwargs):
        loss, out = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if ctx.rank == 1 and calls["n"] == 1 else loss), out

    trainer_mod.policy_loss = nan_on_rank_1
    before = flat(tr)
    m = tr.run_iteration(3)
    trainer_mod.policy_loss = real_loss
    after = flat(tr)
    record["nan_skipped_all_ranks"] = on_all_ranks(m["skipped_nonfinite"] == 1 and torch.equal(before, after))
    record["nan_rank_diff"] = max_rank_diff(after)

    if "distributed.backend=deepspeed" not in extra:
        # LoRA (adapters only, KL to the adapter-free reference): one step, ranks still bit-identical
        lora = make_trainer(run_dir + "-lora", method, scenario, [*extra, "train.lora.enabled=true",
                                                                  "train.lora.rank=4", "train.lora.alpha=8",
                                                                  "train.beta=0.01"], ctx)
        before = flat(lora)
        lora.run_iteration(0)
        p = flat(lora)
        record["lora_names"] = [n for n, _ in lora.named_params]
        record["lora_rank_diff"] = max_rank_diff(p)
        record["lora_moved"] = float((p - before).abs().max())
    if ctx.is_main:
        torch.save(record, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
