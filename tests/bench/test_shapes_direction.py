"""bench/shapes_direction.py: β of the σ = 1 prediction (does a model know which way a relation word points)."""

import csv
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("shapes_direction", REPO / "bench" / "shapes_direction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_model_knows_the_directions_and_a_fresh_one_does_not(tmp_path, capsys):
    bench = _bench()
    from tempflow_fast.tasks.shapes.task import new_model

    fresh = new_model(seed=0)
    fresh.save_pretrained(tmp_path / "fresh")
    out = tmp_path / "beta.csv"
    assert bench.main([str(tmp_path / "fresh"), "--noises", "16", "--scenes", "200", "--csv", str(out)]) == 0
    assert bench.main(["--noises", "16", "--scenes", "200", "--csv", str(tmp_path / "shipped.csv")]) == 0
    printed = capsys.readouterr().out
    assert "| relation (vs opposite) |" in printed
    fresh_rows = list(csv.DictReader(out.open()))
    shipped_rows = list(csv.DictReader((tmp_path / "shipped.csv").open()))
    for rows in (fresh_rows, shipped_rows):
        # 12 ordered colour pairs per axis; split version 2 holds out 2 pairs per axis (one per relation word), each
        # in both orders: 4 ordered pairs with a held-out prompt, 8 with train prompts only
        assert [(r["relation"], r["split"], r["pairs"]) for r in rows] == [
            ("above", "train", "8"), ("above", "held_out", "4"), ("left of", "train", "8"), ("left of", "held_out", "4")]
    assert all(abs(float(r["beta"])) < 0.05 for r in fresh_rows)  # an untrained model places nothing by the word
    # the shipped model (docs/testbed.md, item 2): every relation's direction, on pairs never heard with the word too
    assert all(float(r["beta_min"]) > 0.3 for r in shipped_rows), shipped_rows


def test_bad_arguments_exit_2(tmp_path, capsys):
    bench = _bench()
    with pytest.raises(SystemExit) as e:
        bench.main(["--noises", "0"])
    assert e.value.code == 2 and "--noises must be positive, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main([str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
