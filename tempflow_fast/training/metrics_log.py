"""Metrics to JSONL (one object per iteration, appended and flushed) and TensorBoard.

A new run starts an empty metrics.jsonl; a resumed one keeps the lines up to the iteration it resumes from and
drops the rest, including a last line a kill cut short (the file is rewritten atomically, so a kill during that
leaves the old file)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional


def lines_up_to(path: Path, iteration: int) -> List[str]:
    """The whole lines of `path` logged at or before `iteration`; a torn or unreadable line is dropped with a
    message (a kill can cut the last line short)."""
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
            kept.append(line)
    if torn:
        print(f"[tempflow-fast] {str(path)!r}: dropped {torn} torn line(s) (a run killed while writing)", flush=True)
    return kept


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, resume_from: Optional[int] = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.dir / "metrics.jsonl"
        if resume_from is not None and self.jsonl_path.exists():
            # drop lines from iterations after the checkpoint we resume from, so the log stays one history
            kept = lines_up_to(self.jsonl_path, resume_from)
            tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
            with open(tmp, "w") as fh:
                fh.write("".join(l + "\n" for l in kept))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.jsonl_path)
        self._fh = open(self.jsonl_path, "a" if resume_from is not None else "w")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_from + 1 if resume_from is not None else None)

    def log(self, iteration: int, metrics: Dict[str, Any]) -> None:
        row = {"iteration": iteration, **metrics}
        self._fh.write(json.dumps(row, default=float) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, iteration)
            self._tb.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
