"""The run folder's lock: one live run per folder, stale locks taken over, leftovers removed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from qlora.errors import UsageError
from qlora.training.lock import clear_run_dir, run_lock
from test_train import REPO, TINY, home, run_cli  # noqa: F401  (home is a fixture)

sys.path.insert(0, str(REPO))  # tools/lock_race.py


def write_lock(run_dir, pid, host=None, started=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = {"pid": pid, "host": host or socket.gethostname(), "started": started or time.time()}
    (run_dir / "run.lock").write_text(json.dumps(owner))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.2)
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_held_and_released(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        owner = json.loads((run / "run.lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        (run / "metrics.jsonl").write_text("")
    assert not (run / "run.lock").exists() and (run / "metrics.jsonl").exists()
    with run_lock(tmp_path / "never"):
        pass
    assert not (tmp_path / "never").exists()  # a folder the lock made and nothing used is removed


def test_a_live_lock_is_refused(tmp_path, live_pid):
    write_lock(tmp_path, live_pid, started=time.time() - 1)  # the owner started before its lock
    with pytest.raises(UsageError, match=f"live run \\(pid {live_pid}"):
        with run_lock(tmp_path):
            pass
    write_lock(tmp_path, 1234, host="elsewhere")
    with pytest.raises(UsageError, match="host 'elsewhere'.*delete"):
        with run_lock(tmp_path):
            pass


def test_stale_locks_are_taken_over(tmp_path, live_pid, caplog):
    write_lock(tmp_path, dead_pid())
    with run_lock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    # A live pid that started after the lock was written is a reused pid: stale as well.
    write_lock(tmp_path, live_pid, started=time.time() - 3600)
    with run_lock(tmp_path):
        pass


def test_leftovers_of_a_killed_write_are_removed(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / ".step-000004.tmp-ab12cd").mkdir(parents=True)
    (ckpt / ".step-000002.old-x_9").mkdir()
    (ckpt / "step-000002").mkdir()
    (tmp_path / ".metrics.jsonl.k3j2.tmp").write_text("x")
    (tmp_path / "notes.tmp").write_text("mine")
    with run_lock(tmp_path):
        pass
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.tmp"]


def test_clear_run_dir_keeps_the_lock(tmp_path):
    with run_lock(tmp_path):
        (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
        (tmp_path / "metrics.jsonl").write_text("{}\n")
        clear_run_dir(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["run.lock"]


def test_cli_refuses_a_folder_in_use_even_with_overwrite(home, tmp_path, live_pid):
    run = tmp_path / "run"
    write_lock(run, live_pid, started=time.time() - 1)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = sorted(p.name for p in run.iterdir())
    for flag in ("--overwrite", "--resume"):
        result = run_cli("train", str(TINY), f"output.dir={run}", flag)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "in use by a live run" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in run.iterdir()) == before


def test_stale_lock_takeover_has_one_winner_when_processes_race(tmp_path):
    """Processes released together on a stale lock (a dead pid, or the empty lock a full disk
    leaves): in every trial exactly one holds it at a time. Before the takeover checked that the
    lock it broke was still the stale one, 54 of 200 two-process trials had two holders."""
    from tools.lock_race import race

    assert race(tmp_path, trials=40, processes=3) == []


def test_an_empty_lock_is_stale_after_the_settle_time_and_named_so(tmp_path, caplog):
    lock = tmp_path / "run.lock"
    lock.write_text("")  # what a full disk leaves after O_EXCL created it
    with pytest.raises(UsageError, match="starting") as err:
        with run_lock(tmp_path):
            pass
    assert "1970" not in str(err.value) and "pid -1" not in str(err.value)
    old = time.time() - 60
    os.utime(lock, (old, old))
    with run_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "empty or damaged lock file" in caplog.text and "1970" not in caplog.text


def test_a_lock_that_cannot_be_written_is_removed_and_named(tmp_path, monkeypatch):
    import qlora.lockfile as lockfile

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lockfile.os, "fsync", lambda fd: full(fd, b""))
    with pytest.raises(UsageError, match=r"run\.lock: No space left on device"):
        with run_lock(tmp_path):
            pass
    assert not (tmp_path / "run.lock").exists()


def test_an_interrupted_takeover_claim_is_named_not_broken(tmp_path):
    write_lock(tmp_path, dead_pid())
    claim = tmp_path / ".run.lock.claim"
    claim.write_text("")
    old = time.time() - 60
    os.utime(claim, (old, old))
    with pytest.raises(UsageError, match=r"takeover was interrupted.*delete .*\.run\.lock\.claim"):
        with run_lock(tmp_path):
            pass
