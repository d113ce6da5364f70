"""results.json: its schema, the run's one-line summary, and the command that resumes a run.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

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
    elif summary["model"] == "dblock":  # the standard SNN always detaches (docs/model.md §2)
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
