"""What keeps long runs safe besides atomic files (``dblock.files``): clean stops on signals,
safe checkpoint loading with config checks, and the results.json schema.

Plain Python and torch, so each piece is testable on its own: no hydra, no omegaconf, no
lightning (the Lightning side, ``AtomicCheckpointIO``, lives in ``dblock/task.py``).

``SignalStop`` turns SIGTERM, SIGINT and SLURM's requeue signal into a stop at the next batch
boundary (through Lightning's own SIGTERM handling); the run then writes results.json with
``status: "interrupted"`` and exits with ``128 + signal number``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from dblock.config_check import ConfigError, missing_checkpoint

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
        # True: record and say so, nothing else; under DDP dblock.task.StopTogether polls the
        # signal and stops every process at the same batch boundary
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


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array jobs included); False where that fails."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    )
    if not job or not re.fullmatch(r"[0-9_]+", job):
        log.warning("cannot requeue: no SLURM job id in the environment")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
    except OSError as err:
        log.warning("cannot requeue SLURM job %s: %s", job, err)
        return False
    if not done:
        log.warning("scontrol requeue %s failed", job)
    return done


# --- checkpoints ----------------------------------------------------------------------------

# what a checkpoint's dataset settings may differ in: where the data live, and how they load
LOCATION_KEYS = {"data_dir", "cache", "cache_dir", "download", "batch_size", "input"}
EVAL_FREE_KEYS = {"val_fraction", "split_seed"}  # evaluation reads the test split only
SHORT = {  # the short top-level knobs the user types
    "model.model": "model",
    "model.d": "d",
    "model.n_layers": "layers",
    "model.n_hidden": "n_hidden",
    "model.recurrent": "recurrent",
    "model.detach_recurrent": "detach_recurrent",
    "dataset.name": "dataset",
}


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` of a local file: tensors and plain types only.

    A URL, a directory, a missing, truncated, foreign or unsafe file is a ``ConfigError`` naming
    it. Every checkpoint dblock reads goes through here (``AtomicCheckpointIO.load_checkpoint``
    routes Lightning's own loads here too).
    """
    import torch

    why = missing_checkpoint(path)
    if why is not None:
        raise ConfigError(why)
    file = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before failing
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise ConfigError(
            f"ckpt_path={path} cannot be loaded as a checkpoint ({_why(err, file)})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path} is not a dblock checkpoint (no state_dict)")
    return ckpt


def _is_torch_file(file: Path) -> bool:
    """Whether ``file`` starts as a file ``torch.save`` writes: a zip archive, or a pickle
    (protocol 2-5: torch's legacy format, and what a tampered file holds)."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")


def _why(err: Exception, file: Path) -> str:
    """The reason in a torch.load error, without its advice to load with weights_only=False."""
    if not _is_torch_file(file):
        return (
            "it is not a checkpoint: corrupt, or another kind of file (a PyTorch checkpoint is a "
            "zip archive)"
        )
    text = str(err)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = next((r.strip() for r in reason if r.strip()), "")[:160]
        return (
            "it holds Python objects other than tensors and plain types, which a dblock "
            f"checkpoint never does: foreign or tampered with{f'; {detail}' if detail else ''}"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"corrupt, truncated or not a dblock checkpoint: {first[:200]}"


def check_checkpoint(
    ckpt: dict,
    path: str | Path,
    shapes: Mapping[str, tuple],
    config: Mapping | None,
    evaluate: bool,
) -> None:
    """Refuse a checkpoint that does not fit this run, with one message naming the key.

    ``config`` is this run's ``{"dataset": {...}, "model": {...}, "seed": int}`` as stored by
    ``SNNTask.on_save_checkpoint`` (key ``dblock_config``); ``shapes`` the task's state-dict
    shapes. ``evaluate`` (train=false) allows another validation split and seed.
    """
    stored = ckpt.get("dblock_config")
    if config is not None and isinstance(stored, Mapping):
        key, old, new = first_mismatch(stored, config, evaluate)
        if key is not None:
            flag = SHORT.get(key, key)
            if key in TRAINING_KEYS:
                raise ConfigError(training_mismatch(path, key, old, new))
            raise ConfigError(
                f"ckpt_path={path} was written with {key}={fmt(old)}, this run has "
                f"{key}={fmt(new)}; {'evaluate' if evaluate else 'resume'} it with "
                f"{flag}={fmt(old)} (the checkpoint's model and data must match the run)"
            )
    elif config is not None:
        log.warning("%s stores no run config (older dblock); only tensor shapes are checked", path)
    got = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    want = {k: tuple(v) for k, v in shapes.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        k = diff[0]
        raise ConfigError(
            f"ckpt_path={path} does not fit this config (model, d, layers, n_hidden, recurrent, "
            f"dataset must match the run that wrote it): {k} is {got.get(k)} in the checkpoint, "
            f"{want.get(k)} here"
        )


def first_mismatch(stored: Mapping, current: Mapping, evaluate: bool):
    """(key, stored value, current value) of the first difference that matters, or Nones."""
    free = LOCATION_KEYS | (EVAL_FREE_KEYS if evaluate else set())
    old_data, new_data = stored.get("dataset") or {}, current.get("dataset") or {}
    # the dataset's name first: its other settings differ because the dataset does
    for k in sorted(set(old_data) | set(new_data), key=lambda k: (k != "name", k)):
        if k not in free and old_data.get(k) != new_data.get(k):
            return f"dataset.{k}", old_data.get(k), new_data.get(k)
    old_model, new_model = stored.get("model") or {}, current.get("model") or {}
    ignore = {"d"} if old_model.get("model") == new_model.get("model") == "standard" else set()
    for k in sorted(set(old_model) | set(new_model)):
        if k not in ignore and old_model.get(k) != new_model.get(k):
            return f"model.{k}", old_model.get(k), new_model.get(k)
    if not evaluate and stored.get("seed") != current.get("seed"):
        return "seed", stored.get("seed"), current.get("seed")
    old_train, new_train = stored.get("training"), current.get("training") or {}
    if not evaluate and isinstance(old_train, Mapping):  # absent in older checkpoints
        for k in TRAINING_KEYS:
            if k in old_train and old_train[k] != new_train.get(k):
                return k, old_train[k], new_train.get(k)
    return None, None, None


# what a resume cannot change: Lightning restores the optimiser, the lr scheduler (its lr,
# milestones and gamma) and each checkpoint callback's selection state from the checkpoint, so
# a new value would be ignored while config.yaml recorded it (the recipe first: it sets others)
TRAINING_KEYS = (
    "recipe",
    "selection.monitor",
    "selection.mode",
    "task.lr",
    "task.milestones",
    "task.gamma",
)


def training_mismatch(path, key: str, old, new) -> str:
    """The refusal of a resume with another training setting than its checkpoint's."""
    if key == "recipe":
        fix = f"recipe={old}" if old is not None else f"without recipe={new}"
        fix = f"with {fix}" if old is not None else fix
    else:
        fix = f"with {key}={fmt(old)}"
    return (
        f"ckpt_path={path} was trained with {key}={fmt(old)}, this run has {key}={fmt(new)}; "
        f"resume it {fix} (a resume continues the training it resumes; to train with other "
        "settings, start a new run in another hydra.run.dir)"
    )


def fmt(value) -> str:
    """A value as a Hydra override would spell it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    return str(value)


def checkpoint_epoch(path: str | Path | None) -> int | None:
    """Epochs completed in the checkpoint at ``path``; None when absent or unreadable."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return int(load_checkpoint(path)["epoch"]) + 1
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


# --- results.json ---------------------------------------------------------------------------

STATUSES = ("ok", "failed", "interrupted")


def summary(info: Mapping, test: Mapping | None = None, status: str = "ok", **extra) -> dict:
    """The run's summary as written to results.json.

    ``info`` describes the run (model, d, layers, dataset, seed, ...), ``test`` holds the test
    metrics, ``extra`` the rest (epoch, tested checkpoint, timings; ``error`` and
    ``last_good_ckpt`` when failed; ``signal``, ``last_ckpt`` and ``resume`` when interrupted).
    """
    if status not in STATUSES:
        raise ValueError(f"status={status!r}; choose one of {', '.join(STATUSES)}")
    test = test or {}
    return {
        "status": status,
        "test/acc": test.get("test/acc"),
        "test/loss": test.get("test/loss"),
        "test/spikes_per_sample": test.get("test/spikes_per_sample"),
        "test/samples": int(test["test/samples"]) if "test/samples" in test else None,
        **extra,
        **info,
    }


def existing(path: str | Path | None) -> str | None:
    """``path`` as a string when that file exists, else None (never name a file not written)."""
    return str(path) if path is not None and Path(path).is_file() else None


def resume_command(
    cwd: str | Path,
    python: str,
    script: str | Path,
    overrides: Sequence[str],
    run_dir: str | Path,
    ckpt: str | Path | None,
    config_name: str | None = None,
) -> str:
    """The shell command that reruns this run into the same ``run_dir``: from ``ckpt`` (which
    replaces any ``ckpt_path`` override) or, when None, with the overrides as they were."""
    drop = ("hydra.run.dir=",) + (("ckpt_path=", "+ckpt_path=", "++ckpt_path=") if ckpt else ())
    args = [python, os.path.abspath(os.path.join(cwd, script))]
    if config_name and config_name != "config":
        args.append(f"--config-name={config_name}")
    args += [o for o in overrides if not o.startswith(drop)]
    args.append(f"hydra.run.dir={os.path.abspath(os.path.join(cwd, run_dir))}")
    if ckpt:
        args.append(f"ckpt_path={os.path.abspath(os.path.join(cwd, ckpt))}")
    return f"cd {shlex.quote(str(cwd))} && {shlex.join(args)}"


def one_line(summary: dict, out_dir: str, trained: bool = True) -> str:
    """The run's result in one line: the network, the test metrics and what was trained."""
    d = f" d={summary['d']}" if summary["d"] is not None else ""
    net = f"{summary['model']}{d} layers={summary['layers']}"
    if not summary["recurrent"]:
        net += " feedforward"
    elif summary["model"] == "dblock":  # the standard SNN always detaches (SPEC §2)
        net += f" recurrent detach_recurrent={str(summary['detach_recurrent']).lower()}"
    else:
        net += " recurrent"
    net = f"{net} reduce={summary['reduce']} on {summary['dataset']}"
    if summary.get("smoke"):
        return (
            f"smoke run of {net}: one batch of train, val and test ran end to end; its numbers "
            f"are not results (drop debug= for a real run) -> {out_dir}/results.json"
        )
    if trained:
        epoch_s = summary["train/epoch_time_s"]
        done = (
            f"{epoch_s if epoch_s is not None else float('nan'):.2f} s/epoch, "
            f"{summary['epoch']} epochs"
        )
    else:
        done = f"evaluated {summary['tested_ckpt']} (trained {summary['tested_epoch']} epochs)"
    return (
        f"{net}: test acc {summary['test/acc']:.4f}, loss {summary['test/loss']:.4f}, "
        f"{summary['test/spikes_per_sample']:.1f} spikes/sample, {done} -> {out_dir}/results.json"
    )
