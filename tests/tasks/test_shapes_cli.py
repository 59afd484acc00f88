"""The shipped model and the `sample` / `eval` commands (CLI smoke + recorded-accuracy check)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tempflow_fast import cli
from tempflow_fast.models.tiny_flux import load_shipped, shipped_weights_dir

REPO = Path(__file__).resolve().parents[2]


def test_shipped_weights_are_packaged_and_load():
    folder = shipped_weights_dir()
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["steps"] > 0 and "command" in record and "seed" in record
    model = load_shipped()
    assert sum(p.numel() for p in model.module.parameters()) == record["parameters"]


def test_eval_reproduces_recorded_accuracy(tmp_path, capsys):
    # The recorded numbers were measured with configs/shapes_eval.yaml; eval is deterministic.
    record = json.loads((shipped_weights_dir() / "pretrain.json").read_text())
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--config", str(REPO / "configs" / "shapes_eval.yaml"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "position" in printed
    result = json.loads(out.read_text())
    got, want = result["accuracy"], record["held_out_accuracy"]
    assert got["overall"]["count"] == want["overall"]["count"] == 21 * 16
    assert abs(got["overall"]["accuracy"] - want["overall"]["accuracy"]) <= 0.05, (got["overall"], want["overall"])
    for category, row in want.items():
        # Per category: within 0.05 or one image (a 16-image category moves 0.0625 per image).
        assert abs(got[category]["accuracy"] - row["accuracy"]) <= max(0.05, 1 / row["count"]) + 1e-9, category


def test_eval_failure_table_accounts_for_every_image(tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval", "--config", str(REPO / "configs" / "shapes_eval.yaml"), "--set", "eval.seeds_per_prompt=2",
            "--set", "failures=true", "--json", str(out)]
    assert cli.main(args) == 0
    assert "images by failure mode" in capsys.readouterr().out
    result = json.loads(out.read_text())
    for category, row in result["failures"].items():
        assert sum(row.values()) == result["accuracy"][category]["count"]
        assert row["correct"] == result["accuracy"][category]["correct"]
    assert sum(row["relation"] for c, row in result["failures"].items() if c != "position") == 0


def test_eval_config_errors_name_the_field():
    with pytest.raises(ValueError, match="split"):
        cli.main(["eval", "--set", "eval.split=test"])
    with pytest.raises(ValueError, match="nothing"):
        cli.main(["eval", "--set", "model.path=/nonexistent/nothing", "--set", "eval.seeds_per_prompt=1"])


def test_sample_writes_png_grid(tmp_path):
    out = tmp_path / "grid.png"
    rc = cli.main(["sample", "--prompt", "two red squares", "--out", str(out), "--n", "3", "--steps", "4",
                   "--sde", "flow", "--seed", "1", "--set", "threads=1"])
    assert rc == 0 and out.is_file()
    image = Image.open(out)
    assert image.mode == "RGB" and image.width > 3 * 16 * 8 and image.height > 16 * 8
    with pytest.raises(ValueError, match="'purple'"):
        cli.main(["sample", "--prompt", "a purple square", "--out", str(tmp_path / "x.png")])
