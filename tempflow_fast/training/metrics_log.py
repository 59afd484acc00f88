"""Metrics to JSONL (one object per iteration, appended and flushed), TensorBoard, and optionally an experiment
tracker (`log.tracker`: wandb, or trackio with the same API) for scalars and captioned images.

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
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, resume_from: Optional[int] = None,
                 tracker: str = "none", project: str = "tempflow-fast", run_name: Optional[str] = None,
                 config: Optional[Dict[str, Any]] = None):
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
        self._tracker = None
        if tracker != "none":
            import importlib

            self._tracker = importlib.import_module(tracker)
            # one run id per output folder, so a resumed run continues the tracker's run
            id_file = self.dir / f"{tracker}_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else None
            kwargs = dict(project=project, name=run_name or self.dir.name, config=config or {})
            if tracker == "wandb":
                import uuid

                run_id = run_id or uuid.uuid4().hex[:12]
                kwargs.update(id=run_id, resume="allow", dir=str(self.dir))
                id_file.write_text(run_id)
            self._tracker.init(**kwargs)

    def log(self, iteration: int, metrics: Dict[str, Any]) -> None:
        row = {"iteration": iteration, **metrics}
        self._fh.write(json.dumps(row, default=float) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, iteration)
            self._tb.flush()
        if self._tracker is not None:
            self._tracker.log({k: v for k, v in metrics.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=iteration)

    def log_image(self, iteration: int, tag: str, image, caption: str = "") -> None:
        """A PIL image to TensorBoard and the tracker (the PNG on disk is the caller's)."""
        if self._tb is not None:
            import numpy as np

            self._tb.add_image(tag, np.asarray(image.convert("RGB")), iteration, dataformats="HWC")
            self._tb.flush()
        if self._tracker is not None:
            self._tracker.log({tag: self._tracker.Image(image, caption=caption)}, step=iteration)

    def close(self) -> None:
        """Close the files and end the tracker's run (once: closing again does nothing)."""
        if self._fh.closed:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._tracker is not None:
            self._tracker.finish()
