"""SHD, SSC and N-MNIST: files in tonic's layout under ``data_dir``, read once into the store.

Layouts (as ``tonic.datasets`` stores them under ``save_to``)::

    <data_dir>/SHD/shd_train.h5, shd_test.h5
    <data_dir>/SSC/ssc_train.h5, ssc_valid.h5, ssc_test.h5
    <data_dir>/NMNIST/Train/<digit>/<id>.bin, <data_dir>/NMNIST/Test/<digit>/<id>.bin

Files already in place are used as they are (no archive needed beside them). Missing ones are
downloaded through tonic's own dataset classes (progress bar from tonic); when that fails, a
``DataError`` lists every path looked for and how to place the files by hand. SHD and SSC are
extracted atomically: tonic works in a staging folder beside the target (an archive already in
place is linked in, and tonic reuses it once its md5 verifies), then the archive and the file
are renamed into place, so a kill during the extraction leaves no partial file behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from datamodules.base import EventDataModule
from datamodules.checks import DataError, check_events, path_status
from datamodules.hdf5 import h5_time_hint, read_h5
from datamodules.store import EventStore, concat_stores, store_from_flat
from dblock.files import fsync_dir, fsync_file, remove_orphans, tmp_path
from dblock.values import boolean

log = logging.getLogger(__name__)


class DownloadUndo:
    """Removes what a failed download into ``folder`` created: new files directly in it (an
    empty or partial archive), then the folders it created (``folder`` and missing parents),
    each only if it is empty by then. Files that were there before are never touched."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.before = set(os.listdir(folder)) if folder.is_dir() else set()
        self.new_dirs = []
        p = folder
        while not os.path.lexists(p) and p != p.parent:
            self.new_dirs.append(p)  # deepest first
            p = p.parent

    def __call__(self) -> None:
        if self.folder.is_dir():
            for name in set(os.listdir(self.folder)) - self.before:
                p = self.folder / name
                if p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
        for p in self.new_dirs:
            try:
                p.rmdir()
            except OSError:  # not empty (or gone): leave it
                break
        log.debug("removed what the failed download created under %s", self.folder)


class TonicDataModule(EventDataModule):
    """Common part: file layout, presence check, download through tonic, cached loading.

    Args:
        data_dir: the data root holding tonic's folder (``SHD/``, ``SSC/``, ``NMNIST/``).
        *args, **kwargs: the ``EventDataModule`` settings (``n_in``, ``n_classes``, ``t_len``,
            ``dt_ms``, ``batch_size``, ``val_fraction``, ``split_seed``, ``cache``,
            ``cache_dir``, ``max_dropped_fraction``, ``input``).
        download: fetch a missing split through tonic (False: stop and say where to put it).
    """

    folder = ""  # tonic's folder under save_to (the tonic class name)
    splits: tuple[str, ...] = ("train", "test")

    def __init__(self, data_dir: str | Path, *args, download: bool = True, **kwargs) -> None:
        super().__init__(data_dir, *args, **kwargs)
        self.download = boolean("dataset.download", download)

    def path(self, split: str) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def status(self, split: str) -> str:
        """"found", "missing..." (downloadable) or what blocks ``split``'s path."""
        return path_status(self.path(split), "file")

    def present(self, split: str) -> bool:
        return self.status(split) == "found"

    def source(self, split: str) -> str:
        return str(self.path(split))

    def time_hint(self, split: str) -> str:
        return h5_time_hint(self.path(split), self.t_len, self.dt_ms)

    def sources(self, split: str) -> list[Path]:
        """The files whose identity keys the cache of ``split``."""
        return [self.path(split)]

    def archive_url(self, split: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def tonic_download(self, split: str) -> None:  # pragma: no cover - abstract
        """Instantiate tonic's dataset for ``split``: downloads and extracts when missing."""
        raise NotImplementedError

    def writes_data_dir(self) -> bool:
        """Only a split that is missing and will be downloaded needs a writable ``data_dir``."""
        return self.download and not all(self.present(s) for s in self.needed_splits())

    def needed_splits(self) -> tuple[str, ...]:
        if "valid" in self.splits and self.val_fraction == 0:
            return tuple(s for s in self.splits if s != "valid")
        return self.splits

    def refuse_blocked(self, split: str) -> None:
        """Stop, downloading nothing, when something other than the data sits at its path."""
        status = self.status(split)
        if status != "found" and not status.startswith("missing"):
            raise DataError(
                f"{self.name}: {self.path(split)} is {status}, where the {split} split should "
                "be. Nothing was downloaded over it: remove or rename it, or put the real data "
                "there, then run again."
            )

    def ensure(self, split: str) -> None:
        """Make sure ``split`` is on disk: use it, else download it through tonic, else explain.

        A failed download leaves nothing behind: the folders it created and the files it
        started in the dataset folder are removed again.
        """
        self.refuse_blocked(split)
        if self.present(split):
            return
        cause = "download=false"
        if self.download:
            log.info("%s %s not found under %s: downloading through tonic", self.name, split,
                     self.data_dir)
            undo = DownloadUndo(self.data_dir / self.folder)
            try:
                self.tonic_download(split)
                cause = "the download did not produce it"
            except Exception as err:  # no network, dead link, bad checksum, full disk, ...
                cause = f"the download failed ({type(err).__name__}: {err})"
                undo()
            if self.present(split):
                return
        looked = "\n".join(f"  {self.path(s)}  [{self.status(s)}]" for s in self.splits)
        raise DataError(
            f"{self.name}: the {split} split is missing under {self.data_dir} and {cause}.\n"
            f"Looked for:\n{looked}\n{self.by_hand()}"
        )

    def by_hand(self) -> str:
        urls = "\n".join(f"  {self.archive_url(s)}" for s in self.splits)
        return (
            f"To place the files by hand, download\n{urls}\nand extract each into "
            f"{self.data_dir / self.folder}/ (the archives themselves are not needed afterwards), "
            "or point paths.data_dir (or $DBLOCK_DATA) at the directory that holds "
            f"{self.folder}/."
        )

    def prepare_data(self) -> None:
        for split in self.needed_splits():  # before any download
            self.refuse_blocked(split)
        for split in self.needed_splits():
            self.ensure(split)

    def read(self, split: str) -> EventStore:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_split(self, split: str) -> EventStore:
        self.ensure(split)
        return self.load_cached(split, self.sources(split), lambda: self.read(split))


class SHDDataModule(TonicDataModule):
    """Spiking Heidelberg Digits: ``<data_dir>/SHD/shd_{train,test}.h5``, 700 inputs, 20 classes."""

    name = "shd"
    folder = "SHD"
    prefix = "shd"

    def path(self, split: str) -> Path:
        return self.data_dir / self.folder / f"{self.prefix}_{split}.h5"

    def _tonic_class(self):
        import tonic

        return getattr(tonic.datasets, self.folder)

    def archive_url(self, split: str) -> str:
        cls = self._tonic_class()
        return cls.base_url + getattr(cls, f"{split}_zip")

    def tonic_download(self, split: str) -> None:
        self.staged(split, lambda save_to: self._tonic_class()(save_to=save_to,
                                                                 train=split == "train"))

    def staged(self, split: str, run_tonic) -> None:
        """``run_tonic(save_to)`` in a staging folder beside ``path(split)`` (named as a temp
        file of this process: a killed run's is removed at the next start), then the archive
        and the extracted file renamed into place, the file last: it appears whole or not at
        all. An archive already in ``<data_dir>/<folder>/`` is linked into the stage first, so
        tonic checks its md5 and reuses it instead of downloading it again."""
        target = self.path(split)
        folder = target.parent
        folder.mkdir(parents=True, exist_ok=True)
        remove_orphans([folder])
        stage = tmp_path(target)
        work = stage / self.folder
        work.mkdir(parents=True)
        try:
            archive = Path(self.archive_url(split).rsplit("/", 1)[-1])
            if (folder / archive).is_file():
                os.link(folder / archive, work / archive)
            run_tonic(str(stage))
            if (work / archive).is_file():  # downloaded now, or the one linked in
                os.replace(work / archive, folder / archive)
            if (work / target.name).is_file():
                fsync_file(work / target.name)
                os.replace(work / target.name, target)
            fsync_dir(folder)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def read(self, split: str) -> EventStore:
        return read_h5(self.path(split), self.n_in, self.t_len, self.dt_ms, self.n_classes)


class SSCDataModule(SHDDataModule):
    """Spiking Speech Commands: ``<data_dir>/SSC/ssc_{train,valid,test}.h5``, 35 classes.

    Validation is ``ssc_valid.h5``; ``val_fraction=0`` drops validation (the file is then not
    needed), any other value selects the valid file.
    """

    name = "ssc"
    folder = "SSC"
    prefix = "ssc"
    has_valid_file = True
    splits = ("train", "valid", "test")

    def tonic_download(self, split: str) -> None:
        self.staged(split, lambda save_to: self._tonic_class()(save_to=save_to, split=split))


# --- N-MNIST -------------------------------------------------------------------------------

NMNIST_SIZE = 34
OVERFLOW_Y = 240  # a record with y == 240 marks a timestamp overflow (tonic.io.read_mnist_file)
OVERFLOW_US = 2**13


def decode_nmnist(raw: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Decode concatenated N-MNIST records (5 bytes each) of several files, vectorised.

    ``raw`` (5 R,) uint8, ``sizes`` (F,) records per file. Returns ``x, y, t_us`` (E,) of the
    real events and ``counts`` (F,) events per file, following ``tonic.io.read_mnist_file``:
    byte 0 x, byte 1 y, bit 7 of byte 2 polarity, 23 bits of time in us; a record with y == 240
    adds 2**13 us to every later time of its file and is not an event.
    """
    rec = raw.reshape(-1, 5).astype(np.uint32)
    x, y = rec[:, 0], rec[:, 1]
    t = ((rec[:, 2] & 127) << 16) | (rec[:, 3] << 8) | rec[:, 4]
    overflow = y == OVERFLOW_Y
    if overflow.any():
        seen = np.cumsum(overflow, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        before = np.where(starts > 0, seen[np.maximum(starts - 1, 0)], 0)
        t = t.astype(np.int64) + OVERFLOW_US * (seen - np.repeat(before, sizes))
    real = ~overflow
    file_of = np.repeat(np.arange(len(sizes)), sizes)[real]
    counts = np.bincount(file_of, minlength=len(sizes))
    return x[real], y[real], t[real], counts


def list_nmnist(folder: Path, n_classes: int) -> tuple[list[Path], np.ndarray]:
    """The ``.bin`` files of ``folder/<digit>/`` (sorted as tonic does) and their labels."""
    files, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not sub.name.isdigit() or int(sub.name) >= n_classes:
            raise DataError(
                f"{sub}: N-MNIST class folders are named 0..{n_classes - 1}, found {sub.name!r} "
                f"(label outside the class range). Remove it or set dataset.n_classes."
            )
        found = sorted(sub.glob("*.bin"))
        files += found
        labels += [int(sub.name)] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def read_nmnist(
    folder: Path, n_in: int, t_len: int, dt_ms: float, n_classes: int, chunk: int = 4096
) -> EventStore:
    """Convert N-MNIST's binary files under ``folder`` into a store: input ``x + 34 y``,
    polarities merged, ``bin = round(t_us / (1000 dt))``, bins >= ``t_len`` dropped."""
    files, labels = list_nmnist(folder, n_classes)
    if not files:
        raise DataError(f"{folder}: no N-MNIST .bin files under {folder}/<digit>/")
    parts = []
    bar = tqdm(total=len(files), desc=f"decoding {folder.name}", unit="file", disable=None)
    for lo in range(0, len(files), chunk):
        part = files[lo : lo + chunk]
        blobs = [np.fromfile(f, dtype=np.uint8) for f in part]
        sizes = np.array([len(b) for b in blobs], dtype=np.int64)
        bad = np.flatnonzero(sizes % 5)
        if len(bad):
            raise DataError(
                f"{part[bad[0]]} (sample {lo + bad[0]}): {sizes[bad[0]]} bytes is not a whole "
                "number of 5-byte N-MNIST records; the file is truncated. Extract it again."
            )
        x, y, t, c = decode_nmnist(np.concatenate(blobs) if blobs else np.zeros(0, np.uint8),
                                   sizes // 5)
        u = x.astype(np.int64) + NMNIST_SIZE * y.astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(c)])
        bad = np.flatnonzero((x >= NMNIST_SIZE) | (y >= NMNIST_SIZE))
        if len(bad):
            i = int(np.searchsorted(offsets, bad[0], side="right") - 1)
            raise DataError(
                f"{part[i]} (sample {lo + i}): pixel ({int(x[bad[0]])}, {int(y[bad[0]])}) "
                f"outside the {NMNIST_SIZE}x{NMNIST_SIZE} sensor; the file is corrupt. "
                "Extract it again."
            )
        check_events(str(folder), offsets, None, u, n_in, unit_name="input x + 34 y")
        b = np.round(t / (1000.0 * dt_ms))
        parts.append(store_from_flat(c, b, u, labels[lo : lo + chunk], n_in, t_len))
        bar.update(len(part))
    bar.close()
    return concat_stores(parts)


class NMNISTDataModule(TonicDataModule):
    """N-MNIST in tonic's extracted layout ``<data_dir>/NMNIST/{Train,Test}/<digit>/*.bin``.

    Converted once (first 300 ms at 1 ms by default, 1156 = 34 x 34 inputs) and cached.
    """

    name = "nmnist"
    folder = "NMNIST"

    def path(self, split: str) -> Path:
        return self.data_dir / self.folder / ("Train" if split == "train" else "Test")

    def status(self, split: str) -> str:
        status = path_status(self.path(split), "folder")
        if status == "found" and not any(self.path(split).glob("*/*.bin")):
            return "missing (a folder without <digit>/*.bin files)"
        return status

    def time_hint(self, split: str) -> str:
        return (
            "N-MNIST samples last about 300 ms (their times are read in microseconds and "
            "converted), so T is too short for them. Raise dataset.t_len (or dataset.dt_ms)"
        )

    def sources(self, split: str) -> list[Path]:
        return sorted(self.path(split).glob("*/*.bin"))

    def archive_url(self, split: str) -> str:
        import tonic

        cls = tonic.datasets.NMNIST
        return f"{cls.train_url if split == 'train' else cls.test_url} ({split}.zip)"

    def tonic_download(self, split: str) -> None:
        import tonic

        tonic.datasets.NMNIST(save_to=str(self.data_dir), train=split == "train")

    def read(self, split: str) -> EventStore:
        return read_nmnist(self.path(split), self.n_in, self.t_len, self.dt_ms, self.n_classes)
