"""One run per output folder (issue 18 item 3): a second run into a finished run's folder is refused and leaves it
byte-identical; --resume refuses another run's checkpoint naming the fields; --overwrite starts afresh; a live
run's lock is refused naming its process, a dead run's lock is taken over."""

import errno
import fcntl
import os
import socket
import subprocess
import sys

import pytest

from tempflow_fast.training import run_dir
from tempflow_fast.training.checkpoint import list_checkpoints

from .runs import metrics_rows, one_line_error, small_trainer, snapshot_files, train_cli


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-iteration run (checkpoint, metrics, final model)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_cli(out) == 0
    return out


def test_a_second_run_into_a_finished_run_s_folder_is_refused_and_changes_nothing(finished, capsys):
    before = snapshot_files(finished)
    assert train_cli(finished) == 2
    line = one_line_error(capsys)
    assert f"output_dir '{finished}' is not empty" in line and "--resume" in line and "--overwrite" in line, line
    assert snapshot_files(finished) == before  # metrics.jsonl, checkpoints, final/: byte for byte


@pytest.mark.parametrize("override, field", [
    ("seed=1", "seed"),
    ("method=stepwise", "method"),
    ("sampling.num_steps=4", "sampling.num_steps"),
    ("flow_grpo.group_size=4", "flow_grpo.group_size"),
    ("sampling.noise_level=0.5", "sampling.noise_level"),
    ("train.lora.enabled=true", "train.lora.enabled"),
])
def test_resume_refuses_another_run_s_checkpoint_naming_the_field(finished, capsys, no_model_load, override, field):
    before = snapshot_files(finished)
    assert train_cli(finished, override, flags=["--resume"]) == 2
    line = one_line_error(capsys)
    assert "belongs to another run" in line and f"{field}: " in line, line
    assert snapshot_files(finished) == before


def test_resume_names_every_differing_field(finished, capsys, no_model_load):
    assert train_cli(finished, "seed=3", "sampling.num_steps=5", flags=["--resume"]) == 2
    line = one_line_error(capsys)
    assert "seed: 0 in the checkpoint, 3 now" in line and "sampling.num_steps: 3 in the checkpoint, 5 now" in line


def test_resume_accepts_settings_that_do_not_make_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out) == 0
    assert train_cli(out, "train.iterations=2", "train.learning_rate=5e-4", flags=["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["iteration"] for r in metrics_rows(out) if "loss" in r] == [1, 2]


def test_overwrite_starts_afresh_and_keeps_files_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "train.iterations=2") == 0
    (out / "notes.txt").write_text("mine")
    assert train_cli(out, flags=["--overwrite"]) == 0
    assert "--overwrite: removed checkpoints, metrics.jsonl" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["iter-000001"]
    assert [r["iteration"] for r in metrics_rows(out) if "loss" in r] == [1]
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cli(tmp_path, flags=["--resume", "--overwrite"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys, no_model_load):
    assert train_cli(tmp_path / "run", flags=["--resume"]) == 2
    assert "no complete checkpoint" in one_line_error(capsys)


HOLD_LOCK = """
import sys, time
from tempflow_fast.training.run_dir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_folder_locked_by_a_live_run_is_refused_naming_it(tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train_cli(out) == 2
        line = one_line_error(capsys)
        assert f"is in use by process {holder.pid} on host {socket.gethostname()}" in line, line
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # SIGKILL: run.lock stays behind, naming a dead process
    holder.wait(timeout=30)
    assert f"pid {holder.pid}" in (out / "run.lock").read_text()
    assert train_cli(out) == 0  # the folder holds only the stale lock: still a fresh folder
    stdout = capsys.readouterr().out
    assert f"taking over the lock of process {holder.pid}" in stdout and "its process is gone" in stdout
    assert not (out / "run.lock").exists()  # released at the end of the run


def test_a_taken_over_lock_names_its_new_holder_exactly(tmp_path):
    """The lock file of a killed run is rewritten from offset 0: the next run reads the new holder's pid (a
    takeover once wrote it after NULs the length of the old line, and the next run said 'another process')."""
    (tmp_path / "run.lock").write_text("pid 999999 host some-longer-host-name-than-this-one\n")  # stale, no flock
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert "taking over the lock of process 999999" in holder.stdout.readline()
        assert holder.stdout.readline().strip() == "locked"
        assert (tmp_path / "run.lock").read_text() == f"pid {holder.pid} host {socket.gethostname()}\n"
        with pytest.raises(ValueError, match=f"in use by process {holder.pid} on host {socket.gethostname()}"):
            run_dir.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / "run.lock").write_text(f"pid {os.getppid()} host {socket.gethostname()}\n")  # alive
    with pytest.raises(ValueError, match=f"in use by process {os.getppid()}.*no flock"):
        run_dir.RunLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(f"pid {dead.pid} host {socket.gethostname()}\n")
    messages = []
    lock = run_dir.RunLock(tmp_path, report=messages.append).acquire()
    # exactly our line, from offset 0: a takeover once wrote it after the old holder's length of NULs, which
    # _parse could not read, so the next run took this live run's lock as a dead one's
    text = (tmp_path / "run.lock").read_text()
    assert text == f"pid {os.getpid()} host {socket.gethostname()}\n"
    assert run_dir._parse(text) == {"pid": os.getpid(), "host": socket.gethostname()}
    assert messages and f"process {dead.pid}" in messages[0]
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_trainers_of_one_process_share_the_lock_and_the_last_releases_it(tmp_path):
    """A script that saves and resumes in one process (the exact-resume tests do) is one run."""
    first = small_trainer(tmp_path, "train.iterations=1")
    first.train()
    assert not (tmp_path / "run.lock").exists()
    second = small_trainer(tmp_path, "train.iterations=2", resume=True)
    third = small_trainer(tmp_path, "train.iterations=2", resume=True)
    assert (tmp_path / "run.lock").exists()
    second.close()
    assert (tmp_path / "run.lock").exists()
    third.close()
    assert not (tmp_path / "run.lock").exists()


def test_a_run_refused_after_taking_the_lock_releases_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        small_trainer(tmp_path)
    assert not (tmp_path / "run.lock").exists()
    lock = run_dir.RunLock(tmp_path).acquire()  # free for the next run
    lock.release()


def test_a_lock_file_replaced_while_locking_is_locked_again(tmp_path, monkeypatch):
    """Between open and flock the holder may release (removing run.lock) and a third run create a new one: the
    flock then holds a removed file, so acquire retries on the file the path names now."""
    real_flock, calls = fcntl.flock, []

    def replaced_first(fd, op):
        if not calls:
            os.unlink(tmp_path / "run.lock")
            (tmp_path / "run.lock").write_text("")
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", replaced_first)
    lock = run_dir.RunLock(tmp_path).acquire()
    held_fd = run_dir._HELD[lock.key][0]
    assert len(calls) == 2 and os.stat(tmp_path / "run.lock").st_ino == os.fstat(held_fd).st_ino
    lock.release()
