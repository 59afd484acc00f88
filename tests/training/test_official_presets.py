"""configs/official/: one preset per official config (issue 17). `--print-config` shows the official values; every
header names its source files and functions and its remaining deviations; the other GPU presets say how they
differ from these."""

from pathlib import Path

import pytest
import yaml

from tempflow_fast.training.cli import main as train_main

REPO = Path(__file__).resolve().parents[2]
OFFICIAL = REPO / "configs" / "official"
NAMES = ["tempflow_flux", "tempflow_sd35m_geneval", "tempflow_sd35m_pickscore", "flow_grpo_sd35m_geneval",
         "flow_grpo_sd35m_pickscore", "g2rpo_flux_hps_clip"]


def printed(name, capsys):
    assert train_main(["--config", str(OFFICIAL / f"{name}.yaml"), "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_official_presets_are_there():
    assert sorted(p.stem for p in OFFICIAL.glob("*.yaml")) == sorted(NAMES)


def test_tempflow_flux_is_flux_pr(capsys):
    c = printed("tempflow_flux", capsys)
    assert (c["sampling"]["num_steps"], c["eval"]["num_steps"], c["sampling"]["guidance_scale"]) == (10, 50, 3.5)
    assert (c["model"]["resolution"], c["model"]["max_sequence_length"]) == (1024, 128)
    assert (c["tempflow"]["num_seeds"], c["tempflow"]["branches"], c["tempflow"]["step_weight_scale"]) == (4, 6, 1.73)
    t = c["train"]
    assert t["learning_rate"] == 0.0003 and t["lora"]["enabled"] is True
    assert (t["lora"]["rank"], t["lora"]["alpha"]) == (32, 64)
    assert {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"} <= set(t["lora"]["target_modules"])
    assert (t["beta"], t["kl_convention"], t["global_std"]) == (0.004, "gaussian", False)
    assert (t["ema_decay"], t["ema_update_every"], t["ema_warmup"]) == (0.9, 8, True)
    assert (t["optimizer_steps_per_epoch"], t["prompts_per_iteration"]) == (2, 8)


@pytest.mark.parametrize("name, beta", [("tempflow_sd35m_geneval", 0.004), ("tempflow_sd35m_pickscore", 0.001)])
def test_tempflow_sd3_is_the_pr_configs(name, beta, capsys):
    c = printed(name, capsys)
    t = c["train"]
    assert (t["global_std"], t["beta"], t["kl_convention"]) == (False, beta, "gaussian")
    assert (c["eval"]["num_steps"], t["optimizer_steps_per_epoch"], c["tempflow"]["step_weight_scale"]) == (40, 2, 2.25)
    assert (c["sampling"]["num_steps"], c["sampling"]["guidance_scale"], c["model"]["resolution"]) == (10, 4.5, 512)


@pytest.mark.parametrize("name, beta", [("flow_grpo_sd35m_geneval", 0.04), ("flow_grpo_sd35m_pickscore", 0.01)])
def test_flow_grpo_is_grpo_py(name, beta, capsys):
    c = printed(name, capsys)
    t = c["train"]
    assert (c["flow_grpo"]["group_size"], c["flow_grpo"]["timestep_fraction"], t["prompts_per_iteration"]) == (24, 0.99, 48)
    assert (t["global_std"], t["beta"], t["kl_convention"], t["optimizer_steps_per_epoch"]) == (True, beta, "flow_grpo", 2)
    assert (c["eval"]["num_steps"], t["ema_update_every"], t["ema_warmup"]) == (40, 8, True)


def test_g2rpo_is_the_hps_clip_script(capsys):
    c = printed("g2rpo_flux_hps_clip", capsys)
    g, t = c["g2rpo"], c["train"]
    assert (g["branches"], g["granularities"], g["branch_steps"]) == (12, [1, 2], list(range(8)))
    assert (g["sigma_schedule"], g["completion_stride"], g["unbiased_std"], g["std_eps"]) == \
        ("linspace", "official", True, 1e-8)
    assert (c["sampling"]["noise_level"], c["sampling"]["num_steps"], c["sampling"]["shift"]) == (0.7, 16, 3.0)
    assert (t["learning_rate"], t["beta"], t["lora"]["enabled"], c["reward"]["advantage_mode"]) == \
        (2e-6, 0.0, False, "per_component")
    assert (c["distributed"]["backend"], c["distributed"]["world_size"], t["prompts_per_iteration"]) == ("deepspeed", 16, 16)


@pytest.mark.parametrize("name", NAMES)
def test_every_header_cites_its_source_and_lists_deviations(name):
    text = (OFFICIAL / f"{name}.yaml").read_text()
    header = text[:text.index("\nmethod:")]
    assert "Source:" in header and "Remaining deviations" in header and "Batch rule" in header
    repo = {"tempflow": "Shredded-Pork/TempFlow-GRPO", "flow_grpo": "yifan123/flow_grpo", "g2rpo": "bcmi/Granular-GRPO"}
    assert repo[name.split("_sd35m")[0].split("_flux")[0]] in header
    assert "tempflow-fast train --config configs/official/" + name + ".yaml" in header


@pytest.mark.parametrize("preset", ["tempflow_flux1024_hpsv3", "tempflow_sd35m_geneval", "tempflow_sd35m_pickscore",
                                    "flow_grpo_sd35m", "g2rpo_flux_hps_clip"])
def test_the_other_gpu_presets_say_how_they_differ(preset):
    header = (REPO / "configs" / f"{preset}.yaml").read_text().split("\nmethod:")[0]
    assert "configs/official/" in header and "differs" in header
