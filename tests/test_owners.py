"""Who owns a run-dir lock or a temp file: a process is more than its pid (issue 16, C2).

Containers give every job pid 1 or 2 in its own PID namespace, so a pid alone names another
process in every container, and pids are reused. These tests run real processes in real PID
namespaces (``unshare -Urpf --mount-proc``, no root needed where user namespaces are allowed)
and fake the identity fields of lock and temp files (another namespace, another start time)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dblock import files
from dblock.errors import ConfigError
from dblock.files import (
    HOST,
    identity,
    ns_tag,
    pid_namespace,
    remove_orphans,
    start_time,
)
from dblock.launch.lock import RunLock
from tests.faults import dead_pid

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

HOLD_LOCK = """
import os, sys, time
from dblock.launch.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print(os.getpid(), flush=True)
time.sleep(120)
"""

WRITE_TEMP = """
import os, subprocess, sys, time
from dblock.files import atomic_path
if os.getpid() == 1:  # the container's first process starts the writer: not pid 1
    sys.exit(subprocess.call([sys.executable, "-c", os.environ["SCRIPT"], *sys.argv[1:]]))
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    print(tmp.name, flush=True)
    time.sleep(120)
"""


REMOVE = """
import sys
from dblock.files import remove_orphans
print([p.name for p in remove_orphans([sys.argv[1]])])
"""


def in_container(script: str, *args) -> subprocess.Popen:
    """``python -c script args`` as pid 1 of a new PID namespace (a container's view); a
    SIGKILL to the returned process kills it too (``--kill-child``)."""
    cmd = ["unshare", "-Urpf", "--kill-child", "--mount-proc", sys.executable, "-c", script]
    cmd += [str(a) for a in args]
    env = {**ENV, "SCRIPT": script}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def killed(proc: subprocess.Popen, lock_dir: Path | None = None) -> None:
    """SIGKILL ``proc`` (and its namespace's pid 1) and wait until it has died; with
    ``lock_dir``, until the kernel has dropped its flock on ``lock_dir/.lock``."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    if lock_dir is None:
        return
    deadline = time.monotonic() + 60
    with open(lock_dir / ".lock", "rb") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the killed process still holds its lock"
                time.sleep(0.05)


def first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, "the process in the namespace printed nothing"
    return line


def test_a_container_killed_and_rerun_takes_its_own_lock_over(tmp_path, caplog):
    """Killed as pid 1 of one container, rerun as pid 1 of the next: the old lock's pid is alive
    (the rerun itself), yet its owner is gone. Was: "in use by pid 1" forever."""
    first = in_container(HOLD_LOCK, tmp_path)
    assert first_line(first) == "1"
    killed(first, tmp_path)  # a kill -9: the lock file stays behind
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == 1
    second = in_container(HOLD_LOCK, tmp_path)
    try:
        assert first_line(second) == "1"  # it took the lock over
        assert json.loads((tmp_path / ".lock").read_text())["pidns"] != pid_namespace()
        # a live owner in another namespace holds it: refused from here
        with pytest.raises(ConfigError, match="in use by pid 1 "):
            RunLock(tmp_path).acquire()
    finally:
        killed(second, tmp_path)
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):  # and now it is gone
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "locked by pid 1, which is gone; taking it over" in caplog.text


def fake_lock(run_dir: Path, **fields) -> None:
    (run_dir / ".lock").write_text(json.dumps({**identity(), **fields}))


def test_lock_records_with_another_namespace_or_start_time(tmp_path):
    # this very pid, started at another time: a previous process whose pid was reused
    fake_lock(tmp_path, start=start_time(os.getpid()) - 1)
    with RunLock(tmp_path):
        pass
    # a live pid of another PID namespace that holds no lock: it is not this host's process
    fake_lock(tmp_path, pid=os.getppid(), pidns=pid_namespace() + 1)
    with RunLock(tmp_path):
        pass
    # the same live process (pid and start time): held, even without the lock
    parent = os.getppid()
    fake_lock(tmp_path, pid=parent, start=start_time(parent))
    with pytest.raises(ConfigError, match=f"in use by pid {parent} "):
        RunLock(tmp_path).acquire()
    # another boot: whatever its pid, it is gone
    fake_lock(tmp_path, pid=parent, boot="another-boot")
    with RunLock(tmp_path):
        pass


def test_a_live_writer_in_another_container_keeps_its_temp_file(tmp_path):
    """Two containers share a data dir: the writer in one (pid 2 or 3 there) is alive, so a
    run in the other (where that pid does not exist) or on the host must not remove its temp
    file. Was: removed as 'left behind by a writer that died (pid 2)'."""
    writer = in_container(WRITE_TEMP, tmp_path / "bursts_train.h5")
    try:
        name = first_line(writer)
        assert name.startswith("bursts_train.h5.") and not name.startswith("bursts_train.h5.1@")
        other = in_container(REMOVE, tmp_path)
        assert first_line(other) == "[]"
        other.wait(60)
        assert remove_orphans([tmp_path]) == []
        assert (tmp_path / name).exists()
    finally:
        killed(writer)


def test_temp_files_by_identity(tmp_path):
    me, dead = os.getpid(), dead_pid()
    start = start_time(me)
    other_ns = ns_tag(pidns=pid_namespace() + 1)
    keep = [
        tmp_path / f"a.h5.{me}@{HOST}.{ns_tag()}-{start}.tmp",  # this process
        tmp_path / f"b.h5.{dead}@{HOST}.{other_ns}-5.tmp",  # another container
    ]
    gone = [
        tmp_path / f"c.h5.{me}@{HOST}.{ns_tag()}-{start - 1}.tmp",  # pid reused
        tmp_path / f"d.h5.{dead}@{HOST}.{ns_tag()}-{start}.tmp",  # writer died
    ]
    for p in keep + gone:
        p.write_text("x")
    assert sorted(remove_orphans([tmp_path])) == sorted(gone)
    assert all(p.exists() for p in keep)
    # the temp file this process writes is named by its identity
    assert files.tmp_path(tmp_path / "e.h5").name == keep[0].name.replace("a.h5", "e.h5")
