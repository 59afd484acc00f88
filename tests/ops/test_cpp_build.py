"""The C++ extension's on-demand build (issue 18 item 4, issue 16 item 7): a cache directory keyed
by the sources, torch and the compiler flags; a build killed with SIGKILL does not make later runs
wait forever on its lock; a message while it builds. Nothing here compiles: the lock is exercised
directly and torch's loader is replaced where a build would start."""

import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tempflow_fast.ops import cpp_backend


def _source(tmp_path, text="int f() { return 1; }\n"):
    path = tmp_path / "src" / "flow_grpo_ops.cpp"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def test_cache_key_follows_sources_torch_and_flags(tmp_path, monkeypatch):
    src = _source(tmp_path)
    key = cpp_backend.cache_key([src])
    assert key == cpp_backend.cache_key([src]) and len(key) == 16
    _source(tmp_path, "int f() { return 2; }\n")
    changed = cpp_backend.cache_key([src])
    assert changed != key  # an edited (or another version's) source builds elsewhere
    assert cpp_backend.cache_key([src], cflags=["-O2", "-fopenmp"]) != changed
    assert cpp_backend.cache_key([src], ldflags=[]) != changed
    assert cpp_backend.cache_key([src], compiler="clang++") != changed
    monkeypatch.setattr(cpp_backend.torch, "__version__", "9.9.9")
    assert cpp_backend.cache_key([src]) != changed


def test_build_directory_is_keyed_and_honours_torch_extensions_dir(tmp_path, monkeypatch):
    src = _source(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build_dir = cpp_backend.build_directory([src])
    assert os.path.dirname(build_dir) == str(tmp_path / "ext")
    assert build_dir.endswith("_" + cpp_backend.cache_key([src]))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert cpp_backend.build_directory([src]).startswith(os.path.expanduser("~/.cache/tempflow_fast/"))
    # the installed sources: the same key as hashing them by hand
    installed = cpp_backend.build_directory()
    with cpp_backend._source_paths() as paths:
        assert installed.endswith(cpp_backend.cache_key(paths))


_HOLDER = textwrap.dedent("""
    import os, sys, time
    from tempflow_fast.ops import cpp_backend
    build_dir, leave_torch_lock, hold_s = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    with cpp_backend.build_lock(build_dir):
        if leave_torch_lock:  # what torch's loader creates while it builds
            open(os.path.join(build_dir, "lock"), "w").close()
        print("holding", flush=True)
        time.sleep(hold_s)
""")


def _holder(build_dir, leave_torch_lock, hold_s):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(build_dir), "1" if leave_torch_lock else "0",
                             str(hold_s)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_build_killed_with_sigkill_leaves_no_lock_that_blocks(tmp_path):
    """kill -9 during a build: torch's lock file stays behind (it made every later run wait forever);
    the next build lock finds no live holder, removes it and says whose it was."""
    build_dir = tmp_path / "build"
    proc = _holder(build_dir, leave_torch_lock=True, hold_s=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (build_dir / "lock").exists()
    out = io.StringIO()
    start = time.monotonic()
    with cpp_backend.build_lock(str(build_dir), out=out):
        assert not (build_dir / "lock").exists()
    assert time.monotonic() - start < 5
    message = out.getvalue()
    assert "removing the stale lock" in message and f"pid {proc.pid}" in message and "killed" in message
    # released cleanly: the next one neither waits nor reports anything
    out = io.StringIO()
    with cpp_backend.build_lock(str(build_dir), out=out):
        pass
    assert out.getvalue() == ""


def test_a_live_build_is_waited_for_with_a_message(tmp_path):
    build_dir = tmp_path / "build"
    proc = _holder(build_dir, leave_torch_lock=False, hold_s=1.5)
    out = io.StringIO()
    start = time.monotonic()
    with cpp_backend.build_lock(str(build_dir), out=out):
        assert time.monotonic() - start > 1.0  # acquired only once the holder let go
    proc.wait(timeout=30)
    assert f"waiting for the C++ ops build of pid {proc.pid}" in out.getvalue()
    assert "stale" not in out.getvalue()


def test_first_use_build_says_so_and_clears_a_stale_lock(tmp_path, monkeypatch, capsys):
    """load() on an empty cache: one line before the build (which takes ~1 min) and one after;
    torch's loader starts only after a stale lock of a killed build was removed."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: load() stops before the build")
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setitem(sys.modules, "tempflow_fast._C", None)  # no prebuilt extension
    monkeypatch.setattr(cpp_backend, "_module", None)
    monkeypatch.setattr(cpp_backend, "_error", None)
    build_dir = cpp_backend.build_directory()
    os.makedirs(build_dir)
    open(os.path.join(build_dir, "lock"), "w").close()
    calls = []

    def fake_load(name, sources, build_directory, **kwargs):
        calls.append((build_directory, os.path.exists(os.path.join(build_directory, "lock"))))
        return "the module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert cpp_backend.load() == "the module"
    assert calls == [(build_dir, False)]
    err = capsys.readouterr().err
    assert "building the C++ ops (first use, ~1 min)" in err and build_dir in err
    assert "removing the stale lock" in err and "built the C++ ops in" in err


def test_sources_from_a_checkout_when_the_csrc_package_is_not_mapped(monkeypatch):
    """Run from a source checkout (`python bench/...` in a clone, or an editable install that points at another
    checkout) `tempflow_fast.csrc` does not import: the sources are the checkout's csrc/, the same files, so the
    build key is the installed one's and nothing falls back to the reference ops."""
    with cpp_backend._source_paths() as paths:
        installed = [open(p, "rb").read() for p in paths]
    real = cpp_backend.resources.files

    def files(package):
        if package == "tempflow_fast.csrc":
            raise ModuleNotFoundError("No module named 'tempflow_fast.csrc'")
        return real(package)

    monkeypatch.setattr(cpp_backend.resources, "files", files)
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    with cpp_backend._source_paths() as paths:
        assert [os.path.dirname(p) for p in paths] == [checkout] * len(paths)
        assert [open(p, "rb").read() for p in paths] == installed
    # without a checkout beside the package, the import error is what the caller sees
    monkeypatch.setattr(cpp_backend.os.path, "isfile", lambda path: False)
    with pytest.raises(ModuleNotFoundError, match="tempflow_fast.csrc"):
        with cpp_backend._source_paths():
            pass
