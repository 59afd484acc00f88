"""One run per output folder.

- `RunLock`: `<output_dir>/run.lock`, held with `fcntl.flock` while a trainer lives and naming the holder's pid
  and host. The kernel drops a flock when its process dies, so the lock a killed run left behind is taken over
  (with a message naming that process) and a live run's is refused naming it. Where the file system has no
  flock, the pid / host in the file decide. Trainers of one process share the lock (a script that saves and
  resumes in one process); the last to release it removes the file.
- `claim`: a new run (no --resume) refuses a folder that holds anything but the lock, unless `overwrite`, which
  first removes what an earlier run wrote there (RUN_OUTPUTS; other files are left alone).
- `run_differences`: the settings that make a checkpoint another run's (RUN_IDENTITY and the active method's
  section), which `--resume` refuses naming them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

LOCK_NAME = "run.lock"
# what a trainer writes into output_dir (README "A run writes to output_dir")
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "samples", "final", "summary.json")
# dotted fields that make a run: a checkpoint written with other values is another run's
RUN_IDENTITY = ("seed", "method", "model.kind", "model.path", "data.train_prompts", "sampling.num_steps",
                "sampling.shift", "sampling.noise_level", "sampling.dynamic_shift", "train.lora.enabled",
                "train.lora.rank", "train.lora.alpha", "train.lora.target_modules")

_HELD: Dict[str, List] = {}  # lock path -> [fd, holders in this process]


class RunInUse(ValueError):
    """A live run holds the folder's lock; `holder` names it ("process N on host H", or "another process")."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class RunLock:
    """The lock of one output folder (see the module doc). `acquire` raises RunInUse (a ValueError) naming the
    holder when a live run holds it."""

    def __init__(self, folder: str | Path, report: Callable[[str], None] = print):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.key = os.path.realpath(self.path)
        self.report = report
        self.held = False

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            self.held = True
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            try:  # the file may have been removed by a holder that released it just now: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _holder(_read(fd))
        if previous is not None:
            how = "its process is gone" if locked else "its process is not running (no flock on this file system)"
            self.report(f"[tempflow-fast] taking over the lock of {previous} on {str(self.folder)!r}: {how}")
        os.ftruncate(fd, 0)  # at offset 0: _read left the offset at the old holder's end (NULs before ours)
        os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        _HELD[self.key] = [fd, 1]
        self.held = True
        return self

    def _flock(self, fd: int) -> bool:
        """True when flock took the lock; False when the file system has no flock and the pid / host in the file
        say its writer is gone. ValueError naming the holder when a live run holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _holder(_read(fd)) or "another process"
            raise RunInUse(f"output_dir {str(self.folder)!r} is in use by {holder} ({str(self.path)!r}): one "
                           f"run per folder; wait for it to end or choose another output_dir", holder) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
        info = _parse(_read(fd))
        if info and (info["host"] != socket.gethostname() or _alive(info["pid"])):
            holder = _holder(_read(fd))
            raise RunInUse(f"output_dir {str(self.folder)!r} is in use by {holder} "
                           f"({str(self.path)!r}; this file system has no flock, so the lock file decides: "
                           f"remove it if that run is gone)", holder)
        return False

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = _HELD.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[self.key]
        try:
            os.unlink(self.path)  # while still locked: a process waiting on the old file retries on a new one
        except FileNotFoundError:
            pass
        try:
            fcntl.flock(entry[0], fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(entry[0])


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace")


def _parse(text: str) -> Optional[Dict[str, Any]]:
    parts = text.split()
    if len(parts) >= 4 and parts[0] == "pid" and parts[1].isdigit() and parts[2] == "host":
        return {"pid": int(parts[1]), "host": parts[3]}
    return None


def _holder(text: str) -> Optional[str]:
    info = _parse(text)
    return None if info is None else f"process {info['pid']} on host {info['host']}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(folder: str | Path, *, resume: bool, overwrite: bool, report: Callable[[str], None] = print) -> None:
    """Check (and with `overwrite` clear) the output folder of a run that holds its lock. A new run refuses a
    folder with anything in it but the lock; `resume` leaves the folder as it is (the caller loads from it)."""
    folder = Path(folder)
    if resume:
        return
    present = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else []
    if not present:
        return
    if not overwrite:
        shown = ", ".join(f"{n}/" if (folder / n).is_dir() else n for n in present[:4])
        more = f" and {len(present) - 4} more" if len(present) > 4 else ""
        raise ValueError(f"output_dir {str(folder)!r} is not empty ({shown}{more}): continue that run with --resume, "
                         f"or start afresh with --overwrite (removes its checkpoints, logs and final model), "
                         f"or choose another output_dir")
    removed = [n for n in RUN_OUTPUTS if (folder / n).exists()]
    for name in removed:
        p = folder / name
        if name == "checkpoints":  # COMPLETE before the files of each checkpoint, as pruning does
            from tempflow_fast.training.checkpoint import list_checkpoints, remove_checkpoint

            for c in list_checkpoints(p):
                remove_checkpoint(c)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if removed:
        report(f"[tempflow-fast] --overwrite: removed {', '.join(removed)} from {str(folder)!r}")


def _get(tree: Dict, dotted: str):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def run_differences(saved: Dict, current: Dict) -> List[str]:
    """'field: X in the checkpoint, Y now' for each identity field (RUN_IDENTITY, and every field of the active
    method's section) that differs between two config dicts (yaml-loaded). Fields an older checkpoint lacks are
    not compared."""
    method = current.get("method")
    fields = list(RUN_IDENTITY)
    section = current.get(method)
    if isinstance(section, dict):
        fields += [f"{method}.{name}" for name in section]
    out = []
    for f in fields:
        before, now = _get(saved, f), _get(current, f)
        if before is _MISSING or now is _MISSING or before == now:
            continue
        out.append(f"{f}: {before!r} in the checkpoint, {now!r} now")
    return out
