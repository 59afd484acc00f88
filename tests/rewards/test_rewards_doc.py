"""docs/rewards.md stays in step with the code: every reward name is documented, its YAML examples are
valid `reward:` sections, and the serve options it names exist."""

import re
from pathlib import Path

import yaml

from tempflow_fast.config import load_config
from tempflow_fast.rewards import REWARD_NAMES, RewardConfig
from tempflow_fast.rewards.config import check_reward_reachable

DOC = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()


def test_every_reward_name_has_a_row():
    rows = set(re.findall(r"^\| `(\w+)` \|", DOC, flags=re.M))
    assert rows == set(REWARD_NAMES)


def test_yaml_examples_are_valid_reward_sections(tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, flags=re.S)
    assert blocks
    for block in blocks:
        path = tmp_path / "reward.yaml"
        path.write_text(yaml.safe_dump(yaml.safe_load(block)["reward"]))
        load_config(RewardConfig, path).validate()
    inline = [t for t in re.findall(r"`reward: (\{name: server.*?\})`", DOC.replace("\n", " ")) if "..." not in t]
    assert len(inline) >= 3
    for text in inline:
        cfg = RewardConfig(**yaml.safe_load(text))
        cfg.validate()
        assert cfg.name == "server" and cfg.url.startswith("http")


def test_serve_options_named_in_the_doc_exist(capsys):
    from tempflow_fast.rewards.serve import main

    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", DOC)) - {"--no-deps", "--no-build-isolation"}
    assert {"--reward", "--token", "--max-pixels", "--request-timeout-s", "--host", "--port"} <= options
    try:
        main(["--help"])
    except SystemExit:
        pass
    help_text = capsys.readouterr().out
    assert [o for o in sorted(options) if o not in help_text] == []
    assert check_reward_reachable.__name__ in DOC
