from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from tempflow_fast.config import config_to_dict, load_config


@dataclass
class Train:
    learning_rate: float = 1e-4  # AdamW step size
    iterations: int = 10
    steps: tuple[int, ...] = (0, 1, 2)
    method: Literal["a", "b"] = "a"
    path: Optional[str] = None

    def validate(self):
        if self.learning_rate <= 0:
            raise ValueError(f"config field 'train.learning_rate': must be > 0, got {self.learning_rate}")


@dataclass
class Root:
    output_dir: str = "runs/x"
    train: Train = field(default_factory=Train)


def test_defaults_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  iterations: 5\n  steps: [3, 4]\n")
    cfg = load_config(Root, p, ["train.learning_rate=1e-3", "output_dir=runs/try", "train.method=b"])
    assert cfg.train.iterations == 5
    assert cfg.train.steps == (3, 4)
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.output_dir == "runs/try"
    assert cfg.train.method == "b"
    assert config_to_dict(cfg)["train"]["steps"] == [3, 4]
    assert load_config(Root, None, ["train.path=/x"]).train.path == "/x"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.learning_rate=fast", "train.learning_rate"),
        ("train.iterations=1.5", "train.iterations"),
        ("train.method=c", "train.method"),
        ("train.nope=1", "nope"),
        ("train.learning_rate=-1", "train.learning_rate"),
        ("noequals", "section.field=value"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        load_config(Root, None, [override])


def test_missing_file():
    with pytest.raises(ValueError, match="--config"):
        load_config(Root, "/nonexistent.yaml")
