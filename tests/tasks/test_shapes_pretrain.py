"""`pretrain-shapes` is reproducible from its seed and trains only on the train split."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tempflow_fast import cli
from tempflow_fast.models.tiny_flux import WEIGHTS_NAME, TinyFluxAdapter
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.tasks.shapes import grammar
from tempflow_fast.tasks.shapes.pretrain import sample_batch_prompts


def _run(out, seed):
    argv = ["pretrain-shapes", "--out", str(out), "--steps", "3", "--batch-size", "8", "--save-every", "3",
            "--log-every", "1", "--seed", str(seed), "--warmup", "2", "--threads", "1"]
    assert cli.main(argv) == 0
    return load_file(str(out / "step_00003" / WEIGHTS_NAME))


def test_same_seed_same_weights(tmp_path):
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 0)
    c = _run(tmp_path / "c", 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k in c)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    TinyFluxAdapter.from_pretrained(tmp_path / "a" / "step_00003")  # a checkpoint is a loadable model


def test_batches_come_from_the_train_split_and_all_categories():
    import numpy as np

    prompts = sample_batch_prompts(np.random.default_rng(0), 2000)
    assert set(prompts) <= set(grammar.TRAIN_PROMPTS)
    assert {grammar.parse(p).category for p in prompts} == set(grammar.CATEGORIES)


def test_category_weights_shift_the_batch_and_default_to_the_old_draws():
    import numpy as np

    from tempflow_fast.tasks.shapes.pretrain import parse_category_weights

    uniform = sample_batch_prompts(np.random.default_rng(0), 600)
    assert sample_batch_prompts(np.random.default_rng(0), 600, {"position": 1.0}) == uniform  # same stream
    weights = parse_category_weights(["position=5", "colors=0"])
    assert weights == {"position": 5.0, "colors": 0.0}
    prompts = sample_batch_prompts(np.random.default_rng(0), 6000, weights)
    share = {c: sum(grammar.parse(p).category == c for p in prompts) / 6000 for c in grammar.CATEGORIES}
    assert share["colors"] == 0 and abs(share["position"] - 5 / 9) < 0.03 and abs(share["counting"] - 1 / 9) < 0.02
    with pytest.raises(ValueError, match="every category has weight 0"):
        parse_category_weights([f"{c}=0" for c in grammar.CATEGORIES])


def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "a"), "--steps", "0"]) == 2
    assert capsys.readouterr().err == "tempflow-fast pretrain-shapes: --steps must be positive, got 0\n"
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "--lr must be positive, got nan"),
    ("--lr", "inf", "--lr must be positive, got inf"),
    ("--grad-clip", "nan", "--grad-clip must be positive, got nan"),
    ("--grad-clip", "-1", "--grad-clip must be positive, got -1.0"),  # a negative clip would flip the gradient
    ("--weight-decay", "-0.1", "--weight-decay must be >= 0, got -0.1"),
    ("--weight-decay", "nan", "--weight-decay must be >= 0, got nan"),
    ("--terminal-share", "1.5", "--terminal-share must be in [0, 1], got 1.5"),
    ("--terminal-share", "nan", "--terminal-share must be in [0, 1], got nan"),
    ("--category-weight", "positon=2", "--category-weight must be CATEGORY=WEIGHT with CATEGORY one of "
     + ", ".join(grammar.CATEGORIES) + "; got 'positon=2'"),
    ("--category-weight", "position", "--category-weight must be CATEGORY=WEIGHT with CATEGORY one of "
     + ", ".join(grammar.CATEGORIES) + "; got 'position'"),
    ("--category-weight", "position=-1", "--category-weight 'position=-1': the weight must be a number >= 0"),
    ("--category-weight", "position=x", "--category-weight 'position=x': the weight must be a number >= 0"),
    ("--logit-mean", "nan", "--logit-mean must be finite, got nan"),
    ("--logit-std", "0", "--logit-std must be positive, got 0.0"),
    ("--logit-std", "inf", "--logit-std must be positive, got inf"),
])
def test_non_finite_or_negative_floats_are_refused_before_any_step(tmp_path, capsys, flag, value, message):
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "a"), "--steps", "2", flag, value]) == 2
    assert capsys.readouterr().err == f"tempflow-fast pretrain-shapes: {message}\n"
    assert not (tmp_path / "a").exists()


def test_progress_on_stderr_and_where_the_weights_went(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain-shapes", "--out", str(out), "--steps", "2", "--batch-size", "4", "--warmup", "1",
            "--log-every", "1", "--save-every", "5", "--threads", "1"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "pretrain-shapes" in captured.err and "2/2" in captured.err
    lines = captured.out.strip().splitlines()
    assert [json.loads(l)["step"] for l in lines[:-1]] == [1, 2]
    assert lines[-1].startswith(f"saved to {out / 'step_00002'} (the final weights")
    TinyFluxAdapter.from_pretrained(out / "step_00002")


@pytest.mark.parametrize("source", ["folder", "shipped"])
def test_init_continues_from_the_given_weights(tmp_path, source):
    from tempflow_fast.models.tiny_flux import load

    if source == "folder":
        start = new_model(seed=5)
        start.save_pretrained(tmp_path / "start")
        init = str(tmp_path / "start")
    else:
        start, init = load(None), "shipped"
    argv = ["pretrain-shapes", "--out", str(tmp_path / "out"), "--init", init, "--steps", "1", "--lr", "1e-12",
            "--batch-size", "4", "--warmup", "1", "--save-every", "1", "--log-every", "1", "--threads", "1"]
    assert cli.main(argv) == 0
    after = load_file(str(tmp_path / "out" / "step_00001" / WEIGHTS_NAME))
    before = start.module.state_dict()
    fresh = new_model(seed=0).module.state_dict()  # what --seed 0 alone would start from
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[k], before[k], rtol=0, atol=1e-8) for k in after)  # one step of lr 1e-12
    assert any(not torch.allclose(after[k], fresh[k]) for k in after)


def test_bad_init_names_the_argument(tmp_path, capsys):
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "out"), "--init", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tempflow-fast pretrain-shapes: --init {str(tmp_path / 'nowhere')!r}: no such folder")
    assert err.count("\n") == 1 and "(or 'shipped')" in err
    assert not (tmp_path / "out").exists()


def test_a_larger_fresh_model_and_a_cosine_decay(tmp_path, capsys):
    """Issue 19, item 2's knobs: a fresh init with more blocks and heads, and a learning rate that decays by cosine
    from --lr to --lr × --min-lr-ratio at the last step; neither changes an --init model's architecture."""
    import argparse

    from tempflow_fast.tasks.shapes.pretrain import lr_factor

    out = tmp_path / "big"
    argv = ["pretrain-shapes", "--out", str(out), "--steps", "2", "--batch-size", "4", "--warmup", "1",
            "--save-every", "2", "--threads", "1", "--no-progress", "--layers", "3", "--heads", "6",
            "--lr-schedule", "cosine", "--min-lr-ratio", "0.1"]
    assert cli.main(argv) == 0
    model = TinyFluxAdapter.from_pretrained(out / "step_00002")
    config = model.module.transformer.config
    assert (config.num_layers, config.num_attention_heads, config.num_single_layers) == (3, 6, 2)
    args = argparse.Namespace(warmup=10, steps=111, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [round(lr_factor(s, args), 4) for s in (0, 9, 10, 60, 110)] == [0.1, 1.0, 1.0, 0.55, 0.1]
    args.lr_schedule = "constant"
    assert lr_factor(110, args) == 1.0
    capsys.readouterr()
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "x"), "--init", "shipped", "--layers", "3"]) == 2
    assert "--layers" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    from tempflow_fast.tasks.shapes import pretrain

    small = ["--steps", "5", "--batch-size", "4", "--warmup", "2", "--lr-schedule", "cosine", "--save-every", "2",
             "--log-every", "1", "--threads", "1", "--layers", "1", "--single-layers", "1", "--heads", "2",
             "--no-progress"]
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "full"), *small]) == 0
    # the same run, stopped by a fault in step 4 (after the step-2 checkpoint; step 3's work is lost)
    real_loss, calls = pretrain.rectified_flow_loss, [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(pretrain, "rectified_flow_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["pretrain-shapes", "--out", str(tmp_path / "cut"), *small])
    monkeypatch.setattr(pretrain, "rectified_flow_loss", real_loss)
    capsys.readouterr()
    # other arguments are refused, naming them; the same ones continue from step 2
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "cut"), *small[:-1], "--lr", "0.5", "--resume"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "cut"), *small, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    full = TinyFluxAdapter.from_pretrained(tmp_path / "full" / "step_00005").module.state_dict()
    cut = TinyFluxAdapter.from_pretrained(tmp_path / "cut" / "step_00005").module.state_dict()
    assert all(torch.equal(full[k], cut[k]) for k in full)
    logs = [[json.loads(l)["loss"] for l in (tmp_path / d / "loss.jsonl").read_text().splitlines()]
            for d in ("full", "cut")]
    assert len(logs[0]) == 5 and logs[0] == logs[1]


def test_stop_after_keeps_the_schedule_and_resume_finishes_it(tmp_path, capsys):
    """--stop-after N stops at step N with the schedule still planned for --steps (the shipped model's stage 1 was
    such a cut): continuing with --resume ends exactly where the uninterrupted run ends."""
    small = ["--steps", "5", "--batch-size", "4", "--warmup", "1", "--lr-schedule", "cosine", "--save-every", "2",
             "--log-every", "1", "--threads", "1", "--layers", "1", "--single-layers", "1", "--heads", "2",
             "--no-progress"]
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "full"), *small]) == 0
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "cut"), *small, "--stop-after", "3"]) == 0
    assert "stopped after step 3 of 5" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cut").glob("step_*")) == ["step_00002", "step_00003"]
    # a stop at or before where the run is refused, naming the flag; the resume without it finishes the run
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "cut"), *small, "--stop-after", "3", "--resume"]) == 2
    assert "--stop-after 3" in capsys.readouterr().err
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "cut"), *small, "--resume"]) == 0
    full = TinyFluxAdapter.from_pretrained(tmp_path / "full" / "step_00005").module.state_dict()
    cut = TinyFluxAdapter.from_pretrained(tmp_path / "cut" / "step_00005").module.state_dict()
    assert all(torch.equal(full[k], cut[k]) for k in full)
    # a step-3 stop of a 3-step run would differ: the cut was on the 5-step schedule
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "three"), *small[:1], "3", *small[2:]]) == 0
    three = TinyFluxAdapter.from_pretrained(tmp_path / "three" / "step_00003").module.state_dict()
    cut3 = TinyFluxAdapter.from_pretrained(tmp_path / "cut" / "step_00003").module.state_dict()
    assert any(not torch.equal(three[k], cut3[k]) for k in three)
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "x"), *small, "--stop-after", "6"]) == 2
    assert "--stop-after must be in 1..--steps = 1..5, got 6" in capsys.readouterr().err


def test_resume_needs_a_run(tmp_path, capsys):
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no resume.pt" in capsys.readouterr().err


def _stopped_after_step_1(tmp_path, steps):
    """A tiny run in tmp_path/run stopped after step 1: (its folder, its arguments, its run.json)."""
    small = ["--steps", str(steps), "--batch-size", "2", "--warmup", "1", "--save-every", "1", "--log-every", "1",
             "--threads", "1", "--layers", "1", "--single-layers", "1", "--heads", "2", "--no-progress"]
    out = tmp_path / "run"
    assert cli.main(["pretrain-shapes", "--out", str(out), *small, "--stop-after", "1"]) == 0
    return out, small, json.loads((out / "run.json").read_text())


def test_resume_refuses_a_run_of_another_split(tmp_path, capsys):
    # A run started before the split changed trained on other prompts: continuing it would mix two splits.
    out, small, meta = _stopped_after_step_1(tmp_path, steps=3)
    assert meta["split_version"] == 2
    del meta["split_version"]  # as written before the field existed: split version 1
    (out / "run.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli.main(["pretrain-shapes", "--out", str(out), *small, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "split version 1" in err and "version 2" in err and "Traceback" not in err


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, capsys):
    small = ["--batch-size", "2", "--save-every", "1", "--log-every", "1", "--threads", "1", "--layers", "1",
             "--single-layers", "1", "--heads", "2", "--no-progress"]
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "a"), "--steps", "2", "--warmup", "4", *small]) == 0
    assert ("tempflow-fast pretrain-shapes: warning: --warmup 4 > --steps 2: the learning rate never reaches --lr "
            "(it ends at 50% of it)") in capsys.readouterr().err
    assert cli.main(["pretrain-shapes", "--out", str(tmp_path / "b"), "--steps", "2", "--warmup", "2", *small]) == 0
    assert "warning" not in capsys.readouterr().err  # the last step reaches --lr


def test_logit_normal_noise_levels_follow_logit_mean_and_std():
    # σ = sigmoid(m + s·z): the levels the loss trains at, read off the velocity call
    from tempflow_fast.tasks.shapes import pretrain
    from tempflow_fast.tasks.shapes.render import render
    import numpy as np

    model = new_model(seed=0, transformer_config={"num_layers": 1, "num_single_layers": 1})
    seen = []
    real = model.velocity
    model.velocity = lambda x, sigma, cond: (seen.append(sigma.clone()), real(x, sigma, cond))[1]
    prompts = sample_batch_prompts(np.random.default_rng(0), 512)
    images = render(prompts, np.random.default_rng(0))
    for mean, std in ((0.0, 1.0), (1.0, 0.5)):
        with torch.no_grad():
            pretrain.rectified_flow_loss(model, images, prompts, torch.Generator().manual_seed(0), mean, std)
        logit = torch.logit(seen[-1].double())
        assert abs(logit.mean().item() - mean) < 4 * std / 512 ** 0.5
        assert abs(logit.std().item() - std) < 0.1 * std
    # the default is SD3's lognorm(0, 1), what every run before the flags trained with
    with torch.no_grad():
        pretrain.rectified_flow_loss(model, images, prompts, torch.Generator().manual_seed(0))
    assert torch.equal(seen[-1], seen[0])
    assert (seen[0] < 0.999).all()  # the logit-normal alone (almost) never trains where sampling starts
    # --terminal-share: that share of the batch at σ = 1 exactly, the rest logit-normal as before
    with torch.no_grad():
        pretrain.rectified_flow_loss(model, images, prompts, torch.Generator().manual_seed(0), 0.0, 1.0, 0.25)
    at_one = seen[-1] == 1.0
    assert abs(at_one.float().mean().item() - 0.25) < 4 * (0.25 * 0.75 / 512) ** 0.5
    assert torch.equal(seen[-1][~at_one], seen[0][~at_one])


def test_resume_of_a_run_from_before_an_argument_existed_uses_its_default(tmp_path, capsys):
    out, small, meta = _stopped_after_step_1(tmp_path, steps=2)
    assert meta["logit_mean"] == 0.0 and meta["logit_std"] == 1.0
    for key in ("logit_mean", "logit_std"):  # as written before the flags existed
        del meta[key]
    (out / "run.json").write_text(json.dumps(meta))
    assert cli.main(["pretrain-shapes", "--out", str(out), *small, "--resume"]) == 0
    assert (out / "step_00002").is_dir()
    # asking for another value than the default the run had is refused, naming the flag
    assert cli.main(["pretrain-shapes", "--out", str(out), *small, "--resume", "--logit-mean", "1"]) == 2
    assert "--logit-mean 0.0" in capsys.readouterr().err
