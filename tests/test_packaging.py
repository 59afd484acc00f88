"""Packaging: the light core install (ops and compat without the training stack), the extras, the
one-line errors for a missing extra, `--version`, and the files the package ships beside its code."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tempflow_fast
from tempflow_fast import cli

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STACK = ("diffusers", "transformers", "peft", "tensorboard")
# Run first in a subprocess: the training stack cannot be imported, as in an environment that installed
# only the core (a None entry in sys.modules makes `import name` raise ModuleNotFoundError and
# importlib.util.find_spec(name) answer None, as for a package that is not installed).
BLOCK_TRAIN_STACK = f"import sys\nfor _name in {TRAIN_STACK!r}:\n    sys.modules[_name] = None\n"


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "TEMPFLOW_FAST_BACKEND": "torch"})


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_ops_and_compat_work_without_the_training_stack():
    code = BLOCK_TRAIN_STACK + (
        "import torch\n"
        "import tempflow_fast.ops as ops\n"
        "from tempflow_fast.compat.flow_grpo import sde_step_with_logprob\n"
        "step = ops.flow_sde_step(torch.zeros(2, 3), torch.ones(2, 3), 0.5, 0.4, 0.7, noise=torch.zeros(2, 3))\n"
        "print('mean', step.mean[0, 0].item())\n"
        "print('callable', callable(sde_step_with_logprob))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    # μ = x·(1 + s²·dt/2σ) + v·(1 + s²·(1-σ)/2σ)·dt at x = 0, v = 1, σ = 0.5, dt = -0.1: s = η = 0.7
    mean = float(re.search(r"mean (\S+)", out.stdout).group(1))
    assert mean == pytest.approx((1 + 0.49 * 0.5 / 1.0) * -0.1, rel=1e-6)
    assert "callable True" in out.stdout


def test_importing_ops_and_compat_loads_none_of_the_training_stack():
    """Not merely tolerated when absent: nothing in ops/compat even tries them when they are installed
    (tqdm is left out: torch.hub imports it whenever it is installed)."""
    code = ("import sys, tempflow_fast.ops, tempflow_fast.compat.flow_grpo\n"
            f"print(sorted(n for n in sys.modules if n.split('.')[0] in {TRAIN_STACK + ('PIL',)!r}))\n")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [
    ["train", "--config", "configs/shapes_tempflow.yaml", "--set", "train.iterations=1"],
    ["eval", "--config", "configs/shapes_eval.yaml"],
])
def test_cli_without_the_train_extra_says_which_extra_in_one_line(argv, tmp_path):
    argv = argv + ["--set", f"output_dir={tmp_path}"] if argv[0] == "train" else argv
    code = BLOCK_TRAIN_STACK + f"from tempflow_fast.cli import main\nsys.exit(main({argv!r}))\n"
    out = _python(code)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"tempflow-fast {argv[0]}: needs diffusers, which is not installed")
    assert 'pip install "tempflow_fast[train]"' in lines[0] and 'pip install -e ".[train]"' in lines[0]


def test_missing_extra_message_follows_a_wrapped_import_error():
    try:
        try:
            raise ModuleNotFoundError("No module named 'open_clip'", name="open_clip")
        except ImportError as err:
            raise ImportError("the HPS reward needs open_clip") from err
    except ImportError as wrapped:
        message = cli.missing_extra_message("train", wrapped)
    torch_version = importlib.metadata.version("torch")
    # [rewards] pulls torchvision: the command pins the installed torch so that pip cannot replace it
    assert message.startswith(
        "tempflow-fast train: needs open_clip, which is not installed; install tempflow_fast[rewards]: "
        f'pip install "tempflow_fast[rewards]" "torch=={torch_version}" '
        f'(from a checkout: pip install -e ".[rewards]" "torch=={torch_version}")')
    assert "\n" not in message
    assert cli.missing_extra_message("train", ModuleNotFoundError("No module named 'nope'", name="nope")) is None


def test_imagereward_is_not_sent_to_an_extra():
    message = cli.missing_extra_message("train", ModuleNotFoundError("No module named 'ImageReward'",
                                                                    name="ImageReward"))
    assert "[rewards]" not in message and "python -m tempflow_fast.rewards.serve" in message
    assert "docs/install.md" in message


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"tempflow-fast {tempflow_fast.__version__}\n"
    assert importlib.metadata.version("tempflow_fast") == tempflow_fast.__version__
    out = subprocess.run([sys.executable, "-m", "tempflow_fast.cli", "-V"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout == f"tempflow-fast {tempflow_fast.__version__}\n"


def test_usage_lists_every_command_and_version():
    usage = cli._usage()
    assert "tempflow-fast --version" in usage
    for name, (_, help_) in cli.COMMANDS.items():
        assert f"  {name}" in usage and help_ in usage


def test_core_dependencies_are_the_light_set():
    project = _pyproject()["project"]
    assert sorted(_requirement_name(r) for r in project["dependencies"]) == [
        "ninja", "numpy", "pyyaml", "safetensors", "torch"]
    train = {_requirement_name(r) for r in project["optional-dependencies"]["train"]}
    assert {"diffusers", "transformers", "peft", "tensorboard", "tqdm", "pillow"} <= train
    # every module the CLI maps to the train extra is installed by it (PIL comes from pillow,
    # huggingface_hub with diffusers)
    assert {m.lower() for m, extra in cli.EXTRAS.items() if extra == "train"} - {"pil", "huggingface_hub"} <= train


def test_no_extra_names_torch_or_a_package_built_against_it():
    """torch/torchvision pins and the attention kernels (flash-attn and SageAttention build against the
    installed torch, xformers wheels target particular torch releases) are installed by hand, and
    image-reward cannot share the train extra's environment: docs/install.md says how."""
    banned = {"torch", "torchvision", "xformers", "flash-attn", "sageattention", "image-reward"}
    for extra, requirements in _pyproject()["project"]["optional-dependencies"].items():
        assert not banned & {_requirement_name(r) for r in requirements}, extra


def test_readme_set_up_commands_and_ci():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert commands == [
        'pip install torch==2.13.0 -e ".[train,dev]" && tempflow-fast train --config configs/shapes_tempflow.yaml',
        'pip install torch==2.13.0 -e ".[train,dev]" && python -m pytest -q tests',
    ]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    assert "Apache License\n                           Version 2.0, January 2004" in text
    for section in ("1. Definitions.", "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS"):
        assert section in text


def test_design_doc_has_the_sections_the_code_cites_and_its_paths_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    cited = set()
    for path in list((ROOT / "tempflow_fast").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py")) + \
            list((ROOT / "bench").glob("*.py")):
        for refs in re.findall(r"design\.md ((?:§\d(?:\.\d)?(?:, | and )?)+)", path.read_text()):
            cited |= set(re.findall(r"§\d(?:\.\d)?", refs))
    headings = set(re.findall(r"^#+ (§\d(?:\.\d)?) ", design, re.M))
    assert cited and cited <= headings, cited - headings
    named = set(re.findall(r"`((?:tempflow_fast|kernels|csrc|bench|configs|tests|docs)/[\w./-]*)`", design))
    assert len(named) > 10
    assert [p for p in sorted(named) if not (ROOT / p).exists()] == []
