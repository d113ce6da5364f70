"""One run per run folder: a lock file held for the run's lifetime, taken over from a run
that died.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from dblock.errors import ConfigError
from dblock.files import HOST, identity, owner_alive

log = logging.getLogger(__name__)



class RunLock:
    """``<run dir>/.lock`` held for a whole run: a second run into the same directory stops.

    The run holds an exclusive ``flock`` on the file, which the kernel drops when the process
    dies however it dies, and writes its identity (``identity()``) into it for messages. A lock
    whose owner is gone (its flock is free and its record names no running process of this
    host: a kill -9, a container restarted with the same pid, a reboot) is taken over with a
    warning. A lock written on another host cannot be checked from here and counts as held.
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self.held = False
        self.fd: int | None = None
        self.mtime = 0.0  # when it was taken, by the run dir's filesystem clock

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                taken = self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            if taken:
                self.fd, self.held = fd, True
                self.mtime = os.fstat(fd).st_mtime
                return
            os.close(fd)  # the file was replaced meanwhile: try the new one
        raise ConfigError(self._in_use("another process"))

    def _take(self, fd: int) -> bool:
        """Lock ``fd`` (the lock file, opened) and write this process into it; False when the
        path no longer names that file. Raises ``ConfigError`` when the lock is held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:  # a live process holds it
            raise ConfigError(self._in_use(self._who(self._owner()))) from None
        except OSError:  # no flock on this filesystem: the record alone decides
            flocked = False
        try:
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                return False
        except FileNotFoundError:
            return False
        owner = self._owner()
        pid = owner.get("pid")
        if pid is not None or os.fstat(fd).st_size:
            alive = owner_alive(owner) if isinstance(pid, int) else None
            # the record cannot tell (another PID namespace of this host): the free flock can
            gone = alive is False or (alive is None and flocked and owner.get("host") == HOST)
            if not gone:
                raise ConfigError(self._in_use(self._who(owner)))
            log.warning(
                "run dir %s was locked by pid %s, which is gone; taking it over",
                self.path.parent,
                pid,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(identity()).encode(), 0)
        os.fsync(fd)
        return True

    def _who(self, owner: dict) -> str:
        pid, host = owner.get("pid"), owner.get("host")
        if not isinstance(pid, int):
            return "another process"
        return f"pid {pid}" + (f" on host {host}" if host != HOST else "")

    def _in_use(self, who: str) -> str:
        return (
            f"run dir {self.path.parent} in use by {who} (lock file {self.path}); wait for that "
            "run to end, or choose another hydra.run.dir (delete the lock file only if no run is "
            "using the directory)"
        )

    def release(self) -> None:
        if self.held and self.fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    self.path.unlink()  # while still locked: no one takes a file being removed
            except FileNotFoundError:
                pass
            os.close(self.fd)
        self.held, self.fd = False, None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
