"""Checks on dataset files and their contents: every failure is a ``DataError`` naming the file,
the sample and the fix.

All checks run on the flat arrays of a whole split (numpy, vectorised); per-sample loops run
only on the failure path, to name the first bad sample.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file and fix."""


REFETCH = "Delete the file and fetch it again (or regenerate it)."
INTEGER = "biu"  # numpy kinds accepted as integers as they are
NUMBER = "biuf"  # integers, or floats checked to be whole numbers


def path_status(path: Path, want: str = "file") -> str:
    """What is at ``path``: ``"found"`` (a ``want``, "file" or "folder"), ``"missing"``, or what
    is there instead ("a directory, not a file", "a symlink loop", "a broken symlink to X", ...).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symlink loop"
        if path.is_symlink():
            return f"a broken symlink to {os.readlink(path)}"
        if err.errno == errno.ENOTDIR:
            blocker = next(p for p in path.parents if p.exists() and not p.is_dir())
            return f"unreachable ({blocker} is a file, not a folder)"
        if err.errno in (errno.EACCES, errno.EPERM):
            return "not readable (permission denied)"
        return "missing"
    if want == "folder":
        return "found" if stat.S_ISDIR(st.st_mode) else "a file, not a folder"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a file"
    return "found" if stat.S_ISREG(st.st_mode) else "not a regular file"


def sample_of(offsets: np.ndarray, flat_pos: int) -> int:
    """Index of the sample owning flat event ``flat_pos`` (offsets (n + 1,))."""
    return int(np.searchsorted(offsets, flat_pos, side="right") - 1)


def _first_bad(per_sample, kinds: str) -> tuple[int, str]:
    """The first sample that is not a 1-D array of numbers of ``kinds`` (failure path only)."""
    for i, value in enumerate(per_sample):
        try:
            a = np.asarray(value)
        except ValueError:  # ragged nested lists
            return i, f"a ragged {type(value).__name__}"
        if a.ndim != 1 or a.dtype.kind not in kinds:
            return i, f"shape {a.shape} and type {a.dtype}"
    return len(per_sample), "an unknown layout"


def flatten(source: str, per_sample, name: str, kinds: str) -> tuple[np.ndarray, np.ndarray]:
    """``counts`` (n,) and the flat concatenation (E,) of per-sample 1-D arrays of ``kinds``.

    Anything else (text, 2-D or 3-D entries, scalars) raises ``DataError`` naming the sample.
    """
    n = len(per_sample)
    try:
        counts = np.fromiter((len(v) for v in per_sample), dtype=np.int64, count=n)
        flat = np.concatenate(per_sample) if n else np.zeros(0)
        ok = flat.ndim == 1 and flat.dtype.kind in kinds
    except (TypeError, ValueError):
        ok = False
    if not ok:
        i, what = _first_bad(per_sample, kinds)
        raise DataError(
            f"{source}: sample {i} has {name} of {what}; each sample's {name} must be a 1-D list "
            "of numbers (the SHD layout: spikes/times in seconds, spikes/units as channel "
            "indices, one variable-length list per sample). Convert the file to that layout."
        )
    return counts, flat


def _check_whole(source: str, values: np.ndarray, name: str, where) -> None:
    """Refuse non-finite or fractional float ``values``; ``where(i)`` names flat position i."""
    if values.dtype.kind != "f":
        return
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if len(bad):
        raise DataError(
            f"{source}: {where(int(bad[0]))} has {name} {values[bad[0]]}; {name}s must be whole "
            "numbers (integer indices; integral floats such as 3.0 are accepted). Fix the file: "
            "nothing is rounded or truncated for you."
        )


def check_labels(source: str, labels, n_samples: int, n_classes: int | None) -> np.ndarray:
    """Labels (n,) as int64 after checking type, shape, integrality and range."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in NUMBER:
        example = repr(labels.ravel()[:1].tolist()[0]) if labels.size else "none"
        raise DataError(
            f"{source}: labels are of type {labels.dtype} (e.g. {example}); labels must be "
            "integer class indices 0..n_classes-1. Map the class names to indices (names belong "
            "in extra/keys)."
        )
    if labels.ndim != 1 or len(labels) != n_samples:
        raise DataError(
            f"{source}: {n_samples} samples of events but labels of shape {labels.shape}; "
            "expected one label per sample, shape "
            f"({n_samples},). The file is inconsistent: delete it and fetch it again."
        )
    _check_whole(source, labels, "label", lambda i: f"sample {i}")
    if n_classes is not None and len(labels):
        bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{source}: sample {i} has label {labels[i]:g} outside [0, "
                f"n_classes={n_classes}); largest is {labels.max():g}. Set dataset.n_classes "
                "to match the data, or fix the file."
            )
    return labels.astype(np.int64)


def check_events(
    source: str,
    offsets: np.ndarray,
    flat_t: np.ndarray | None,
    flat_u: np.ndarray,
    n_in: int,
    unit_name: str = "unit",
) -> None:
    """Raise ``DataError`` naming ``source`` and the first bad sample; vectorised checks.

    ``offsets`` (n + 1,), ``flat_t`` (E,) times in seconds or None (times checked by the
    reader), ``flat_u`` (E,) channels (integers, or floats that must be whole numbers).
    """
    if flat_t is not None:
        bad = np.flatnonzero(~np.isfinite(flat_t) | (flat_t < 0))
        if len(bad):
            i, t = sample_of(offsets, bad[0]), flat_t[bad[0]]
            raise DataError(
                f"{source}: sample {i} has a negative or non-finite time ({t}); times must be "
                "finite seconds >= 0. Fix or drop that sample, or fetch the file again."
            )
    _check_whole(source, flat_u, unit_name, lambda e: f"sample {sample_of(offsets, e)}")
    bad = np.flatnonzero((flat_u < 0) | (flat_u >= n_in))
    if len(bad):
        i, u, top = sample_of(offsets, bad[0]), flat_u[bad[0]], flat_u.max()
        raise DataError(
            f"{source}: sample {i} has {unit_name} {u:g} outside [0, n_in={n_in}); largest is "
            f"{top:g}. Set dataset.n_in to at least {int(top) + 1} if the data are right, or "
            "fix the file."
        )


def time_hint(t_max_s: float, span_s: float) -> str:
    """The likely cause when most events fall beyond T: a unit mistake, or a short T."""
    ratio = t_max_s / span_s if span_s > 0 else float("inf")
    if ratio > 1e5:
        return (
            f"the largest time is {t_max_s:g}: the times look like microseconds (often integer "
            "microseconds), but the SHD layout stores seconds. Divide them by 1e6"
        )
    if ratio > 100:
        return (
            f"the largest time is {t_max_s:g}: the times look like milliseconds, but the SHD "
            "layout stores seconds. Divide them by 1000"
        )
    return (
        f"the samples last up to {t_max_s:g} s but T covers {span_s:g} s. Raise dataset.t_len "
        "(or dataset.dt_ms)"
    )


def check_dropped(
    source: str,
    n_events: int,
    n_dropped: int,
    limit: float,
    t_len: int,
    dt_ms: float,
    hint: Callable[[], str],
) -> None:
    """Refuse a split where more than ``limit`` of the events fall at or beyond T; ``hint()``
    (called only then: it may read the file again) words the likely cause."""
    if n_events == 0 or n_dropped <= limit * n_events:
        return
    raise DataError(
        f"{source}: {n_dropped} of {n_events} events ({100 * n_dropped / n_events:.1f} %) fall "
        f"at or beyond T = t_len x dt_ms = {t_len} x {dt_ms:g} ms = {t_len * dt_ms / 1000:g} s "
        f"and would be dropped; {hint()}. If the data are right and you mean to keep only the "
        f"start of each sample, set dataset.max_dropped_fraction=1 (now {limit:g})."
    )
