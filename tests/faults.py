"""Faults injected into test runs through Hydra overrides (``+callbacks.fault._target_=...``),
and ``run_cli``, which runs ``run.py`` in a process forked from a server that has already
imported torch, Lightning and Hydra (a run costs its own work, not ten seconds of imports).

The file faults patch ``open``, ``os.replace`` and ``os.rename`` inside the run's process, so
they act on whatever code writes the checkpoint (dblock's writer or Lightning's default one):

- ``KillDuringWrite(epoch, name, phase)``: ``kill -9`` while ``name`` (e.g. ``last.ckpt``) is
  written in epoch ``epoch``: ``open`` (its file was just created), ``write`` (part of its bytes
  are on disk), ``replace`` (written, not yet renamed), ``done`` (just renamed);
- ``CrossDevice()``: every rename between two directories fails with EXDEV, as when ``$TMPDIR``
  is another filesystem than the run dir (a local disk and NFS, or a tmpfs);
- ``FullDisk(epoch)``: from epoch ``epoch`` on, the next checkpoint file written runs out of space
  after part of its bytes.
"""

from __future__ import annotations

import builtins
import errno
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
# a run of seconds on the generated dataset
TINY = ["dataset.n_train=256", "dataset.n_test=128", "dataset.batch_size=64", "n_hidden=16"]
# 3 epochs with an lr step after the first: resume must restore the scheduler too
RESUMABLE = [*TINY, "trainer.max_epochs=3", "task.milestones=[1]", "task.lr=0.01"]


class KillAt(pl.Callback):
    """``kill -9`` this process at batch ``batch`` of epoch ``epoch``: no cleanup, no saving."""

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtTest(pl.Callback):
    """``kill -9`` this process at the first test batch (training done, results not written)."""

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(pl.Callback):
    """Send ``signal`` (a name: SIGTERM, SIGINT, SIGUSR1) to this process at batch ``batch`` of
    epoch ``epoch``; ``unless_resumed``: not in a run resumed from a checkpoint; ``rank``: in
    that DDP process only; ``job``: only in that job (Hydra's job number) of a ``-m`` sweep."""

    def __init__(
        self,
        epoch: int,
        batch: int = 1,
        signal: str = "SIGTERM",
        unless_resumed=False,
        rank=None,
        job=None,
    ):
        self.epoch, self.batch, self.signal = epoch, batch, signal
        self.unless_resumed, self.rank, self.job = unless_resumed, rank, job

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.unless_resumed and trainer.ckpt_path is not None:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if self.job is not None:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.get().job.num != self.job:
                return
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonAt(pl.Callback):
    """Set weights to NaN at batch ``batch`` of epoch ``epoch``.

    ``which="all"`` makes the loss NaN; ``which="first"`` poisons only the first hidden layer's
    first parameter, which silences those neurons (NaN never crosses the threshold) while the loss
    stays finite: only the weights are broken.
    """

    def __init__(self, epoch: int, batch: int = 1, which: str = "all") -> None:
        self.epoch, self.batch, self.which = epoch, batch, which

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            params = list(pl_module.parameters())
            with torch.no_grad():
                for p in params if self.which == "all" else params[:1]:
                    p.fill_(float("nan"))


# --- file faults ----------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _is(path, name: str) -> bool:
    """Whether ``path`` is the file ``name`` or a temp file of it (``name.<anything>``)."""
    base = os.path.basename(os.fspath(path))
    return base == name or base.startswith(name + ".")


class _Writes:
    """A binary file whose ``write`` calls ``hook(total bytes so far, data)`` first."""

    def __init__(self, f, hook) -> None:
        self._f, self._hook, self.total = f, hook, 0

    def write(self, data) -> int:
        self._hook(self, data)
        self.total += len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)


class KillDuringWrite(pl.Callback):
    """``kill -9`` at ``phase`` of writing the file ``name`` in epoch ``epoch`` (see module doc)."""

    PHASES = ("open", "write", "replace", "done")
    after = 4096  # bytes of the file on disk when ``phase="write"`` kills

    def __init__(self, epoch: int, name: str = "last.ckpt", phase: str = "write"):
        if phase not in self.PHASES:
            raise ValueError(f"phase={phase!r}; choose one of {self.PHASES}")
        self.epoch, self.name, self.phase = epoch, name, phase
        self.trainer = None

    def _now(self) -> bool:
        return self.trainer is not None and self.trainer.current_epoch == self.epoch

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.trainer is not None:
            return
        self.trainer = trainer
        real_open, real_replace, real_rename = builtins.open, os.replace, os.rename

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            named = isinstance(file, str | os.PathLike) and _is(file, self.name)
            if "w" not in mode or not named or not self._now():
                return f
            if self.phase == "open":
                _kill()
            if self.phase != "write":
                return f

            def hook(w, data):
                if w.total + len(data) >= self.after:
                    w._f.write(bytes(data)[: max(self.after - w.total, 1)])
                    w._f.flush()
                    _kill()

            return _Writes(f, hook)

        def move(real):
            def fn(src, dst, *args, **kwargs):
                hit = os.path.basename(dst) == self.name and self._now()
                if hit and self.phase == "replace":
                    _kill()
                out = real(src, dst, *args, **kwargs)
                if hit and self.phase == "done":
                    _kill()
                return out

            return fn

        builtins.open, os.replace, os.rename = open_, move(real_replace), move(real_rename)


class CrossDevice(pl.Callback):
    """Renames between two directories fail with EXDEV (``$TMPDIR`` on another filesystem)."""

    done = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.done:
            return
        self.done = True

        def cross(real):
            def fn(src, dst, *args, **kwargs):
                if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
                    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)
                return real(src, dst, *args, **kwargs)

            return fn

        os.replace, os.rename = cross(os.replace), cross(os.rename)


class FullDisk(pl.Callback):
    """From epoch ``epoch`` on, the next file opened for binary writing after a checkpoint is
    dumped (the checkpoint itself, wherever it is staged) runs out of space after ``after``
    bytes: the bytes before reach the disk, then ``write`` raises ENOSPC."""

    after = 4096

    def __init__(self, epoch: int) -> None:
        self.epoch, self.armed, self.done = epoch, False, False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.done:
            return
        self.done = True
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if not self.armed or "w" not in mode or "b" not in mode:
                return f
            self.armed = False

            def hook(w, data):
                if w.total + len(data) >= self.after:
                    w._f.write(bytes(data)[: max(self.after - w.total, 0)])
                    w._f.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            return _Writes(f, hook)

        builtins.open = open_

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.current_epoch >= self.epoch:
            self.armed = True


def fault(target: str, key: str = "fault", **params) -> list[str]:
    """Hydra overrides that add the callback ``tests.faults.<target>(**params)``."""
    return [f"+callbacks.{key}._target_=tests.faults.{target}"] + [
        f"+callbacks.{key}.{k}={v}" for k, v in params.items()
    ]


# --- run.py in a forked process -------------------------------------------------------------

PRELOAD = ["torch", "pytorch_lightning", "hydra", "omegaconf", "h5py", "torchmetrics"]
PRELOAD += ["dblock.training.task", "datamodules.bursts", "tests.faults"]
_context = None
TIMEOUT = 600  # s, for one run


def _forkserver():
    """The forkserver context; its server (started by the first run) imports this project."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), path]))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.pop("PYTHONPATH") if path is None else os.environ.update(PYTHONPATH=path)
    return _context


def _main(args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """The child: ``python run.py ARGS`` in ``cwd`` with ``env``, stdout/stderr to files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # torch read OMP_NUM_THREADS when the server imported it: set the count it names here
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for fd, name in ((1, out), (2, err)):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [str(ROOT / "run.py"), *args]
    sys.path.insert(0, str(ROOT))  # as for a script: its own folder first
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")


def run_env(tmp_path, env=None) -> dict:
    """The environment of a test's ``run.py``: data under ``tmp_path/data``, wandb offline, the
    project importable by worker processes (submitit); ``env`` adds or replaces variables."""
    return {
        # one torch thread unless the caller chose: the runs then neither slow down nor print
        # run.py's busy-CPU hint when the test machine is loaded (dblock/runtime.py)
        "OMP_NUM_THREADS": "1",
        **os.environ,
        "DBLOCK_DATA": str(Path(tmp_path) / "data"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }


def run_cli(args, tmp_path, check=True, env=None):
    """``python run.py ARGS`` in ``tmp_path`` with ``run_env(tmp_path, env)``, in a process
    forked from a server with the heavy imports done. Returns a ``CompletedProcess``;
    ``returncode`` is ``-N`` when the run died of signal N."""
    tmp_path = Path(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    n = len(list(logs.glob("*.out")))
    out, err = logs / f"{n}.out", logs / f"{n}.err"
    out.write_text("")
    err.write_text("")
    proc = _forkserver().Process(
        target=_main,
        args=([str(a) for a in args], str(tmp_path), run_env(tmp_path, env), out, err),
    )
    proc.start()
    proc.join(TIMEOUT)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise subprocess.TimeoutExpired(["run.py", *args], TIMEOUT)
    done = subprocess.CompletedProcess(
        ["run.py", *args], proc.exitcode, out.read_text(), err.read_text()
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


class FailingWrite(pl.Callback):
    """From epoch ``epoch`` on, writing a file named ``name`` fails with ``error`` (an errno
    name: EROFS as on a filesystem remounted read-only, EIO as on a failing disk or a lost NFS
    server) at ``phase``: ``open`` (its temp file is created) or ``replace`` (the rename)."""

    def __init__(self, epoch: int, name: str = "last.ckpt", error: str = "EROFS", phase="replace"):
        self.epoch, self.name, self.phase = epoch, name, phase
        self.errno = getattr(errno, error)
        self.trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.trainer is not None:
            return
        self.trainer = trainer
        real_open, real_replace = builtins.open, os.replace

        def now(path) -> bool:
            return _is(path, self.name) and self.trainer.current_epoch >= self.epoch

        def open_(file, mode="r", *args, **kwargs):
            named = isinstance(file, str | os.PathLike)
            if self.phase == "open" and "w" in mode and named and now(file):
                raise OSError(self.errno, os.strerror(self.errno), os.fspath(file))
            return real_open(file, mode, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            if self.phase == "replace" and os.path.basename(dst) == self.name and now(dst):
                raise OSError(self.errno, os.strerror(self.errno), src, None, dst)
            return real_replace(src, dst, *args, **kwargs)

        builtins.open, os.replace = open_, replace


def in_mounts(args: list[str], mounts: str, mount_args: list, cwd, env: dict, timeout=600):
    """Run ``args`` after the shell commands ``mounts`` (positional arguments ``mount_args``) in
    a private mount namespace of the command (``unshare -Urm``: no root needed where user
    namespaces are allowed; the mounts are gone when it ends)."""
    script = f'{mounts} && shift {len(mount_args)} && exec "$@"'
    cmd = ["unshare", "-Urm", "sh", "-c", script, "sh", *map(str, mount_args), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def on_small_disk(args: list[str], mount: Path, size: str, cwd, env: dict, timeout: int = 600):
    """Run ``args`` with a real ``size`` tmpfs mounted at ``mount`` (created if missing): a disk
    that really fills up, for code that writes through C libraries (libhdf5) which patching
    Python's ``open`` cannot reach."""
    Path(mount).mkdir(parents=True, exist_ok=True)
    mounts = 'mount -t tmpfs -o size="$1" tmpfs "$2"'
    return in_mounts(args, mounts, [size, mount], cwd, env, timeout)


def on_read_only(args: list[str], folder: Path, cwd, env: dict, timeout: int = 600):
    """Run ``args`` with ``folder`` mounted read-only (a read-only bind mount: writes fail with
    EROFS, for root too, which file modes would not stop)."""
    mounts = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"'
    return in_mounts(args, mounts, [folder], cwd, env, timeout)
