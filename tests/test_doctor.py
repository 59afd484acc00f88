"""`tempflow-fast doctor --smoke`: every stage's code path at toy sizes on the CPU, each in its own process, and the
report / CSV it writes; bad arguments exit 2."""

import csv
import json
import subprocess
import sys

import torch


def test_doctor_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "doctor"
    proc = subprocess.run([sys.executable, "-m", "tempflow_fast.cli", "doctor", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    from tempflow_fast.doctor import STAGES

    assert {r["stage"] for r in rows} == set(STAGES)
    assert not [r for r in rows if r.get("ok") is False]
    by = lambda st, **kv: [r for r in rows if r["stage"] == st and all(r.get(k) == v for k, v in kv.items())]  # noqa
    assert {r["kernel"] for r in by("sdpa")} == {"default", "math"} and all(r["finite"] for r in by("sdpa"))
    assert all(r["err_vs_reference"] < 1e-4 for r in by("kernels", dtype="float32"))
    assert by("graphs")[0]["segments_vs_per_step_max_abs"] <= 1e-4
    update = by("train", part="update")[0]
    assert update["loss_finite"] and update["first_ratio_max_abs_dev"] < 1e-4 and update["K"] == 6
    assert (out / "report.md").read_text().startswith("# tempflow-fast doctor")
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "## train" in proc.stdout and "0 failed row(s)." in proc.stdout


def test_doctor_bad_arguments_exit_2(tmp_path):
    from tempflow_fast.doctor import main

    assert main(["--smoke", "--stages", "kernels,warp", "--out", str(tmp_path)]) == 2
    assert main(["--smoke", "--budget-s", "0", "--out", str(tmp_path)]) == 2
    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path)]) == 2  # the full check needs CUDA; --smoke is the CPU path


def test_doctor_refuses_an_out_folder_it_cannot_write_before_any_stage(tmp_path, capsys):
    from tempflow_fast.doctor import main

    blocker = tmp_path / "file"
    blocker.write_text("a file where the report folder would go")
    assert main(["--smoke", "--out", str(blocker)]) == 2  # was a FileExistsError traceback
    err = capsys.readouterr().err.strip()
    assert err == (f"tempflow-fast doctor: --out {str(blocker / 'report.md')!r}: cannot write there "
                   "(File exists)"), err


def test_flux_flops_per_row_at_1024():
    """The MFU's FLOP count: ~124 TFLOP per FLUX.1-dev row-forward at 1024 px (4096 image + 512 text tokens)."""
    from tempflow_fast.doctor import FLUX_CONFIG, _flux_flops_per_row

    assert abs(_flux_flops_per_row(FLUX_CONFIG, 4608) / 1e12 - 123.9) < 0.5
