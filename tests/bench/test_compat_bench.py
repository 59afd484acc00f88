"""bench/compat.py runs and its two formulations agree (the timing itself is never asserted)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_compat_bench_smoke(tmp_path):
    csv_path = tmp_path / "compat.csv"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "compat.py"), "--batch", "3", "--side", "8",
                           "--reps", "2", "--csv", str(csv_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| rollout | tempflow_fast |" in proc.stdout and "| train | flow_grpo_eager |" in proc.stdout
    err_logp = float(proc.stdout.split("max |Δ log-prob| ")[1].split(",")[0])
    err_grad = float(proc.stdout.split("/ max |dlogp/dv| ")[1].split()[0])
    assert err_logp < 1e-5 and err_grad < 1e-5
    assert len(csv_path.read_text().splitlines()) == 5
