"""Atomic, resumable checkpoints.

Layout: `<output_dir>/checkpoints/iter-000012/` holding
  model.safetensors      trainable weights (LoRA adapter weights only when LoRA is on)
  ema.safetensors        EMA shadow weights (when EMA is on)
  state.pt               optimizer, RNG states (python, numpy, torch, cuda), data position, counters: tensors,
                         numbers, strings, lists and dicts only, read back with torch.load(weights_only=True)
  config.yaml            the resolved config of the run
  deepspeed/             DeepSpeed's per-rank shards (distributed.backend: deepspeed; training/zero.py), with
                         DeepSpeed's zero_to_fp32.py beside it
  COMPLETE               written last: the iteration, then every other file with its size in bytes; a folder
                         without it is not a checkpoint

A checkpoint is written into `iter-000012.tmp-<pid>/`, flushed, then renamed into place (rename is atomic
on POSIX), so a kill at any moment leaves either the previous checkpoint or the new one, never a torn one.
A write that fails (disk full) removes its temporary folder and raises `CheckpointWriteError`.
Files written by several processes (DeepSpeed's shards) go first into `iter-000012.staging/`
(`staging_dir`), which `save_checkpoint(staged=...)` then completes and renames the same way.
Only the newest `keep_last` complete checkpoints are kept; pruning removes a folder's COMPLETE first, so
a pruning cut short leaves no folder that claims to be complete and is not.

Reading (`load_checkpoint`) checks every file against the sizes COMPLETE lists and loads state.pt with
`weights_only=True`: a file that cannot be read is a `CorruptCheckpoint` (`load_latest` falls back to the
previous complete checkpoint), a state.pt naming a Python global (a pickle that would run code when
loaded) an `UnsafeCheckpoint`, never unpickled.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^iter-(\d{6,})$")
_TEMPORARY = re.compile(r"^iter-\d{6,}\.(tmp-\d+|staging)$")
COMPLETE = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from."""


class CorruptCheckpoint(CheckpointError):
    """A file of the checkpoint is missing, truncated or unreadable."""


class UnsafeCheckpoint(CheckpointError):
    """state.pt names Python globals: unpickling it would run code, so it is refused unread."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full); its temporary folder was removed."""


def rng_state() -> Dict[str, Any]:
    """Every RNG state as tensors and plain numbers (what a weights-only load reads back)."""
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_state(obj: Any, where: str = "state") -> Any:
    """`obj` as what a weights-only load reads back (tensors, numbers, strings, None, lists, tuples, dicts): numpy
    scalars and arrays become numbers and tensors; anything else is a TypeError, raised before a checkpoint is
    written that --resume would refuse."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    for kind in (bool, int, float, str):  # subclasses (numpy's float64 is a float) pickle as their own class
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, dict):
        return {plain_state(k, where): plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into state.pt (tensors, numbers, strings, lists "
                    f"and dicts only, so that a weights-only load reads it back)")


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


def remove_temporary(root: str | Path) -> List[Path]:
    """Remove the `.tmp-<pid>` and `.staging` folders interrupted writes left under `root` (call it while no
    other process of this run writes: at start and at the end); returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir() if _TEMPORARY.match(p.name) and p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def remove_checkpoint(path: Path) -> None:
    """COMPLETE first, so a removal cut short never leaves a folder that claims to be a checkpoint."""
    marker = Path(path) / COMPLETE
    if marker.exists():
        marker.unlink()
        _fsync_dir(Path(path))
    shutil.rmtree(path, ignore_errors=True)


def _manifest(folder: Path) -> List[Tuple[str, int]]:
    files = []
    for parent, _, names in os.walk(folder):
        for name in names:
            p = Path(parent) / name
            files.append((p.relative_to(folder).as_posix(), p.stat().st_size))
    return sorted(files)


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
    `staging_dir` already holding other processes' files, completed and renamed with the rest.
    CheckpointWriteError when a write fails (nothing of this checkpoint is left behind)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    state = plain_state(state)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{iteration:06d}"
    tmp = Path(staged) if staged is not None else root / f"{final.name}.tmp-{os.getpid()}"
    try:
        if staged is None:
            clear_staging(tmp)
        save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(tmp / "ema.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        for folder, _, names in os.walk(tmp):
            for name in names:
                with open(Path(folder) / name, "rb") as fh:
                    os.fsync(fh.fileno())
        listing = "".join(f"{name} {size}\n" for name, size in _manifest(tmp))
        with open(tmp / COMPLETE, "w") as fh:
            fh.write(f"{iteration}\n{listing}")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"the newest complete checkpoint is still {str(previous)!r}" if previous else "no checkpoint was kept"
        hint = "; free disk space or lower checkpoint.keep_last" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise CheckpointWriteError(f"cannot write checkpoint {final.name} under {str(root)!r}: "
                                   f"{err.strerror or err} ({kept}){hint}") from err
    if final.exists():  # re-saving the same iteration (e.g. after a resume): replace it
        remove_checkpoint(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        remove_checkpoint(old)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _check_manifest(path: Path) -> None:
    """The files COMPLETE lists are there with their sizes (checkpoints written before the listing: no check)."""
    lines = (path / COMPLETE).read_text().splitlines()
    for line in lines[1:]:
        name, _, size = line.rpartition(" ")
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if f.stat().st_size != int(size):
            raise CorruptCheckpoint(f"{name} is {f.stat().st_size} bytes, COMPLETE lists {size}")


def _load_state(file: Path) -> Dict[str, Any]:
    """state.pt through the weights-only unpickler: tensors, numbers, strings, lists, tuples and dicts."""
    try:
        # map_location: every rank reads onto the host (no rank's tensors land on cuda:0); the optimizer's
        # load_state_dict moves them to the parameters
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:
            raise UnsafeCheckpoint(f"state.pt names the Python global {found.group(1)}, which a weights-only "
                                   f"load refuses: unpickling it would run code (a file this trainer did not "
                                   f"write, or one from an older version)") from None
        raise CorruptCheckpoint(f"state.pt is not a readable state ({str(err).strip().splitlines()[-1]})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CorruptCheckpoint(f"state.pt is unreadable ({str(err).splitlines()[0]})") from None


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """{'model': tensors, 'ema': tensors or None, 'state': dict, 'config_yaml': str, 'config': that YAML as a
    dict}. CorruptCheckpoint / UnsafeCheckpoint (ValueErrors) say what is wrong with which file."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CorruptCheckpoint(f"{str(path)!r} is not a complete checkpoint (no COMPLETE marker)")
    try:
        _check_manifest(path)
        ema = path / "ema.safetensors"
        data = {
            "model": load_file(str(path / "model.safetensors"), device="cpu"),
            "ema": load_file(str(ema), device="cpu") if ema.is_file() else None,
            "state": _load_state(path / "state.pt"),
            "config_yaml": (path / "config.yaml").read_text(),
        }
        for part in ("model", "ema"):
            for name, t in (data[part] or {}).items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CorruptCheckpoint(f"{part}.safetensors: weight {name!r} holds non-finite values")
        data["config"] = yaml.safe_load(data["config_yaml"]) or {}
        if not isinstance(data["config"], dict):
            raise CorruptCheckpoint("config.yaml holds no config mapping")
    except CheckpointError as err:
        raise type(err)(f"checkpoint {str(path)!r}: {err}") from None
    except Exception as err:  # safetensors' errors, a missing file, an unreadable manifest
        raise CorruptCheckpoint(f"checkpoint {str(path)!r}: {type(err).__name__}: {err}") from None
    if not isinstance(data["state"], dict) or "iteration" not in data["state"]:
        raise CorruptCheckpoint(f"checkpoint {str(path)!r}: state.pt holds no training state")
    return data


def load_latest(root: str | Path, *, report: Callable[[str], None] = print,
                set_aside: bool = False) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """(path, contents) of the newest checkpoint under `root` that loads, or None when there is none.

    A corrupt newest checkpoint is skipped with a message naming it and the one used instead (`set_aside`:
    renamed to `iter-N.corrupt`, so pruning never keeps it in place of a good one); an UnsafeCheckpoint is
    raised, not skipped: a tampered folder is the user's to look at, not to resume around."""
    candidates = list_checkpoints(root)[::-1]
    skipped: List[Tuple[Path, CorruptCheckpoint]] = []
    for path in candidates:
        try:
            data = load_checkpoint(path)
        except CorruptCheckpoint as err:
            skipped.append((path, err))
            continue
        for _, err in skipped:
            report(f"[tempflow-fast] {err}; resuming from the previous complete checkpoint {str(path)!r} instead")
        _set_aside(skipped, set_aside, report)
        return path, data
    if skipped:
        reasons = "; ".join(str(err) for _, err in skipped)
        raise CorruptCheckpoint(f"no loadable checkpoint under {str(root)!r}: {reasons}")
    return None


def _set_aside(skipped, set_aside: bool, report: Callable[[str], None]) -> None:
    if not set_aside:
        return
    for bad, _ in skipped:
        aside = bad.with_name(bad.name + ".corrupt")
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(bad, aside)
        report(f"[tempflow-fast] moved the unreadable checkpoint to {str(aside)!r}")
