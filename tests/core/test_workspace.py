"""medxfer.core.workspace: atomic replacement of workspace files, and the per-spec workspace lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import pytest
from medxfer.core.errors import MedxferError
from medxfer.core.workspace import LOCK_TIMEOUT_ENV, Workspace, WorkspaceBusy, atomic_path, write_text_atomic


def test_atomic_path_uses_a_unique_temp_name_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "a" / "manifest.parquet"
    with atomic_path(target) as t1, atomic_path(target) as t2:
        assert t1 != t2 and t1.parent == target.parent  # two writers never share a temp file
        t1.write_text("one")
        t2.write_text("two")
    assert target.read_text() == "one"  # the outer block finished last... and replaced whole
    with pytest.raises(RuntimeError), atomic_path(target) as t:
        t.write_text("half")
        raise RuntimeError
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["manifest.parquet"]
    write_text_atomic(target, "x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    write_text_atomic(tmp_path / "secret.csv", "x", mode=0o600)
    assert stat.S_IMODE((tmp_path / "secret.csv").stat().st_mode) == 0o600


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


HOLD = """
import sys, time
from medxfer.core.workspace import Workspace
with Workspace.for_spec(sys.argv[1], "spec").locked("ingest"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_stage_waits_then_refuses_naming_the_holder(tmp_path):
    ws = Workspace.for_spec(tmp_path, "spec")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        busy = rf"ingest \(pid {holder.pid}\) is writing it \(waited 0.5 s\)"
        with pytest.raises(WorkspaceBusy, match=busy), ws.locked("split", timeout_s=0.5):
            pass
        assert 0.5 <= time.monotonic() - t0 < 3
    finally:
        holder.kill()
        holder.wait()
    # A killed holder frees the lock at once (the kernel's flock), so no stale lock file blocks anyone.
    with ws.locked("split", timeout_s=2):
        assert "split (pid" in ws.lock_file.read_text()


def test_a_waiter_proceeds_once_the_holder_finishes_and_a_stage_may_reenter(tmp_path):
    ws = Workspace.for_spec(tmp_path, "spec")
    held, order = threading.Event(), []

    def hold() -> None:
        with ws.locked("ingest"):
            held.set()
            time.sleep(0.3)
            order.append("ingest done")

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    with ws.locked("split", timeout_s=10):
        order.append("split")
        with ws.locked("split"):  # the same thread again (a stage calling a stage): no self-deadlock
            order.append("nested")
    t.join()
    assert order == ["ingest done", "split", "nested"]


def test_lock_timeout_env(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(MedxferError, match=f"{LOCK_TIMEOUT_ENV}=30"), Workspace.for_spec(tmp_path, "spec").locked("x"):
        pass
