"""Files that survive kills, full disks and shared folders: atomic writes, leftovers, the lock.

- Files appear whole or not at all: ``atomic_path`` writes ``<name>.<pid>@<host>.tmp`` in the
  target's own directory (a rename never crosses filesystems), fsyncs it, ``os.replace``s it over
  the target and fsyncs the directory. A failed write removes its temp file; a kill leaves it
  behind, and ``remove_orphans`` deletes it at the next start once its process is gone.
- A full disk is a ``DiskFullError`` naming the file and the free space left.
- ``RunLock`` keeps a second run out of a run directory that is in use.

Plain Python (no torch, hydra, omegaconf or lightning).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dblock.config_check import ConfigError

log = logging.getLogger(__name__)

HOST = socket.gethostname().replace("/", "_")
TMP_RE = re.compile(r"^(?P<target>.+)\.(?P<pid>\d+)(?:@(?P<host>[^/]*))?\.tmp$")
FULL = (errno.ENOSPC, errno.EDQUOT)


# --- atomic files --------------------------------------------------------------------------


class DiskFullError(OSError):
    """No space (or quota) left while writing ``path``; the message gives the free space."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        free = free_space(self.path.parent)
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device writing {self.path} ({free} free there); free some "
            "space or write elsewhere (hydra.run.dir=..., paths.data_dir=...) and run again",
        )

    def __str__(self) -> str:
        return self.strerror


def free_space(path: Path) -> str:
    """Free space of the filesystem holding ``path`` (or its nearest existing parent)."""
    for p in (path, *path.parents):
        try:
            return human_bytes(shutil.disk_usage(p).free)
        except OSError:
            continue
    return "unknown"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or quota) is full; h5py sometimes only says it in words."""
    return isinstance(err, OSError) and (err.errno in FULL or "No space left on device" in str(err))


def tmp_path(path: Path) -> Path:
    """The temp file of ``path``: same directory, named by this process and host."""
    return path.with_name(f"{path.name}.{os.getpid()}@{HOST}.tmp")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` atomically and durably.

    On any error (or interruption) the temp file is removed and ``path`` keeps its old content;
    a full disk raises ``DiskFullError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(path) from err
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills an open binary temp file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON in ``path``, atomically."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


# --- leftovers and the run-dir lock ---------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(directories: Iterable[str | Path]) -> list[Path]:
    """Delete temp files (``<name>.<pid>[@<host>].tmp``) whose writer is gone.

    Only files written on this host by a process that no longer exists are removed: parallel
    jobs share data directories, and a live writer's temp file is left alone. Returns the paths
    removed.
    """
    removed = []
    for directory in directories:
        try:
            entries = list(Path(directory).glob("*.tmp"))
        except OSError:
            continue
        for p in entries:
            m = TMP_RE.match(p.name)
            if m is None or m["host"] not in (None, HOST):
                continue
            pid = int(m["pid"])
            if pid == os.getpid() or pid_alive(pid):
                continue
            try:
                p.unlink()
            except OSError:
                continue
            removed.append(p)
            log.warning("removed %s, left behind by a writer that died (pid %d)", p, pid)
    return removed


class RunLock:
    """``<run dir>/.lock`` held for a whole run: a second run into the same directory stops.

    A lock left by a process that died (kill -9, node crash on the same host) is taken over with
    a warning. A lock written on another host cannot be checked from here and counts as held.
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self.held = False
        self.mtime = 0.0  # when it was taken, by the run dir's filesystem clock

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"pid": os.getpid(), "host": HOST})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if not isinstance(pid, int):  # being written right now, or unreadable
                    raise ConfigError(self._in_use("another process")) from None
                if host != HOST or pid_alive(pid):
                    where = f"pid {pid}" + (f" on host {host}" if host != HOST else "")
                    raise ConfigError(self._in_use(where)) from None
                # stale: rename it away first, so only one of several starters takes it over
                try:
                    os.replace(self.path, self.path.with_name(f"{self.NAME}.stale.{os.getpid()}"))
                except FileNotFoundError:
                    continue
                self.path.with_name(f"{self.NAME}.stale.{os.getpid()}").unlink(missing_ok=True)
                log.warning(
                    "run dir %s was locked by pid %d, which is gone; taking it over",
                    self.path.parent,
                    pid,
                )
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held, self.mtime = True, self.path.stat().st_mtime
            return
        raise ConfigError(self._in_use("another process"))

    def _in_use(self, who: str) -> str:
        return (
            f"run dir {self.path.parent} in use by {who} (lock file {self.path}); wait for that "
            "run to end, or choose another hydra.run.dir (delete the lock file only if no run is "
            "using the directory)"
        )

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
