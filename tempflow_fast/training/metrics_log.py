"""Metrics to JSONL (one object per iteration, appended and flushed) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, resume_from: Optional[int] = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.dir / "metrics.jsonl"
        if resume_from is not None and self.jsonl_path.exists():
            # drop lines from iterations after the checkpoint we resume from, so the log stays one history
            kept = [l for l in self.jsonl_path.read_text().splitlines() if l and json.loads(l).get("iteration", 0) <= resume_from]
            self.jsonl_path.write_text("".join(l + "\n" for l in kept))
        self._fh = open(self.jsonl_path, "a")
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
