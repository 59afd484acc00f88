"""The README as a newcomer reads it: the first screen says what this is, shows the measured figures and the two
set-up commands (no seed statistics there), every repository path it names exists, and no command in it holds a
shell-breaking placeholder."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TOP = ("configs", "docs", "bench", "tempflow_fast", "kernels", "csrc", "tests")


def test_first_screen():
    first = "\n".join(README.splitlines()[:25])
    assert "aligns flow-matching text-to-image models" in first
    assert "| measured | result | command" in first and first.count("\n|") >= 6
    assert 'pip install torch==2.13.0 -e ".[train,dev]" && tempflow-fast train --config configs/shapes_tempflow.yaml' in first
    assert 'pip install torch==2.13.0 -e ".[train,dev]" && python -m pytest -q tests' in first
    assert "±" not in first and "MAIN_JOB_TIMES" not in README


def test_every_repository_path_named_exists():
    paths = set(re.findall(r"(?<![\w/.-])((?:%s)/[\w./-]*[\w/])" % "|".join(TOP), README))
    assert len(paths) > 20
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (REPO / image).is_file(), image


def test_no_shell_breaking_placeholders_in_commands():
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        assert not re.search(r"<[^>\n]*>", block), block
