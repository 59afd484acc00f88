"""Every command's --help is complete: a description that ends a sentence, help for every option, no markdown
backticks, no issue numbers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tempflow_fast import cli

REPO = Path(__file__).resolve().parents[1]
HELPS = [["-m", "tempflow_fast.cli", name, "--help"] for name in cli.COMMANDS] + [
    ["-m", "tempflow_fast.cli", "prompts", "geneval", "--help"],
    ["-m", "tempflow_fast.rewards.serve", "--help"],
    ["-m", "tempflow_fast.kernels.aot", "--help"],
    *[[str(p.relative_to(REPO)), "--help"] for p in sorted((REPO / "bench").glob("*.py"))],
]


def problems(text: str) -> list:
    """What is incomplete in an argparse --help text."""
    found = []
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if not line.strip())  # the blank line after usage
    end = next(i for i, line in enumerate(lines) if i > start and re.match(r"^(options|positional arguments):", line))
    paragraph = []  # the description's first paragraph (a raw description may go on with examples)
    for line in lines[start + 1:end]:
        if not line.strip():
            break
        paragraph.append(line.strip())
    description = " ".join(paragraph)
    if not description:
        found.append("no description")
    elif not description.endswith((".", ".)")):
        found.append(f"description does not end a sentence: ...{description[-40:]!r}")
    if "`" in text:
        found.append("markdown backticks")
    if re.search(r"\b[Ii]ssue \d", text):
        found.append("an issue number")
    for i, line in enumerate(lines[end:], end):
        if not re.match(r"^  -", line):
            continue
        invocation_only = not re.search(r"\S {2,}\S", line.strip())
        continued = i + 1 < len(lines) and lines[i + 1].startswith(" " * 10)
        if invocation_only and not continued:
            found.append(f"no help for {line.strip()}")
    return found


def test_the_checker_sees_the_known_problems():
    text = ("usage: x [-h] [--seed SEED]\n\nOne step on random data,\n\noptions:\n  -h, --help   show this help "
            "message and exit\n  --seed SEED\n  --steps STEPS  T\n")
    assert problems(text) == ["description does not end a sentence: ...'One step on random data,'",
                              "no help for --seed SEED"]
    assert problems("usage: x\n\nIssue 8: the `methods`.\n\noptions:\n  -h  show help\n") == [
        "markdown backticks", "an issue number"]


@pytest.mark.parametrize("argv", HELPS, ids=lambda argv: " ".join(a for a in argv if a not in ("-m", "--help")))
def test_help_is_complete(argv):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert problems(proc.stdout) == [], proc.stdout
