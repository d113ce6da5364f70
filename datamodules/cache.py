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
extra pass over the data, yet an entry whose arrays were replaced (even by a well-formed file
with the right key) or damaged is rebuilt from the source instead of being used.
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

from datamodules.events import EventStore
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


def load_store(path: Path, key: str) -> EventStore | None:
    """The store cached at ``path``, or None when it is absent, unreadable, of another key or
    fails its checksums (the zip's CRC-32 of every member, checked while it is read)."""
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
    except Exception as err:  # a truncated, damaged or foreign file: rebuild it
        log.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, err)
        return None
    return EventStore(n_in=meta["n_in"], t_len=meta["t_len"], **arrays)


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
    store = load_store(path, key)
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
