"""The bench suite on tiny settings: one CSV schema for every subject, telemetry "n/a" without an
NVIDIA GPU, a plot per subject, the rollout counts of engine and prefix-recompute reference, the official
structure's lines and FLUX-1024 extrapolation."""

import csv
import re
import types

import pytest
import torch

from tempflow_fast.bench import telemetry
from tempflow_fast.bench.cli import main
from tempflow_fast.bench.results import COLUMNS
from tempflow_fast.bench.subjects import QUICK_TRANSFORMER, SUBJECTS, Settings
from tempflow_fast.tasks.shapes.task import new_model


def test_quick_suite_writes_one_schema(tmp_path, capsys):
    # a model given by path, as a user would bench their own checkpoint
    new_model(seed=0, transformer_config=QUICK_TRANSFORMER).save_pretrained(tmp_path / "my-model")
    out = tmp_path / "suite"
    rc = main([*SUBJECTS, "--quick", "--reps", "1", "--warmup", "0", "--threads", "1",
               "--ops-providers", "fused-torch,unfused-eager", "--plans", "tempflow_2x3x4", "--out", str(out),
               "--model-path", str(tmp_path / "my-model")])
    assert rc == 0
    printed = capsys.readouterr().out
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert {r["subject"] for r in rows} == set(SUBJECTS)
    # the official subject runs TempFlow's FLUX structure: on the built-in FLUX pipeline unless given a FLUX one
    assert all("my-model" in r["shape"] for r in rows if r["subject"] not in ("ops", "official"))
    for subject in SUBJECTS:
        assert (out / f"{subject}.png").stat().st_size > 0
    tel = [r for r in rows if r["metric"] in telemetry.QUANTITIES]
    assert {r["subject"] for r in tel} == set(SUBJECTS)
    if not torch.cuda.is_available():
        assert all(r[q] == "n/a" for r in tel for q in ("p50", "p20", "p80"))
        assert "GPU telemetry" in printed
    # every measured value is a number, every timing has p20 <= p50 <= p80
    for r in rows:
        if r["metric"] not in telemetry.QUANTITIES:
            p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
            assert p20 <= p50 <= p80, r

    def value(subject, provider, metric):
        (row,) = [r for r in rows if (r["subject"], r["provider"], r["metric"]) == (subject, provider, metric)]
        return float(row["p50"])

    # TempFlow N=2 seeds, K=3 branches, T=4, k in {0,1,2}: the engine shares each trunk,
    # N·T + N·K·Σ(T-k-1) = 8 + 36 calls; the reference recomputes each branch's prefix (k+1 calls)
    # on top: 8 + 6·(1+2+3) + 36 = 80 calls. Both make 2 trunk + 18 branch images.
    assert value("rollout", "engine", "nfe_total") == 44
    assert value("rollout", "prefix-recompute-reference", "nfe_total") == 80
    assert value("rollout", "engine", "images") == value("rollout", "prefix-recompute-reference", "images") == 20
    assert value("rollout", "engine", "speedup_vs_prefix_recompute") > 0
    # one forward+backward per shared state (6 = N·3 trained k's), not per sample (18)
    assert value("train_step", "engine", "fwd_bwd_passes") == 6
    assert value("train_step", "per-sample-update", "fwd_bwd_passes") == 18
    assert value("train_step", "engine", "model_calls") == 44

    # the public structure: the same 44 rollout rows (a call per trunk step and per branch step), one update row per
    # sample (18) with checkpointing and a reference forward each (18·5 = 90 forward-equivalents) against one per
    # shared state (6·5 = 30)
    for phase in ("rollout", "update", "iteration"):
        assert re.search(rf"^{phase} vs official structure: [0-9.]+x \(ours [0-9.]+ s, official [0-9.]+ s\)$", printed,
                         re.M), phase
    assert value("official", "official-structure", "rollout_rows") == value("official", "ours", "rollout_rows") == 44
    assert value("official", "official-structure", "rollout_calls") == 2 * (4 + 3 + 2 + 1)
    assert value("official", "official-structure", "update_rows") == 2 * 18
    assert value("official", "official-structure", "update_forward_equivalents") == 90
    assert value("official", "ours", "update_forward_equivalents") == 30
    assert value("official", "ours", "iteration_flux1024_vs_official") == pytest.approx(74 / 134)
    report = (out / "bench.md").read_text()
    assert "FLUX.1-dev 1024 px extrapolation" in report and "125 TFLOP per row-forward" in report


def test_a_diffusers_flux_pipeline_by_path(tmp_path):
    """The same subjects on a FLUX pipeline folder (tiny random components, built offline)."""
    from tests.models.tiny_pipelines import RESOLUTION, make_tiny_flux_pipeline

    pipe = make_tiny_flux_pipeline(tmp_path / "flux-pipe")
    out = tmp_path / "suite"
    rc = main(["rollout", "iteration", "--quick", "--reps", "1", "--warmup", "0", "--threads", "1",
               "--plans", "flow_grpo_4x4", "--model-kind", "flux", "--model-path", str(pipe), "--dtype", "fp32",
               "--resolution", str(RESOLUTION), "--out", str(out), "--no-plots"])
    assert rc == 0
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["subject"] for r in rows} == {"rollout", "iteration"}
    assert all(r["shape"].endswith("flux flux-pipe") for r in rows)
    (nfe,) = [r for r in rows if (r["provider"], r["metric"]) == ("engine", "nfe_total")]
    assert float(nfe["p50"]) == 16  # G = 4 trajectories × T = 4 steps


def test_telemetry_samples_in_background(monkeypatch):
    """With an NVML stand-in, the sampler thread reads every quantity in the labelled units."""
    fake = types.SimpleNamespace(
        NVMLError=RuntimeError, NVML_CLOCK_SM=1,
        nvmlDeviceGetHandleByUUID=lambda uuid: "h", nvmlDeviceGetHandleByIndex=lambda i: "h",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**20),
        nvmlDeviceGetPowerUsage=lambda h: 250_000,
        nvmlDeviceGetClockInfo=lambda h, clock: 1980,
    )
    monkeypatch.setattr(telemetry, "_nvml", lambda: (fake, None))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="abc"))
    tel = telemetry.GpuTelemetry(0, interval_s=0.001)
    with tel:
        import time

        time.sleep(0.02)
    assert len(tel.samples["gpu_util"]) >= 2
    assert tel.summary() == {"gpu_util": (40.0, 40.0, 40.0), "gpu_memory_used": (3.0, 3.0, 3.0),
                             "gpu_power": (250.0, 250.0, 250.0), "gpu_sm_clock": (1980.0, 1980.0, 1980.0)}


def test_no_gpu_means_na_and_a_reason():
    tel = telemetry.GpuTelemetry(None)
    with tel:
        pass
    assert tel.unavailable and all(v is None for v in tel.summary().values())


@pytest.mark.parametrize("kwargs, name", [
    (dict(reps=0), "reps"), (dict(prompts=0), "prompts"), (dict(reward="clip"), "reward"),
    (dict(quick=True, plans=["tempflow_4x6"]), "plans"), (dict(model_kind="sdxl"), "model_kind"),
    (dict(model_kind="flux"), "model_path"),
    (dict(dtype="float8"), "dtype"),  # refused whichever subjects run (the ops subject never loads a model)
    (dict(resolution=17), "resolution"),  # the tiny model is 16×16: a size it would ignore is an error
    (dict(model_kind="flux", model_path="/m", resolution=8), "resolution must be >= 16"),
])
def test_bad_settings_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Settings(device=torch.device("cpu"), **kwargs)


def test_unknown_subject_is_an_error(capsys):
    assert main(["nonsense", "--quick"]) == 2
    assert "SUBJECT" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_cuda_device_this_machine_lacks_is_one_line(capsys):
    assert main(["ops", "--quick", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tempflow-fast bench: --device: 'cuda' needs CUDA") and "\n" not in err


def test_device_auto_is_accepted(tmp_path):
    assert main(["ops", "--quick", "--device", "auto", "--reps", "1", "--warmup", "0", "--out", str(tmp_path),
                 "--no-plots"]) == 0
    assert (tmp_path / "bench.csv").is_file()


def test_an_output_folder_that_cannot_be_written_is_refused_before_timing(tmp_path, capsys, monkeypatch):
    import tempflow_fast.bench.cli as bench_cli

    def no_timing(*args, **kwargs):
        raise AssertionError("timed before --out was checked")

    monkeypatch.setattr(bench_cli, "run", no_timing)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder would go")
    assert main(["ops", "--quick", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tempflow-fast bench: --out {str(blocker / 'bench.csv')!r}: cannot write there") and "\n" not in err


@pytest.mark.parametrize("script, flag", [("ops.py", "--csv"), ("rollout.py", "--csv"), ("compat.py", "--csv"),
                                          ("async_rollout.py", "--csv"), ("completions.py", "--out"),
                                          ("shapes_direction.py", "--csv")])
def test_bench_scripts_check_their_csv_before_timing(tmp_path, script, flag):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "bench" / script), flag, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(f"error: {flag} {str(tmp_path)!r} is a folder; give a file path")
