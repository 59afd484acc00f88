import json

import pytest
import torch

from tempflow_fast.training import trainer as trainer_mod
from tempflow_fast.training.cli import main as train_main


@pytest.mark.parametrize("method, extra", [
    ("flow_grpo", ()),
    ("tempflow", ("train.beta=0.01",)),
    ("g2rpo", ()),
    ("stepwise", ()),
])
def test_each_method_trains_two_iterations(tmp_path, make_trainer, method, extra):
    tr = make_trainer(tmp_path / method, method, *extra)
    before = {n: p.detach().clone() for n, p in tr.named_params}
    summary = tr.train()
    assert summary["iterations"] == 2 and summary["counters"]["optimizer_steps"] == 2
    assert summary["task"] == "shapes" and summary["split_version"] == 2
    changed = [n for n, p in tr.named_params if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before)
    rows = [json.loads(l) for l in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    it_rows = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in it_rows] == [1, 2]
    assert all(r["trained_samples"] > 0 and r["zero_std_ratio"] == 0.0 for r in it_rows)
    assert (tmp_path / method / "final").is_dir()


def test_one_policy_pass_per_shared_state(tmp_path, make_trainer):
    # TempFlow 4 seeds x 6 branches, T=10, every step 0..8 trained: 36 passes per prompt, not 216.
    tr = make_trainer(tmp_path, "tempflow", "sampling.num_steps=10", "tempflow.num_seeds=4",
              "tempflow.branches=6", "train.prompts_per_iteration=1", "train.iterations=1")
    m = tr.run_iteration(0)
    assert m["policy_passes"] == 36
    assert m["trained_samples"] == 216
    assert m["nfe/trunk"] == 40 and m["nfe/completion"] == 1080


SCHEDULE = ("train.lr_schedule=cosine", "train.lr_warmup_iterations=1")  # the rate is part of what resumes


def test_resume_continues_exactly(tmp_path, make_trainer):
    # uninterrupted: 3 iterations, checkpoint every iteration
    full = make_trainer(tmp_path / "a", "tempflow", "train.iterations=3", "checkpoint.every=1",
                "train.ema_decay=0.9", *SCHEDULE)
    losses_full = [full.run_iteration(i)["loss"] for i in range(3)]
    # interrupted after 2 iterations, then resumed from its checkpoint in a fresh trainer
    part = make_trainer(tmp_path / "b", "tempflow", "train.iterations=3", "checkpoint.every=1",
                "train.ema_decay=0.9", *SCHEDULE)
    for i in range(2):
        part.run_iteration(i)
        part.iteration = i + 1
        part.save()
    resumed = make_trainer(tmp_path / "b", "tempflow", "train.iterations=3", "checkpoint.every=1",
                   "train.ema_decay=0.9", *SCHEDULE, resume=True)
    assert resumed.iteration == 2
    assert resumed.run_iteration(2)["loss"] == losses_full[2]
    for (n, p), (_, q) in zip(full.named_params, resumed.named_params):
        assert torch.equal(p, q), n


def test_nan_loss_is_skipped_and_run_continues(tmp_path, make_trainer, monkeypatch):
    real = trainer_mod.policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, out = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), out

    monkeypatch.setattr(trainer_mod, "policy_loss", poisoned)
    tr = make_trainer(tmp_path, "flow_grpo", "train.states_per_forward=1000")
    summary = tr.train()
    assert summary["counters"]["skipped_nonfinite"] == 1
    assert summary["counters"]["optimizer_steps"] == 1  # the second iteration still updated
    tr2 = make_trainer(tmp_path / "abort", "flow_grpo", "train.max_nonfinite_skips=0")
    monkeypatch.setattr(trainer_mod, "policy_loss", lambda *a, **k: (torch.tensor(float("nan")), None))
    with pytest.raises(trainer_mod.NonFiniteAbort, match="max_nonfinite_skips"):
        tr2.train()


@pytest.mark.parametrize("override, field", [
    ("train.learning_rate=-1", "train.learning_rate"),
    ("method=ppo", "method"),
    ("tempflow.branches=0", "tempflow.branches"),
    ("g2rpo.granularities=[0]", "g2rpo.granularities"),
    ("sampling.num_steps=1", "sampling.num_steps"),
    ("train.nonsense=3", "nonsense"),
    ("train.lr_schedule=step", "train.lr_schedule"),
    ("train.lr_warmup_iterations=100", "train.lr_warmup_iterations"),
    ("train.lr_min_ratio=2", "train.lr_min_ratio"),
])
def test_bad_config_names_the_field(override, field, capsys):
    assert train_main(["--set", override, "--print-config"]) == 2
    assert field in capsys.readouterr().err


def test_set_overrides_any_field(capsys):
    assert train_main(["--config", "configs/shapes_tempflow.yaml", "--set", "train.iterations=2",
                       "--set", "output_dir=runs/try", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "iterations: 2" in out and "output_dir: runs/try" in out


def test_lora_trains_only_adapters_and_exports_merged(tmp_path, make_trainer):
    from tempflow_fast.models.tiny_flux import TinyFluxAdapter

    tr = make_trainer(tmp_path, "tempflow", "train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=8",
                      "train.beta=0.01")
    names = [n for n, _ in tr.named_params]
    assert names and all("lora" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in tr.model.module.named_parameters() if "lora" not in n}
    before = {n: p.detach().clone() for n, p in tr.named_params}
    tr.train()
    assert all(not torch.equal(before[n], p) for n, p in tr.named_params)
    assert all(torch.equal(frozen[n], p) for n, p in tr.model.module.named_parameters() if "lora" not in n)
    # the exported folder is a plain model (LoRA merged) that reproduces the adapted velocity
    merged = TinyFluxAdapter.from_pretrained(tmp_path / "final")
    x = torch.randn(2, *merged.latent_shape)
    sigma = torch.tensor([0.9, 0.3])
    cond = merged.encode_prompts(["a red square", "two blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(merged.velocity(x, sigma, cond), tr.model.velocity(x, sigma, cond),
                                   atol=1e-5, rtol=1e-4)


def test_balanced_categories_draw_each_category_equally(tmp_path, make_trainer):
    from collections import Counter

    from tempflow_fast.tasks.shapes.grammar import CATEGORIES, parse

    tr = make_trainer(tmp_path, "flow_grpo", "data.balance_categories=true", "train.prompts_per_iteration=6")
    drawn = [p for it in range(5) for p in tr.prompts_for(it)]
    assert Counter(parse(p).category for p in drawn) == {c: 5 for c in CATEGORIES}
    assert tr.prompts_for(3) == tr.prompts_for(3)  # deterministic (resume relies on it)
    with pytest.raises(ValueError, match="data.balance_categories"):
        tr.cfg.data.train_prompts = "prompts.txt"
        tr.prompts_for(0)
