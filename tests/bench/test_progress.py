"""Nothing silent for long: the bench suite and bench/rollout.py report each measurement on stderr as it runs
(the tables stay on stdout)."""

import subprocess
import sys
from pathlib import Path

from tempflow_fast.bench.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_suite_reports_each_measurement_on_stderr(tmp_path, capsys):
    assert main(["ops", "rollout", "--quick", "--reps", "2", "--warmup", "1", "--threads", "1",
                 "--ops-providers", "fused-torch", "--plans", "tempflow_2x3x4", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0].startswith("[bench] subjects: ops, rollout on cpu")
    ops = [l for l in err if l.startswith("[bench] ops fused-torch ")]
    assert ops and ops[0].endswith(": 1 warm-up + 2 timed run(s)") and "median" in ops[-1]
    for provider in ("engine", "prefix-recompute"):
        lines = [l for l in err if l.startswith(f"[bench] rollout {provider}") and "tempflow_2x3x4" in l]
        assert len(lines) >= 2 and "median" in lines[-1], err
    assert "[bench]" not in captured.out and "| ops |" in captured.out


def test_rollout_script_reports_each_rollout_on_stderr(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "rollout.py"), "--no-compile", "--reps", "2",
                           "--plans", "tempflow_4x6", "--threads", "1", "--csv", str(tmp_path / "r.csv")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "  tempflow_4x6 [eager]: warm-up rollout",
        *[l for l in proc.stderr.splitlines() if "warm-up" in l and "timed rollout(s)" in l],
        *[l for l in proc.stderr.splitlines() if "rollout 1/2" in l or "rollout 2/2" in l],
        *[l for l in proc.stderr.splitlines() if "median" in l],
    ]
    assert len(proc.stderr.splitlines()) == 5 and "| tempflow_4x6 |" in proc.stdout
