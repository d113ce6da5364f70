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
