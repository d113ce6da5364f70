"""Sweeps: the summary table and plot of a sweep folder, and the Hydra callbacks of ``-m`` runs.

- ``write_summary(dir)``: ``<dir>/summary.csv`` and ``summary.md``, one row per job: the values
  it sweeps (one column per swept key), its folder, status and results. ``SweepSummary`` (set in
  conf/hydra/default.yaml) writes and prints it when a sweep ends, and logs it (with the plot)
  to one wandb summary run grouped with the sweep's runs when the sweep logs to wandb.
- ``plot_sweep(dir, metric, x, lines)``: a metric against a swept key, one line per value of a
  second key, mean and s.d. over the rest (seeds).
- ``KeepSweepConfigs``: for sweeps that share one folder (the Fig. 4 sweeps,
  ``conf/sweep/fig4.yaml``). Hydra writes each sweep's config to ``<sweep dir>/multirun.yaml``,
  replacing the one of the sweep before (4d's sweep runs into 4a's folder). Before a sweep
  starts, this callback renames the previous file ``multirun-<its date>.yaml``.

Command line (any sweep folder, after the sweep or while it runs)::

    python -m dblock.sweeps summary outputs/multirun/<date>
    python -m dblock.sweeps plot outputs/multirun/<date> --metric test/acc --x d --lines layers

Hydra calls the callbacks' hooks by name; this module imports neither hydra nor omegaconf.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class SweepCallback:
    """The hooks Hydra calls on a callback, each doing nothing: a callback overrides its own."""

    def on_multirun_start(self, config, **kwargs) -> None:
        pass

    def on_multirun_end(self, config, **kwargs) -> None:
        pass

    def on_run_start(self, config, **kwargs) -> None:
        pass

    def on_run_end(self, config, **kwargs) -> None:
        pass

    def on_job_start(self, config, **kwargs) -> None:
        pass

    def on_job_end(self, config, job_return, **kwargs) -> None:
        pass


class KeepSweepConfigs(SweepCallback):
    """Keep one ``multirun*.yaml`` per sweep in a shared sweep folder."""

    def on_multirun_start(self, config, **kwargs) -> None:
        path = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if not path.is_file():
            return
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(path.stat().st_mtime))
        target, n = path.with_name(f"multirun-{stamp}.yaml"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"multirun-{stamp}-{n}.yaml")
        os.replace(path, target)
        log.info("kept the previous sweep's config as %s", target)



# --- the summary of a sweep -----------------------------------------------------------------

METRICS = ("test/acc", "test/loss", "test/spikes_per_sample", "train/epoch_time_s")
DIGITS = {"test/acc": 4, "test/loss": 4, "test/spikes_per_sample": 1, "train/epoch_time_s": 3}
_SWEEP_FN = re.compile(r"^(range|choice|glob|interval|tag)\(")


def _top_level_comma(value: str) -> bool:
    """Whether an override's value is a comma list (``1,10``), not a list or a quoted string."""
    depth, quote = 0, None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _read_yaml(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def job_dirs(sweep: Path) -> list[Path]:
    """The folders of a sweep's jobs, in the sweep's order (Hydra's job number, then name):
    each holds ``.hydra/overrides.yaml``, which Hydra writes as the job starts."""
    found = {
        p.parent.parent
        for p in sweep.rglob("overrides.yaml")
        if p.parent.name == ".hydra" and ".submitit" not in p.parts and p.parent.parent != sweep
    }

    def order(job: Path):
        try:
            text = (job / ".hydra" / "hydra.yaml").read_text()
            num = int(re.search(r"^    num: (\d+)$", text, re.M).group(1))
        except (OSError, AttributeError):
            num = -1
        parts = re.split(r"(\d+)", str(job))
        return num, [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in parts]

    return sorted(found, key=order)


def job_overrides(job: Path) -> dict[str, str]:
    """``{key: value}`` of a job's overrides as typed (``d=1`` -> ``{"d": "1"}``)."""
    lines = _read_yaml(job / ".hydra" / "overrides.yaml") or []
    return {_key(o): o.split("=", 1)[1] for o in lines if isinstance(o, str) and "=" in o}


def swept_keys(sweep: Path, overrides: list[dict[str, str]]) -> list[str]:
    """The keys a sweep varies: its comma lists and sweeper params (``multirun.yaml``), then any
    key whose value differs between the jobs (e.g. a search's trials)."""
    keys: list[str] = []
    conf = _read_yaml(sweep / "multirun.yaml") or {}
    hydra = conf.get("hydra") or {}
    params = ((hydra.get("sweeper") or {}).get("params")) or {}
    typed = ((hydra.get("overrides") or {}).get("task")) or []
    for line in [*(f"{k}={v}" for k, v in params.items()), *typed]:
        if not isinstance(line, str) or "=" not in line:
            continue
        value = line.split("=", 1)[1]
        if _top_level_comma(value) or _SWEEP_FN.match(value):
            keys.append(_key(line))
    for job in overrides:
        for k, v in job.items():
            if k not in keys and any(o.get(k) != v for o in overrides):
                keys.append(k)
    return [k for k in dict.fromkeys(keys) if not k.startswith("hydra.")]


def job_status(job: Path, results: dict | None) -> str:
    """``ok``, ``failed``, ``interrupted`` (results.json); ``refused`` (run.log ends with the
    error, written after any results.json: e.g. the folder held another run's checkpoint);
    ``running`` (its lock is held); ``killed`` (a lock left by a dead process); ``incomplete``
    (none of these: e.g. stopped before it wrote anything)."""
    from dblock.files import HOST, pid_alive
    from dblock.launch.lock import RunLock

    log_file = job / "run.log"
    try:
        lines = log_file.read_text().strip().splitlines()
    except OSError:
        lines = []
    if lines and "[ERROR]" in lines[-1]:
        done = job / "results.json"
        if results is None or (
            results.get("status") == "ok" and log_file.stat().st_mtime >= done.stat().st_mtime
        ):
            return "refused"
    if results is not None:
        return str(results.get("status"))
    lock = job / RunLock.NAME
    if lock.is_file():
        try:
            owner = json.loads(lock.read_text())
        except (OSError, ValueError):
            return "running"
        if owner.get("host") != HOST or pid_alive(int(owner.get("pid", 0))):
            return "running"
        return "killed"
    return "incomplete"


def summary_table(sweep: str | Path) -> tuple[list[str], list[dict]]:
    """(columns, rows): one row per job of the sweep in ``sweep``, in job order."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"no such sweep folder: {sweep} (pass the folder a -m sweep wrote)")
    jobs = job_dirs(sweep)
    if not jobs:
        raise FileNotFoundError(
            f"no job folders under {sweep} (each job of a sweep has .hydra/overrides.yaml)"
        )
    overrides = [job_overrides(j) for j in jobs]
    keys = swept_keys(sweep, overrides)
    columns = [*keys, "job", "status", *METRICS, "epochs", "wall_time_s"]
    rows = []
    for job, over in zip(jobs, overrides, strict=True):
        try:
            res = json.loads((job / "results.json").read_text())
        except (OSError, ValueError):
            res = None
        row = {k: over.get(k, "") for k in keys}
        row.update(job=str(job.relative_to(sweep)), status=job_status(job, res))
        for m in METRICS:
            row[m] = (res or {}).get(m)
        row["epochs"] = (res or {}).get("epoch")
        row["wall_time_s"] = (res or {}).get("wall_time_s")
        rows.append(row)
    return columns, rows


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{DIGITS.get(column, 1)}f}"
    return str(value)


def markdown(columns: list[str], rows: list[dict]) -> str:
    """The table in markdown (what summary.md holds and a finished sweep prints)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep: str | Path) -> str:
    """Write ``<sweep>/summary.csv`` and ``summary.md`` (atomically); returns the markdown."""
    from dblock.files import atomic_write

    sweep = Path(sweep)
    columns, rows = summary_table(sweep)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: "" if r[c] is None else r[c] for c in columns} for r in rows)
    data = text.getvalue().encode()
    atomic_write(sweep / "summary.csv", lambda f: f.write(data))
    table = markdown(columns, rows)
    done = sum(r["status"] == "ok" for r in rows)
    md = f"# Sweep {sweep}\n\n{done} of {len(rows)} job(s) ok.\n\n{table}"
    atomic_write(sweep / "summary.md", lambda f: f.write(md.encode()))
    return table


# --- the plot of a sweep --------------------------------------------------------------------


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _order(values):
    nums = [v for v in values if isinstance(_number(v), float)]
    if len(nums) == len(values):
        return sorted(values, key=float)
    return sorted(values, key=str)


def sweep_points(
    sweep: str | Path, metric: str = "test/acc", x: str | None = None, lines: str | None = None
) -> tuple[str, list[str], dict]:
    """What ``plot_sweep`` draws: ``(x, averaged_over, {line value: [(x value, mean, s.d., n)]})``
    over the ``ok`` jobs (the line value is None without ``lines``). ``x`` defaults to the
    first swept key other than ``seed``; a name that is not in the summary is a ValueError
    listing the choices."""
    import statistics

    columns, rows = summary_table(sweep)
    keys = columns[: columns.index("job")]
    metrics = columns[columns.index("status") + 1 :]
    if metric not in metrics:
        raise ValueError(
            f"metric={metric} is not in the summary; choose one of: {', '.join(metrics)}"
        )
    free = [k for k in keys if k != "seed"]
    x = x or (free[0] if free else (keys[0] if keys else None))
    if x is None:
        raise ValueError(f"{sweep} sweeps no key: nothing to draw against")
    for name, key in (("--x", x), ("--lines", lines)):
        if key is not None and key not in keys:
            raise ValueError(
                f"{name} {key} is not a swept key of {sweep}; choose one of: {', '.join(keys)}"
            )
    ok = [r for r in rows if r["status"] == "ok" and r[metric] is not None]
    if not ok:
        raise ValueError(f"no job of {sweep} is ok with a value of {metric}: nothing to draw")
    points = {}
    for g in _order(list({r[lines] for r in ok})) if lines else [None]:
        sub = [r for r in ok if lines is None or r[lines] == g]
        points[g] = []
        for v in _order(list({r[x] for r in sub})):
            vals = [float(r[metric]) for r in sub if r[x] == v]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            points[g].append((v, statistics.fmean(vals), sd, len(vals)))
    return x, [k for k in keys if k not in (x, lines)], points


def plot_sweep(
    sweep: str | Path,
    metric: str = "test/acc",
    x: str | None = None,
    lines: str | None = None,
    out: str | Path | None = None,
) -> Path:
    """Draw ``metric`` against the swept key ``x``, one line per value of ``lines``, mean and
    s.d. (error bars) over the jobs that differ in nothing else (seeds); ``sweep_points`` gives
    the numbers. Writes a PNG (default ``<sweep>/plot_<metric>_vs_<x>[_by_<lines>].png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dblock.files import atomic_path

    sweep = Path(sweep)
    x, over, points = sweep_points(sweep, metric, x, lines)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs_all = _order(list({p[0] for line in points.values() for p in line}))
    numeric = all(isinstance(_number(v), float) for v in xs_all)
    if not numeric:
        ax.set_xticks(range(len(xs_all)), xs_all)
    for g, line in points.items():
        pos = [float(p[0]) if numeric else xs_all.index(p[0]) for p in line]
        n = sorted({p[3] for p in line})
        label = (
            (f"{lines}={g}" if lines else metric)
            + f" (n={n[0]}"
            + (f"-{n[-1]})" if len(n) > 1 else ")")
        )
        ax.errorbar(
            pos, [p[1] for p in line], yerr=[p[2] for p in line], marker="o", capsize=3, label=label
        )
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    spread = f", mean ± s.d. over {', '.join(over)}" if over else ""
    ax.set_title(f"{metric} vs {x}{spread} ({sweep.name})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    name = f"plot_{metric}_vs_{x}" + (f"_by_{lines}" if lines else "")
    if out is None:
        out = sweep / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".png")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(out)


# --- at the end of a sweep ------------------------------------------------------------------


def report(sweep: str | Path) -> str | None:
    """Write the summary of ``sweep`` and print it; a problem is a warning, never a failed sweep."""
    try:
        table = write_summary(sweep)
    except (OSError, ValueError) as err:
        log.warning("no sweep summary: %s", err)
        return None
    print(f"sweep summary ({Path(sweep) / 'summary.csv'}, summary.md):\n{table}", end="")
    sys.stdout.flush()
    return table


def wandb_group(experiment: str | None, sweep: str | Path) -> str:
    """The wandb group of a sweep's runs: its experiment, else ``sweep-<folder name>``."""
    return experiment if experiment not in (None, "", "null") else f"sweep-{Path(sweep).name}"


def log_to_wandb(sweep: str | Path, project: str, group: str, offline: bool) -> str | None:
    """Log the summary (a table) and the default plot (an image) to one wandb run named
    ``summary``, grouped with the sweep's runs; files in ``<sweep>/wandb/``. Returns its id."""
    import wandb

    sweep = Path(sweep)
    columns, rows = summary_table(sweep)
    try:
        png = plot_sweep(sweep)
    except ValueError as err:  # nothing ok yet: the table alone
        log.warning("no sweep plot: %s", err)
        png = None
    run = wandb.init(
        project=project,
        group=group,
        job_type="summary",
        name=f"{group} summary",
        dir=str(sweep),
        mode="offline" if offline else "online",
        reinit="finish_previous",
    )
    plain = (int, float, type(None))
    cells = [[r[c] if isinstance(r[c], plain) else str(r[c]) for c in columns] for r in rows]
    payload = {"sweep/summary": wandb.Table(columns=columns, data=cells)}
    if png is not None:
        payload["sweep/plot"] = wandb.Image(str(png))
    run.log(payload)
    run_id = run.id
    run.finish()
    return run_id


class SweepSummary(SweepCallback):
    """At the end of a ``-m`` sweep: write and print its summary; with ``logger=wandb`` also log
    it to a summary run of the sweep's group."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        if report(sweep) is None:
            return
        wandb_cfg = (config.get("logger") or {}).get("wandb")
        if wandb_cfg is None:
            return
        try:
            offline = bool(wandb_cfg.offline)
        except Exception:  # the resolver is run.py's; elsewhere: offline unless told otherwise
            offline = os.environ.get("WANDB_MODE", "offline") != "online"
        choices = config.hydra.runtime.choices
        group = wandb_group(choices.get("experiment"), sweep)
        try:
            log_to_wandb(sweep, str(wandb_cfg.project), group, offline)
        except Exception as err:  # the sweep's results stand
            log.warning("the sweep summary was not logged to wandb: %s", err)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dblock.sweeps", description="Summarise or plot a sweep folder."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="write <dir>/summary.csv and summary.md and print the table")
    s.add_argument("dir")
    p = sub.add_parser("plot", help="a metric against a swept key, one line per value of another")
    p.add_argument("dir")
    p.add_argument("--metric", default="test/acc", help="default test/acc")
    p.add_argument("--x", default=None, help="swept key on the x axis (default: the first one)")
    p.add_argument("--lines", default=None, help="swept key: one line per value")
    p.add_argument("--out", default=None, help="the PNG (default: in the sweep folder)")
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":
            table = write_summary(args.dir)
            print(table, end="")
            print(f"-> {Path(args.dir) / 'summary.csv'}, summary.md")
        else:
            write_summary(args.dir)
            print(plot_sweep(args.dir, args.metric, args.x, args.lines, args.out))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
