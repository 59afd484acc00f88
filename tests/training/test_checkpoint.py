import os
import signal
import subprocess
import sys
import textwrap

import torch

from tempflow_fast.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from tempflow_fast.training.ema import EMA


def _save(root, it, value):
    return save_checkpoint(
        root, it, model_state={"w": torch.full((3,), float(value))}, state={"iteration": it}, config_yaml="a: 1\n", keep_last=2
    )


def test_keep_last_and_latest(tmp_path):
    for it in (1, 2, 3):
        _save(tmp_path, it, it)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["iter-000002", "iter-000003"]
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck["state"]["iteration"] == 3 and ck["model"]["w"][0] == 3


def test_kill_during_write_keeps_previous(tmp_path):
    _save(tmp_path, 1, 1.0)
    # A child starts checkpoint 2 and is SIGKILLed while writing state.pt (torch.save made slow).
    code = textwrap.dedent(
        f"""
        import time, torch
        import tempflow_fast.training.checkpoint as ck
        real = torch.save
        def slow(obj, f):
            print("writing", flush=True)
            time.sleep(60)
            real(obj, f)
        ck.torch.save = slow
        ck.save_checkpoint({str(tmp_path)!r}, 2, model_state={{"w": torch.zeros(3)}}, state={{"iteration": 2}}, config_yaml="")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "iter-000001"
    assert load_checkpoint(latest)["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    # the torn temp folder is not mistaken for a checkpoint, and the next save still works
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())
    _save(tmp_path, 2, 2.0)
    assert latest_checkpoint(tmp_path).name == "iter-000002"


def test_ema_update_and_swap():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([("p", p)], decay=0.5)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()
    assert ema.shadow["p"].tolist() == [1.0, 1.0]
    ema.swap()
    assert p.tolist() == [1.0, 1.0]
    ema.swap()
    assert p.tolist() == [2.0, 2.0]
