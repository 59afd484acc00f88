"""bench/async_rollout.py runs both loops and tabulates finished runs (the timing itself is never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMALL = ["train.prompts_per_iteration=1", "tempflow.num_seeds=2", "tempflow.branches=2", "sampling.num_steps=4",
         "tempflow.bifurcation_steps=[0,1]"]


def test_async_rollout_bench_smoke(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ci = {"accuracy": 0.5, "ci95": [0.4, 0.6]}
    (run / "summary.json").write_text(json.dumps({
        "iterations": 2, "before": {"overall": {"accuracy": 0.4}}, "after": {"overall": ci},
        "probe_before": {"mean": 0.6}, "probe_after": {"mean": 0.7}, "probe_change": {"mean": 0.1, "ci95": [0.05, 0.15]},
        "counters": {"wall_seconds": 12.0}}))
    csv_path = tmp_path / "async.csv"
    args = [sys.executable, str(REPO / "bench" / "async_rollout.py"), "--rounds", "1", "--block", "2",
            "--runs", str(run), "--csv", str(csv_path)]
    for s in SMALL:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| sync | configs/shapes_tempflow.yaml | 2 | 1 |" in proc.stdout
    assert "| async_rollout | configs/shapes_tempflow.yaml | 2 | 1 |" in proc.stdout
    assert "| 0.4 | 0.5 | 0.1 | [0.400, 0.600] | 0.6 | 0.7 | 0.1 | [+0.050, +0.150] | 12.0 |" in proc.stdout
    assert len(csv_path.read_text().splitlines()) == 4
