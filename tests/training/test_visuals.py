"""What a run shows: sample grids captioned by prompt (detector frames on the shapes task), before_after.png and
reward_curve.png in output_dir with their paths printed before the last line, images and scalars to TensorBoard
and to an experiment tracker (wandb / trackio API)."""

import importlib.machinery
import json
import sys
import types

import pytest
import torch
from PIL import Image

from tempflow_fast.training.visuals import before_after, line_chart, prompt_grid, running_mean


def test_prompt_grid_one_row_per_prompt_with_frames():
    images = torch.zeros(5, 3, 16, 16)
    images[:, 0] = 1.0  # red
    prompts = ["a", "b", "a", "b", "a"]
    grid = prompt_grid(images, prompts, ok=[True, False, True, False, False], cell=32)
    assert isinstance(grid, Image.Image)
    w_two, h_two = grid.size
    one = prompt_grid(images[:1], prompts[:1], cell=32)
    assert h_two > 1.8 * (one.size[1] - 6) and w_two > 2.5 * one.size[0]  # 2 rows, 3 columns
    px = grid.convert("RGB").load()
    colours = {px[x, y] for x in range(w_two) for y in range(h_two)}
    assert (40, 200, 60) in colours and (220, 50, 50) in colours and (255, 0, 0) in colours
    with pytest.raises(ValueError, match="prompts"):
        prompt_grid(images, prompts[:2])


def test_before_after_and_line_chart():
    a, b = torch.rand(4, 3, 8, 8), (torch.rand(4, 3, 8, 8) * 255).to(torch.uint8)  # float and uint8 inputs
    img = before_after(a, b, ["x", "x", "y", "y"], title="t")
    assert img.size[0] > 2 * prompt_grid(a, ["x", "x", "y", "y"]).size[0]
    chart = line_chart({"reward": [(1, 0.2), (2, 0.4), (3, float("nan"))], "acc": [(0, 0.5)]}, title="c")
    assert chart.size == (640, 380 + 2 * 14)  # the legend sits above the plot, one line per series
    # an eval drawn as points with whiskers: the interval's ends set the y range, so the whisker pixels are drawn
    chart = line_chart({"reward": [(1, 0.5), (2, 0.6)], "eval": [(0, 0.4, 0.1, 0.9)]}, markers=["eval"])
    column = [chart.getpixel((56, y)) for y in range(chart.height)]
    assert sum(c == (255, 127, 14) for c in column) > 0.6 * (chart.height - 40 - 28 - 28)
    with pytest.raises(ValueError, match="not given"):
        line_chart({"r": [(1, 0.5)]}, markers=["eval"])
    with pytest.raises(ValueError, match="finite point"):
        line_chart({"r": [(1, float("nan"))]})
    with pytest.raises(ValueError, match="as many rows"):
        before_after(a, b[:2], ["x"] * 4)


def test_running_mean_trails():
    assert running_mean([(2, 4.0), (0, 0.0), (1, 2.0), (3, 6.0)], 2) == [(0, 0.0), (1, 1.0), (2, 3.0), (3, 5.0)]


def test_main_job_writes_pictures_and_prints_their_paths(tmp_path, capsys):
    from tempflow_fast.training.cli import main

    out = tmp_path / "run"
    assert main(["--config", "configs/shapes_tempflow.yaml", "--set", f"output_dir={out}", "--set",
                 "train.iterations=2", "--set", "train.prompts_per_iteration=2", "--set", "log.progress=false",
                 "--set", "log.sample_every=1", "--set", "eval.images_per_prompt=2", "--set",
                 "log.showcase_prompts=2", "--set", "log.showcase_images=2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("held-out accuracy: before")
    assert lines[-2] == f"pictures: {out / 'before_after.png'}, {out / 'reward_curve.png'}"
    for name in ("before_after.png", "reward_curve.png", "samples/iter-000001.png", "samples/iter-000002.png"):
        assert Image.open(out / name).size[0] > 100
    assert json.loads((out / "summary.json").read_text())["pictures"][0].endswith("before_after.png")
    tb = list((out / "tensorboard").glob("events.*"))
    assert tb and tb[0].stat().st_size > 10_000  # scalars and the three kinds of images


def test_tracker_gets_config_scalars_and_captioned_images(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls["init"].append(kw)
    fake.log = lambda data, step=None: calls["log"].append((step, data))
    fake.Image = lambda image, caption="": ("Image", image.size, caption)
    fake.finish = lambda: calls.__setitem__("finish", calls["finish"] + 1)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from tempflow_fast.training.cli import main

    out = tmp_path / "run"
    assert main(["--config", "configs/shapes_tempflow.yaml", "--set", f"output_dir={out}", "--set",
                 "train.iterations=1", "--set", "train.prompts_per_iteration=2", "--set", "log.progress=false",
                 "--set", "log.tracker=wandb", "--set", "log.project=p", "--set", "log.sample_every=1",
                 "--set", "eval.images_per_prompt=1", "--set", "log.showcase_prompts=1",
                 "--set", "log.showcase_images=1", "--set", "log.tensorboard=false"]) == 0
    (init,) = calls["init"]
    assert init["project"] == "p" and init["name"] == "run" and init["config"]["method"] == "tempflow"
    assert init["id"] == (out / "wandb_run_id").read_text() and init["resume"] == "allow"
    scalars = [d for _, d in calls["log"] if "reward_mean" in d]
    images = {k: v for _, d in calls["log"] for k, v in d.items() if isinstance(v, tuple)}
    assert scalars and set(images) == {"samples", "before_after", "reward_curve"}
    assert images["samples"][2] == "iteration 1" and calls["finish"] == 1


def test_tracker_not_installed_is_refused_by_field(capsys):
    from tempflow_fast.training.cli import main

    assert main(["--set", "log.tracker=trackio", "--print-config"]) == 2
    assert "log.tracker" in capsys.readouterr().err
