"""The on-disk cache of binned event stores.

A split's store is written once as an uncompressed ``.npz`` (flat int16 units, bins and repeat
counts of each sample's entries in (bin, unit) order, offsets, labels, per-sample drop counts)
under the cache directory, named by a key that hashes the source files' identity (absolute path,
size, modification time in ns), ``dt``, ``T``, ``n_in``, ``n_classes`` and the cache format
version. Any change to those gives a new key, so a stale entry is never read. Each split keeps
its ``KEEP`` most recently used entries (a sweep over dt or T does not rebuild every time);
older ones are deleted when a new one is written.

Entries are written atomically (``dblock.files.atomic_path``) and carry a checksum of their
arrays: the meta record, written last, holds the CRC-32 of every array member of the ``.npz``
(zip) file. ``np.load`` already verifies each member's bytes against the CRC-32 in the zip
directory as it reads them, so comparing those directory CRCs with the recorded ones costs no
extra pass over the data. What this protects against: corruption and truncation (a damaged
byte, a cut file, a member or record lost), and arrays replaced without their record. What it
cannot: the checksums live in the entry they check, so someone who can write the cache can
also rewrite them; such an entry is only checked as data.

An entry's contents are data, never trusted as more: its own record gives no path and no size
that is used; ``n_in`` and ``t_len`` come from the run's settings (an entry that disagrees is
rebuilt), and the arrays are checked for shapes, dtypes and ranges (units < n_in, bins < T,
offsets that cut the entries in order, labels < n_classes) before use, so a malformed entry is
rebuilt instead of indexing out of range.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from datamodules.store import EventStore
from dblock.files import atomic_path, remove_orphans

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: array checksums in the meta record; 3: entries in order, with repeats
KEEP = 4  # entries kept per split
ARRAYS = ("units", "bins", "offsets", "labels", "dropped", "raw_counts", "repeats")


def file_identity(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime_ns) of each file: the source part of a cache key."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    return out


def cache_key(sources: list, **params) -> str:
    """A short hash of the sources' identity, the binning parameters and the format version."""
    spec = {"version": CACHE_VERSION, "sources": sources, **params}
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_store(path: Path, store: EventStore, key: str) -> None:
    """Write ``store`` to ``path`` atomically, with the CRC-32 of each array in its meta record."""
    arrays = {k: getattr(store, k).numpy() for k in ARRAYS if getattr(store, k) is not None}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():  # what np.savez writes, member by member
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
        crc = {info.filename: info.CRC for info in zf.infolist()}
        meta = json.dumps({"key": key, "n_in": store.n_in, "t_len": store.t_len, "crc": crc})
        with zf.open("meta.npy", "w") as member:
            np.lib.format.write_array(member, np.array(meta), allow_pickle=False)


def check_arrays(arrays: dict, n_in: int, t_len: int, n_classes: int | None) -> str | None:
    """What is wrong with a loaded entry's ``arrays`` for a store of ``n_in`` x ``t_len``
    (``n_classes`` labels), or None when it is well formed."""
    units, bins, offsets, labels = (arrays.get(k) for k in ("units", "bins", "offsets", "labels"))
    if any(a is None or a.dim() != 1 for a in (units, bins, offsets, labels)):
        return "missing or not 1-d arrays"
    if any(a.is_floating_point() or a.is_complex() for a in arrays.values() if a is not None):
        return "non-integer arrays"
    n, e = labels.shape[0], units.shape[0]
    if offsets.shape[0] != n + 1 or bins.shape[0] != e:
        return "array lengths that do not match"
    if int(offsets[0]) != 0 or int(offsets[-1]) != e or bool((offsets.diff() < 0).any()):
        return "offsets out of order"
    for name, arr, high in (("units", units, n_in), ("bins", bins, t_len),
                            ("labels", labels, n_classes)):
        if len(arr) and (int(arr.min()) < 0 or (high is not None and int(arr.max()) >= high)):
            return f"{name} out of range"
    for name in ("dropped", "raw_counts", "repeats"):
        a = arrays.get(name)
        if a is not None and a.shape != ((e,) if name == "repeats" else (n,)):
            return f"{name} of the wrong length"
    return None


def load_store(
    path: Path,
    key: str,
    n_in: int | None = None,
    t_len: int | None = None,
    n_classes: int | None = None,
) -> EventStore | None:
    """The store cached at ``path``, or None when it is absent, unreadable, of another key,
    fails its checksums (the zip's CRC-32 of every member, checked while it is read) or is not a
    well-formed store of ``n_in`` x ``t_len`` (``n_classes``) (``check_arrays``; a size not
    given is the entry's own, still range-checked)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key:
                return None
            crc = {i.filename: i.CRC for i in z.zip.infolist() if i.filename != "meta.npy"}
            if crc != meta.get("crc"):
                log.warning(
                    "cache file %s does not match its checksums (changed after it was written); "
                    "rebuilding it",
                    path,
                )
                return None
            arrays = {k: torch.from_numpy(z[k]) if k in z else None for k in ARRAYS}
        n_in = meta.get("n_in") if n_in is None else n_in
        t_len = meta.get("t_len") if t_len is None else t_len
        if (meta.get("n_in"), meta.get("t_len")) != (n_in, t_len) or not all(
            isinstance(v, int) and v > 0 for v in (n_in, t_len)
        ):
            problem = f"n_in, t_len {meta.get('n_in')}, {meta.get('t_len')} for {n_in}, {t_len}"
        else:
            problem = check_arrays(arrays, n_in, t_len, n_classes)
    except Exception as err:  # a truncated, damaged or foreign file: rebuild it
        log.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, err)
        return None
    if problem is not None:
        log.warning("cache file %s is not a valid store (%s); rebuilding it", path, problem)
        return None
    return EventStore(n_in=n_in, t_len=t_len, **arrays)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # deleted meanwhile by another process
        return 0.0


def cached_store(
    cache_dir: Path | None,
    name: str,
    sources: list[Path],
    build: Callable[[], EventStore],
    **params,
) -> EventStore:
    """Load the store of ``name`` from ``cache_dir``, or ``build()`` it and cache it.

    ``sources`` are the files the store is made from (their identity is part of the key);
    ``params`` are the binning parameters (dt_ms, t_len, n_in, n_classes). ``cache_dir`` None
    disables the cache. A cache directory that cannot be written only costs a warning.
    """
    if cache_dir is None:
        return build()
    key = cache_key(file_identity(sources), **params)
    path = Path(cache_dir) / f"{name}-{key}.npz"
    remove_orphans([cache_dir])  # temp files of killed writers
    store = load_store(path, key, params.get("n_in"), params.get("t_len"), params.get("n_classes"))
    if store is not None:
        log.debug("%s: read from cache %s", name, path)
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        return store
    store = build()
    try:
        save_store(path, store, key)
        entries = sorted(Path(cache_dir).glob(f"{name}-*.npz"), key=_mtime, reverse=True)
        for old in entries[KEEP:]:
            old.unlink(missing_ok=True)
        log.info("%s: cached in %s", name, path)
    except OSError as err:
        log.warning("cannot write the cache %s (%s); continuing without it", path, err)
    return store
