"""What the cache checksum costs: the cached load of an SHD-sized store, checked vs unchecked.

    python -m experiments.bench_cache                 # SHD train: 8156 samples, 40.6 M events
    python -m experiments.bench_cache --rounds 15 --events 4000000

``load_store`` compares the CRC-32 values in the entry's meta record with those of the zip
directory (np.load verifies every member's bytes against the latter as it reads them). The
unchecked load is the same read without that comparison (the cache before checksums). A separate
``zlib.crc32`` / ``adler32`` pass over the arrays is timed for contrast: that is what a checksum
computed on load would add. Rounds are interleaved; medians are reported, and ratios matter more
than seconds on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from datamodules.cache import ARRAYS, load_store, save_store
from datamodules.store import EventStore


def shd_sized(n: int, events: int, seed: int = 0) -> EventStore:
    rng = np.random.default_rng(seed)
    units = rng.integers(0, 700, events).astype(np.int16)
    bins = rng.integers(0, 500, events).astype(np.int16)
    offsets = np.sort(rng.integers(0, events, n + 1))
    offsets[0], offsets[-1] = 0, events  # every event belongs to a sample
    return EventStore(
        units=torch.from_numpy(units),
        bins=torch.from_numpy(bins),
        offsets=torch.from_numpy(offsets.astype(np.int64)),
        labels=torch.from_numpy(rng.integers(0, 20, n)),
        n_in=700,
        t_len=500,
        dropped=torch.zeros(n, dtype=torch.long),
        raw_counts=torch.zeros(n, dtype=torch.long),
    )


def unchecked(path: Path, key: str) -> EventStore | None:
    """The cached load without the checksum comparison (as before checksums)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("key") != key:
            return None
        arrays = {k: torch.from_numpy(z[k]) if k in z else None for k in ARRAYS}
    return EventStore(n_in=meta["n_in"], t_len=meta["t_len"], **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8156)
    parser.add_argument("--events", type=int, default=40_600_000)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shd_train-key.npz"
        save_store(path, shd_sized(args.samples, args.events), "key")
        times: dict[str, list[float]] = {"checked": [], "unchecked": [], "crc32": [], "adler32": []}
        loads = [("checked", load_store), ("unchecked", unchecked)]
        for r in range(args.rounds):
            for name, fn in loads[:: 1 if r % 2 else -1]:  # alternate which goes first
                t = time.perf_counter()
                store = fn(path, "key")
                times[name].append(time.perf_counter() - t)
                assert store is not None
                if name == "checked":
                    arrays = [getattr(store, k).numpy() for k in ARRAYS]
                del store  # one store in memory at a time
            for name, fn in (("crc32", zlib.crc32), ("adler32", zlib.adler32)):
                t = time.perf_counter()
                for a in arrays:
                    fn(a)
                times[name].append(time.perf_counter() - t)
            del arrays
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.samples} samples, {args.events} events, {args.rounds} rounds (medians):")
    for k, v in med.items():
        print(f"  {k:9s} {v * 1000:8.1f} ms")
    print(f"checked / unchecked load: {med['checked'] / med['unchecked']:.3f}")
    print(
        f"a crc32 pass on load would add {100 * med['crc32'] / med['unchecked']:.0f} %, "
        f"adler32 {100 * med['adler32'] / med['unchecked']:.0f} %"
    )


if __name__ == "__main__":
    main()
