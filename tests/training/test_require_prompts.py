"""No silent toy prompts: `train` refuses any model but the tiny shapes one when data.train_prompts is null
(exit 2, one line naming the field, before anything loads); --print-config and --dry-run still work."""

from pathlib import Path

import pytest
import yaml

from tempflow_fast.config import load_config
from tempflow_fast.training.cli import main as train_main
from tempflow_fast.training.train_config import Config

REPO = Path(__file__).resolve().parents[2]
GPU_PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                     if (yaml.safe_load(p.read_text()).get("model") or {}).get("kind") not in (None, "tiny_flux"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("tempflow_fast.models.loading.load_adapter", refuse)


def test_the_gpu_presets_are_found():
    assert {"tempflow_flux1024_hpsv3.yaml", "tempflow_sd35m_pickscore.yaml", "g2rpo_flux_hps_clip.yaml"} <= \
        set(GPU_PRESETS)


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_without_prompts_is_refused(preset, tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    assert train_main(["--config", str(REPO / "configs" / preset), "--set", f"output_dir={out}"]) == 2
    line = _one_line(capsys)
    assert line.startswith("tempflow-fast train: config field 'data.train_prompts': is null"), line
    assert "docs/prompts.md" in line and "tempflow-fast prompts geneval" in line
    assert not out.exists()  # refused before the run claimed its folder


@pytest.mark.parametrize("flag", ["--print-config", "--dry-run"])
def test_print_config_and_dry_run_need_no_prompts(flag, capsys, no_model_load):
    assert train_main(["--config", str(REPO / "configs" / "tempflow_flux1024_hpsv3.yaml"), flag]) == 0
    captured = capsys.readouterr()
    assert "train_prompts: null" in captured.out
    # the note goes to stderr: the dry-run's stdout ends with its peak-memory line
    note = "note: train will refuse to start: config field 'data.train_prompts'"
    assert (note in captured.err) == (flag == "--dry-run")


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_a_prompt_file_satisfies_the_check(kind, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    load_config(Config, None, [f"model.kind={kind}", f"data.train_prompts={prompts}"]).require_train_prompts()
    with pytest.raises(ValueError, match="'data.train_prompts'"):
        load_config(Config, None, [f"model.kind={kind}"]).require_train_prompts()


def test_the_tiny_shapes_model_keeps_its_prompts(tmp_path):
    # null means the shapes task, which the tiny model (shipped, or a folder of it) is made for
    load_config(Config, None, []).require_train_prompts()
    load_config(Config, None, [f"model.path={tmp_path}"]).require_train_prompts()
