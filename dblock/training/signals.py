"""Clean stops on signals: SIGTERM, SIGINT and SLURM's requeue signal stop a run at the next
batch boundary (through Lightning's own SIGTERM handling); the run then writes results.json with
``status: "interrupted"`` and exits with ``128 + signal number``.
"""

from __future__ import annotations

import logging
import os
import signal

import pytorch_lightning as pl
import torch

from dblock.training import signals

log = logging.getLogger(__name__)



# --- signals --------------------------------------------------------------------------------


class Interrupted(BaseException):
    """Raised when a stop signal arrives outside Lightning's loops (nothing can be half done)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalStop:
    """Clean stops on SIGTERM, SIGINT and (under SLURM) the requeue signal.

    Inside ``trainer.fit``/``test`` Lightning owns SIGTERM: it finishes the current batch and
    raises ``SIGTERMException``. This handler records which signal came first and forwards
    SIGINT and the requeue signal to that path (as a SIGTERM to this process), so every stop
    happens at a batch boundary and the partial epoch is abandoned: ``last.ckpt`` keeps the last
    completed epoch, and a resume from it is exact. Outside Lightning's loops the handler raises
    ``Interrupted`` at once. A second Ctrl+C raises ``KeyboardInterrupt`` (stop now).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.requeue_signal: int | None = None
        self.quiet = False  # True: only record signals (the run's work is done)
        # True: record and say so, nothing else; under DDP StopTogether (below) polls the signal
        # and stops every process at the same batch boundary
        self.deferred = False
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum) if self.signum is not None else 0

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    @property
    def requeue(self) -> bool:
        return self.signum is not None and self.signum == self.requeue_signal

    def watch(self, signum: int) -> None:
        """Handle ``signum`` too (in the main thread only, as Python requires)."""
        if signum in self._previous or not _main_thread():
            return
        self._previous[signum] = signal.signal(signum, self._handle)

    def watch_requeue(self, signum: int) -> None:
        """SLURM's requeue signal: stop cleanly, then ask SLURM to requeue the job."""
        self.requeue_signal = int(signum)
        self.watch(signum)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT == self.signum:
                raise KeyboardInterrupt  # a second Ctrl+C: stop now
            return
        self.signum = signum
        if self.quiet:
            return
        log.warning("received %s: stopping at the next batch boundary", signal.Signals(signum).name)
        if self.deferred:
            return
        if signal.getsignal(signal.SIGTERM) == self._handle:  # Lightning's loops are not running
            raise Interrupted(signum)
        if signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's graceful path

    def __enter__(self) -> SignalStop:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.watch(signum)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class StopTogether(pl.Callback):
    """Under DDP, a stop signal that reaches any one process stops every process at the same
    training batch boundary, as an interrupted single-process run stops.

    Lightning broadcasts rank 0's SIGTERM flag before every training batch, so a signal sent to
    another rank alone stops only that rank (and its handler starts a collective of its own from
    inside the signal handler): rank 0 then dies in the next collective ("Connection closed by
    peer"). Here, during training, the signals are only recorded (``SignalStop.deferred``) and
    that per-batch broadcast becomes an all-reduce (max) of the signal number: every process sees
    the same signal at the same step and raises Lightning's ``SIGTERMException``, and run.py
    writes the interrupted results.json on rank 0. No collective is added.
    """

    def __init__(self, stop: signals.SignalStop) -> None:
        self.stop = stop

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch.distributed as dist

        if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return
        self.stop.deferred = True
        for signum in (signal.SIGTERM, signal.SIGINT):  # after Lightning registered its own
            if signals._main_thread():
                signal.signal(signum, self.stop._handle)
        loop = trainer.fit_loop.epoch_loop
        loop._broadcast_sigterm_tensor = lambda: self._agree(trainer)  # Lightning's private

    def _agree(self, trainer: pl.Trainer) -> None:
        import torch.distributed as dist
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        flag = torch.tensor([self.stop.signum or 0], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum:
            if self.stop.signum is None:
                self.stop.signum = signum  # the signal another process received
            raise SIGTERMException()
