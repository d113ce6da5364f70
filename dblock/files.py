"""Files that survive kills, full disks and shared folders: atomic writes, leftovers, the lock.

- Files appear whole or not at all: ``atomic_path`` writes ``<name>.<pid>@<host>.<ns>-<start>.tmp``
  in the target's own directory (a rename never crosses filesystems), fsyncs it,
  ``os.replace``s it over the target and fsyncs the directory. A failed write removes its temp
  file; a kill leaves it behind, and ``remove_orphans`` deletes it at the next start once its
  process is gone.
- A process is known by more than its pid: containers (PID namespaces) give every job pid 1 or 2,
  and pids are reused. Its identity is the host, the boot (``boot_id``), the PID namespace
  (inode of ``/proc/self/ns/pid``; ``<ns>`` in a temp file's name hashes boot and namespace) and
  its start time (``/proc/<pid>/stat``); a pid seen from another namespace says nothing here.
- A full disk is a ``DiskFullError`` naming the file and the free space left.
- ``RunLock`` keeps a second run out of a run directory that is in use.

Plain Python (no torch, hydra, omegaconf or lightning).
"""

from __future__ import annotations

import errno
import hashlib
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

log = logging.getLogger(__name__)


HOST = socket.gethostname().replace("/", "_")
TMP_RE = re.compile(
    r"^(?P<target>.+)\.(?P<pid>\d+)"
    r"(?:@(?P<host>[^/]*?)(?:\.(?P<ns>[0-9a-f]{8})-(?P<start>\d+))?)?\.tmp$"
)
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
    """The temp file of ``path``: same directory, named by this process's identity (pid, host,
    boot and PID namespace, start time)."""
    me = identity()
    return path.with_name(f"{path.name}.{me['pid']}@{HOST}.{ns_tag()}-{me['start'] or 0}.tmp")


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


# --- who wrote a file: process identity -----------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_id() -> str:
    """This boot of this machine (Linux; empty elsewhere)."""
    return _read("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> int:
    """The inode of this process's PID namespace (0 where there is no ``/proc``)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def start_time(pid: int) -> int | None:
    """When process ``pid`` (of this PID namespace) started, in clock ticks since boot; None
    when it does not exist or cannot be read."""
    stat = _read(f"/proc/{pid}/stat")
    try:  # field 22; the command name (field 2, in parentheses) may hold spaces
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def identity() -> dict:
    """This process as a lock file records it."""
    pid = os.getpid()
    return {"pid": pid, "host": HOST, "boot": boot_id(), "pidns": pid_namespace(),
            "start": start_time(pid)}


def ns_tag(boot: str | None = None, pidns: int | None = None) -> str:
    """8 hex digits naming a boot and a PID namespace (this process's by default)."""
    key = f"{boot_id() if boot is None else boot}:{pid_namespace() if pidns is None else pidns}"
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def owner_alive(owner: dict) -> bool | None:
    """Whether the process ``owner`` (an ``identity()``) still runs: None when that cannot be
    told from here (another host, or another PID namespace of this boot). Records of older
    versions hold only pid and host."""
    pid = owner.get("pid")
    if owner.get("host") != HOST:
        return None
    if owner.get("boot") and boot_id() and owner["boot"] != boot_id():
        return False  # the machine has restarted since
    if owner.get("pidns") and pid_namespace() and owner["pidns"] != pid_namespace():
        return None  # its pid means another process here
    if pid == os.getpid() or not pid_alive(pid):
        return False  # never this process: it has not taken the file yet
    if owner.get("start") is not None and start_time(pid) not in (None, owner["start"]):
        return False  # the pid was reused
    return True


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
    """Delete temp files and staging folders (``<name>.<pid>[@<host>[.<ns>-<start>]].tmp``)
    whose writer is gone.

    Only files written on this host, in this PID namespace and boot, by a process that no longer
    exists (or whose pid now names a process started at another time) are removed: parallel
    jobs and containers share data directories, and a live writer's temp file is left alone.
    Returns the paths removed.
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
            if m["ns"] is not None and m["ns"] != ns_tag():
                continue  # another container or boot: its pid says nothing here
            pid = int(m["pid"])
            start = None if m["start"] in (None, "0") else int(m["start"])
            if pid == os.getpid() and start in (None, start_time(pid)):
                continue
            if pid_alive(pid) and (start is None or start_time(pid) in (None, start)):
                continue
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                continue
            removed.append(p)
            log.warning("removed %s, left behind by a writer that died (pid %d)", p, pid)
    return removed
