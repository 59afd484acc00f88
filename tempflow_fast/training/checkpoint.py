"""Atomic, resumable checkpoints.

Layout: `<output_dir>/checkpoints/iter-000012/` holding
  model.safetensors      trainable weights (LoRA adapter weights only when LoRA is on)
  ema.safetensors        EMA shadow weights (when EMA is on)
  state.pt               optimizer, RNG states (python, numpy, torch, cuda), data position, counters
  config.yaml            the resolved config of the run
  deepspeed/             DeepSpeed's per-rank shards (distributed.backend: deepspeed; training/zero.py), with
                         DeepSpeed's zero_to_fp32.py beside it
  COMPLETE               written last; a folder without it is not a checkpoint

A checkpoint is written into `iter-000012.tmp-<pid>/`, flushed, then renamed into place (rename is atomic
on POSIX), so a kill at any moment leaves either the previous checkpoint or the new one, never a torn one.
Files written by several processes (DeepSpeed's shards) go first into `iter-000012.staging/`
(`staging_dir`), which `save_checkpoint(staged=...)` then completes and renames the same way.
Only the newest `keep_last` complete checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^iter-(\d{6,})$")


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def staging_dir(root: str | Path, iteration: int) -> Path:
    """Where every process of a run writes its part of checkpoint `iteration` before it is completed (the same
    name on every rank; never a checkpoint itself: `list_checkpoints` does not match it)."""
    return Path(root) / f"iter-{iteration:06d}.staging"


def clear_staging(path: Path) -> None:
    """An empty staging folder (a previous, interrupted write's leftovers removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def save_checkpoint(
    root: str | Path,
    iteration: int,
    *,
    model_state: Dict[str, torch.Tensor],
    state: Dict[str, Any],
    config_yaml: str,
    ema_state: Optional[Dict[str, torch.Tensor]] = None,
    keep_last: int = 2,
    staged: Optional[Path] = None,
) -> Path:
    """Write checkpoint `iteration` atomically under `root`; returns its final path. `staged`: the
    `staging_dir` already holding other processes' files, completed and renamed with the rest."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{iteration:06d}"
    if staged is not None:
        tmp = Path(staged)
    else:
        tmp = root / f"{final.name}.tmp-{os.getpid()}"
        clear_staging(tmp)
    save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
    if ema_state is not None:
        save_file(_contiguous(ema_state), str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    with open(tmp / "COMPLETE", "w") as fh:
        fh.write(f"{iteration}\n")
        fh.flush()
        os.fsync(fh.fileno())
    for folder, _, names in os.walk(tmp):
        for name in names:
            with open(Path(folder) / name, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # re-saving the same iteration (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """{'model': tensors, 'ema': tensors or None, 'state': dict, 'config_yaml': str}."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"{str(path)!r} is not a complete checkpoint (no COMPLETE marker)")
    ema = path / "ema.safetensors"
    return {
        "model": load_file(str(path / "model.safetensors"), device="cpu"),
        "ema": load_file(str(ema), device="cpu") if ema.is_file() else None,
        # our own file: optimizer state and RNG states need full unpickling. map_location: every rank reads onto
        # the host (no rank's tensors land on cuda:0); the optimizer's load_state_dict moves them to the params.
        "state": torch.load(path / "state.pt", weights_only=False, map_location="cpu"),
        "config_yaml": (path / "config.yaml").read_text(),
    }
