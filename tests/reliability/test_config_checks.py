"""Bad values are refused before any model loads, in one line on stderr naming the config field, exit 2 (issue 18
items 2 and 8): NaN / ±inf in any float field, out-of-range plan steps, intervals and counts, blank paths, devices
this machine lacks, prompt files the tiny model cannot read, an unreachable reward server."""

import socket

import pytest
import torch

from tempflow_fast.training.cli import main as train_main

from .runs import one_line_error, train_cli


NON_FINITE = [  # (override, the field named)
    ("train.learning_rate=.inf", "train.learning_rate"),
    ("train.learning_rate=.nan", "train.learning_rate"),
    ("train.learning_rate=1e999", "train.learning_rate"),
    ("train.grad_clip=.nan", "train.grad_clip"),
    ("train.clip_range=-.inf", "train.clip_range"),
    ("train.beta=.inf", "train.beta"),
    ("train.adam_betas=[.nan, 0.999]", "train.adam_betas[0]"),
    ("sampling.noise_level=.nan", "sampling.noise_level"),
    ("sampling.shift=.inf", "sampling.shift"),
    ("tempflow.adaptive_floor=.nan", "tempflow.adaptive_floor"),
    ("reward.timeout_s=.inf", "reward.timeout_s"),
]


@pytest.mark.parametrize("override, field", NON_FINITE, ids=[o.replace(" ", "") for o, _ in NON_FINITE])
def test_non_finite_float_fields_are_refused_by_name(tmp_path, capsys, no_model_load, override, field):
    assert train_cli(tmp_path / "run", override) == 2
    line = one_line_error(capsys)
    assert f"'{field}'" in line and "finite" in line, line
    assert not (tmp_path / "run").exists()


RANGES = {  # id: (overrides, field, words in the message)
    "keep_last=0": (["checkpoint.keep_last=0"], "checkpoint.keep_last", ">= 1"),
    "checkpoint_every=-1": (["checkpoint.every=-1"], "checkpoint.every", ">= 0"),
    "eval_every=-1": (["eval.every=-1"], "eval.every", ">= 0"),
    "sample_every=-5": (["log.sample_every=-5"], "log.sample_every", ">= 0"),
    "max_nonfinite_skips=-1": (["train.max_nonfinite_skips=-1"], "train.max_nonfinite_skips", ">= 0"),
    "images_per_prompt=0": (["eval.images_per_prompt=0"], "eval.images_per_prompt", "> 0"),
    "bifurcation_step=T-1": (["method=tempflow", "tempflow.bifurcation_steps=[0, 2]"], "tempflow.bifurcation_steps",
                             "0..T-2 = 0..1"),
    "bifurcation_step=-1": (["method=tempflow", "tempflow.bifurcation_steps=[-1]"], "tempflow.bifurcation_steps",
                            "0..T-2"),
    "bifurcation_steps_repeated": (["method=tempflow", "tempflow.bifurcation_steps=[1, 1]"],
                                   "tempflow.bifurcation_steps", "repeated"),
    "branch_step=5_of_T=3": (["method=g2rpo", "g2rpo.branch_steps=[5]"], "g2rpo.branch_steps", "0..T-2 = 0..1"),
    "granularities_repeated": (["method=g2rpo", "g2rpo.granularities=[1, 1]"], "g2rpo.granularities", "repeated"),
    "granularity=0": (["method=g2rpo", "g2rpo.granularities=[0]"], "g2rpo.granularities", ">= 1"),
    "model_path=empty": (["model.path=''"], "model.path", "null"),
    "model_device=gpu": (["model.device=gpu"], "model.device", "cuda:N"),
    "output_dir=empty": (["output_dir=''"], "output_dir", "folder"),
    "balance_categories_with_a_prompt_file": (["data.train_prompts=p.txt", "data.balance_categories=true"],
                                              "data.balance_categories", "shapes"),
    # a group of one has no reward spread: every advantage 0 (a run that learns nothing) or, with n - 1, NaN
    "tempflow_branches=1": (["method=tempflow", "tempflow.branches=1"], "tempflow.branches", "a group of one"),
    "tempflow_1x1_ungrouped": (["method=tempflow", "tempflow.branches=1", "tempflow.num_seeds=1",
                                "tempflow.seed_grouping=false"], "tempflow.num_seeds × branches", ">= 2"),
    "flow_grpo_group_size=1": (["method=flow_grpo", "flow_grpo.group_size=1"], "flow_grpo.group_size", ">= 2"),
    "g2rpo_branches=1": (["method=g2rpo", "g2rpo.branches=1"], "g2rpo.branches", ">= 2"),
    "stepwise_group_size=1": (["method=stepwise", "stepwise.group_size=1"], "stepwise.group_size", ">= 2"),
    "mixgrpo_group_size=1": (["method=mixgrpo", "mixgrpo.group_size=1"], "mixgrpo.group_size", ">= 2"),
    "diffusion_nft_group_size=1": (["method=diffusion_nft", "diffusion_nft.group_size=1"],
                                   "diffusion_nft.group_size", ">= 2"),
}


@pytest.mark.parametrize("case", RANGES)
def test_out_of_range_values_are_refused_by_name(tmp_path, capsys, no_model_load, case):
    overrides, field, words = RANGES[case]
    assert train_cli(tmp_path / "run", *overrides) == 2
    line = one_line_error(capsys)
    assert f"'{field}'" in line and words in line, line


@pytest.mark.parametrize("field", ["model.device", "reward.device"])
def test_a_cuda_device_this_machine_lacks_is_refused_before_loading(tmp_path, capsys, no_model_load, field):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert train_cli(tmp_path / "run", f"{field}=cuda:7") == 2
    line = one_line_error(capsys)
    assert f"'{field}'" in line and "cuda:7" in line, line
    assert not (tmp_path / "run").exists()  # refused before the output folder was claimed


def _prompts(tmp_path, *lines):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(l + "\n" for l in lines))
    return path


@pytest.mark.parametrize("field", ["data.train_prompts", "data.eval_prompts"])
def test_a_prompt_word_outside_the_tiny_vocabulary_is_named_with_the_vocabulary(tmp_path, capsys, no_model_load,
                                                                               field):
    path = _prompts(tmp_path, "a red square", "two purple squares")
    assert train_cli(tmp_path / "run", f"{field}={path}", "data.balance_categories=false") == 2
    line = one_line_error(capsys)
    assert f"'{field}'" in line and "'purple'" in line and "two purple squares" in line, line
    assert "vocabulary: a, two, three, square, squares, and, red, green, blue, yellow" in line, line


def test_a_prompt_longer_than_the_tiny_model_reads_is_refused(tmp_path, capsys, no_model_load):
    path = _prompts(tmp_path, " ".join(["a", "red", "square", "and"] * 3))
    assert train_cli(tmp_path / "run", f"data.train_prompts={path}") == 2
    line = one_line_error(capsys)
    assert "'data.train_prompts'" in line and "at most 8" in line, line


@pytest.mark.parametrize("content, words", [(None, "no such file"), ("\n\n", "holds no prompts"),
                                            ('{"text": 1}\n', "'prompt' field")],
                         ids=["missing", "empty", "no_prompt_field"])
def test_a_missing_empty_or_malformed_prompt_file_is_refused(tmp_path, capsys, no_model_load, content, words):
    path = tmp_path / ("prompts.jsonl" if content and "{" in content else "prompts.txt")
    if content is not None:
        path.write_text(content)
    assert train_cli(tmp_path / "run", f"data.train_prompts={path}") == 2
    line = one_line_error(capsys)
    assert "'data.train_prompts'" in line and words in line, line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_reward_server_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert train_cli(tmp_path / "run", "reward.name=server", f"reward.url={url}", "reward.timeout_s=5") == 2
    line = one_line_error(capsys)
    assert "reward.url" in line and url in line, line


def test_a_tiny_model_path_without_its_config_names_the_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_cli(tmp_path / "run", f"model.path={tmp_path / 'empty'}") == 2
    line = one_line_error(capsys)
    assert str(tmp_path / "empty") in line and "tiny_flux" in line, line


def test_dry_run_refuses_a_non_finite_gpu_memory(capsys):
    assert train_main(["--dry-run", "--gpu-memory", "nan"]) == 2
    assert "--gpu-memory" in one_line_error(capsys)
