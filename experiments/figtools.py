"""Shared helpers of the figure scripts: read a sweep's results.json files, aggregate over seeds,
write markdown tables. Figure scripts read results, they never train."""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("figures")

CONFIG_KEYS = (
    "dataset",
    "model",
    "d",
    "layers",
    "n_hidden",
    "recurrent",
    "detach_recurrent",
    "seed",
)


def load_results(dirs: Iterable[str | Path]) -> list[dict]:
    """Every results.json under ``dirs`` (recursively), one per configuration and seed.

    Each record gets ``path``. When the same configuration and seed appear twice, the newest
    file wins (a rerun of the same job) and the older one is reported.
    """
    found: dict[tuple, dict] = {}
    for root in map(Path, dirs):
        if not root.is_dir():
            raise FileNotFoundError(
                f"no such sweep directory: {root} (pass the folder a sweep wrote)"
            )
        for path in sorted(root.rglob("results.json")):
            try:
                rec = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path} is not valid JSON ({err}); delete or rerun that job"
                ) from err
            missing = [k for k in CONFIG_KEYS if k not in rec]
            if missing:
                raise ValueError(f"{path} lacks {missing}: not a dblock results.json")
            rec["path"] = str(path)
            rec["mtime"] = path.stat().st_mtime
            key = tuple(rec[k] for k in CONFIG_KEYS)
            if key in found:
                old, new = sorted((found[key], rec), key=lambda r: r["mtime"])
                log.warning(
                    "duplicate run %s: using %s, ignoring %s", key, new["path"], old["path"]
                )
                rec = new
            found[key] = rec
    if not found:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, dirs))}")
    return list(found.values())


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample s.d., n); s.d. is 0 for a single value."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan"), 0
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd, len(values)


def aggregate(records: list[dict], key: Callable[[dict], object], value: Callable[[dict], float]):
    """{key: (mean, s.d., n seeds)} over the records grouped by ``key``."""
    groups: dict[object, list[float]] = defaultdict(list)
    for rec in records:
        groups[key(rec)].append(value(rec))
    order = sorted(groups, key=lambda k: (type(k).__name__, k))  # numeric order of d, layers
    return {k: mean_sd(groups[k]) for k in order}


def fmt(mean: float, sd: float, n: int, digits: int = 1) -> str:
    if n == 0:
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f} (n={n})"


def paper_fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save(fig, out: Path, table: str, title: str) -> tuple[Path, Path]:
    """Write ``out``.png and ``out``.md (the title and the table); returns both paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png, md = out.with_suffix(".png"), out.with_suffix(".md")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    md.write_text(f"## {title}\n\n{table}")
    log.info("wrote %s and %s", png, md)
    return png, md


def table_of(markdown: str) -> tuple[list[str], list[list[str]], str]:
    """(columns, rows, the notes after the table) of a table written by ``markdown_table``."""
    lines = markdown.strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    rows = [c for line, c in zip(lines, cells, strict=True) if line.startswith("|")]
    notes = "\n".join(line for line in lines if not line.startswith("|")).strip()
    return rows[0], rows[2:], notes  # rows[1]: the |---| line


def add_wandb_options(parser) -> None:
    """``--wandb`` and its options, the same for every figure script."""
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log each panel (image) and its table of ours vs paper to one wandb run, in\n"
        "the group --wandb-group; offline unless you are logged in (files under --out/wandb;\n"
        "upload with `wandb sync <out>/wandb/offline-run-*`)",
    )
    parser.add_argument("--wandb-project", default="dblock", help="wandb project (dblock)")
    parser.add_argument("--wandb-group", default="figures", help="wandb group (figures)")
    parser.add_argument("--wandb-offline", action="store_true", help="offline even if logged in")


def wandb_offline() -> bool:
    """Offline unless logged in: run.py's rule (WANDB_MODE, WANDB_API_KEY, netrc), one
    definition; imported here only when a figure is logged."""
    from dblock.launch.wandb_setup import wandb_offline as offline

    return offline()


def log_to_wandb(panels: list[tuple[str, Path, str, str]], job_type: str, args) -> Path:
    """One wandb run (group ``args.wandb_group``, job type ``job_type``) holding, per panel
    ``(name, png, markdown table, title)``: ``<name>/panel`` (the image), ``<name>/table``
    (the table's rows) and, in the summary, ``<name>/notes`` (the lines after the table).
    Returns the run's folder."""
    import wandb

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    offline = args.wandb_offline or wandb_offline()
    run = wandb.init(
        project=args.wandb_project,
        group=args.wandb_group,
        job_type=job_type,
        dir=str(out),
        mode="offline" if offline else "online",
        config={k: v for k, v in vars(args).items() if not k.startswith("wandb")},
        reinit="finish_previous",
    )
    try:
        logged = {}
        for name, png, table, title in panels:
            columns, rows, notes = table_of(table)
            logged[f"{name}/panel"] = wandb.Image(str(png), caption=title)
            logged[f"{name}/table"] = wandb.Table(columns=columns, data=rows)
            if notes:
                run.summary[f"{name}/notes"] = notes
        run.log(logged)  # one step: the panels side by side
        folder = Path(run.dir).parent
    finally:
        run.finish()
    log.info("logged %d panel(s) to wandb run %s (%s)", len(panels), run.id, folder)
    return folder
