"""The SHD/SSC HDF5 format (docs/model.md §6): read and write ``spikes/times``,
``spikes/units`` and ``labels``, and the hint given when a file's times do not fit T.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import h5py
import numpy as np

from datamodules.checks import (
    REFETCH,
    DataError,
    path_status,
    time_hint,
)
from datamodules.store import H5_KEYS, EventStore, build_store
from dblock.files import atomic_write

log = logging.getLogger(__name__)



def read_h5(
    path: Path, n_in: int, t_len: int, dt_ms: float, n_classes: int | None = None
) -> EventStore:
    """Read an SHD-layout HDF5 file (``spikes/times`` s, ``spikes/units``, ``labels``) in bulk."""
    path = Path(path)
    status = path_status(path)
    if status != "found":
        raise DataError(f"dataset file {path} is {status}: put the file there, or fix the path")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in H5_KEYS if k not in f]
            if missing:
                raise DataError(
                    f"{path} lacks {', '.join(missing)} (has {sorted(f.keys())}); it is not in "
                    f"the SHD layout (spikes/times, spikes/units, labels). {REFETCH}"
                )
            for key in H5_KEYS:
                obj = f[key]
                if not isinstance(obj, h5py.Dataset) or obj.ndim == 0:
                    kind = "a group" if isinstance(obj, h5py.Group) else "a single value"
                    raise DataError(
                        f"{path}: {key} is {kind}, not one entry per sample; the file is not in "
                        f"the SHD layout. {REFETCH}"
                    )
            times = list(f["spikes/times"][:])
            units = list(f["spikes/units"][:])
            labels = np.asarray(f["labels"][:])
    except DataError:
        raise
    except Exception as err:  # h5py raises OSError, KeyError, ValueError, TypeError, ...
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}). {REFETCH}") from err
    store = build_store(times, units, labels, n_in, t_len, dt_ms, n_classes, source=str(path))
    log.debug("%s: %d samples, %d events", path.name, len(store), store.n_events)
    return store


def h5_max_time(path: Path) -> float | None:
    """The largest time stored in an SHD-layout file (None when unreadable or empty)."""
    try:
        with h5py.File(path, "r") as f:
            times = f["spikes/times"][:]
        flat = np.concatenate(list(times)) if len(times) else np.zeros(0)
        return float(np.max(flat)) if flat.size else None
    except Exception:  # only used to word an error message
        return None


def h5_time_hint(path: Path, t_len: int, dt_ms: float) -> str:
    """Why most events of an SHD-layout file fall beyond T, from its largest time."""
    t_max = h5_max_time(path)
    if t_max is None:
        return "check that the times are in seconds"
    return time_hint(t_max, t_len * dt_ms / 1000.0)


def write_h5(
    path: Path,
    times: list[np.ndarray],
    units: list[np.ndarray],
    labels: np.ndarray,
    speakers: np.ndarray | None = None,
    keys: list[str] | None = None,
    attrs: dict | None = None,
) -> None:
    """Write events in the SHD HDF5 layout: vlen float16 times (s), vlen uint16 units.

    The file is built in memory and written with plain file IO through ``atomic_path``: it
    appears whole or not at all, and a full disk is one ``DiskFullError`` (libhdf5 never sees
    the failed write, which it reports as a close error and can crash on at exit).
    """
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        spikes = f.create_group("spikes")
        t_ds = spikes.create_dataset("times", (len(times),), dtype=h5py.vlen_dtype(np.float16))
        u_ds = spikes.create_dataset("units", (len(units),), dtype=h5py.vlen_dtype(np.uint16))
        for i, (t, u) in enumerate(zip(times, units, strict=True)):
            t_ds[i] = np.asarray(t, dtype=np.float16)
            u_ds[i] = np.asarray(u, dtype=np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.uint16))
        extra = f.create_group("extra")
        n_classes = int(np.max(labels)) + 1 if len(labels) else 0
        names = keys if keys is not None else [f"class_{c}" for c in range(n_classes)]
        extra.create_dataset("keys", data=np.array(names, dtype=h5py.string_dtype()))
        spk = speakers if speakers is not None else np.zeros(len(labels), dtype=np.uint16)
        extra.create_dataset("speaker", data=np.asarray(spk, dtype=np.uint16))
        f.attrs.update(attrs or {})
    # one temp file per process (parallel jobs) beside the target, fsynced, then renamed;
    # a failure removes it, and a killed writer's is removed at the next start
    atomic_write(path, lambda out: out.write(buf.getbuffer()))
