"""SHD, SSC and N-MNIST in their real formats and tonic's layouts: loading, binning, cache,
validation splits, and every bad input named in the data section of the README."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from datamodules.checks import DataError
from datamodules.hdf5 import write_h5
from datamodules.tonic_datasets import NMNISTDataModule, SHDDataModule, SSCDataModule
from tests.conftest import encode_nmnist, random_events
from tests.faults import run_cli

ROOT = Path(__file__).resolve().parents[1]


def from_config(name: str, data_dir: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={name}", f"paths.data_dir={data_dir}",
                                           *overrides])
    return instantiate(cfg.dataset, _convert_="all"), cfg


def hand_dense(times, units, n_in, t_len, dt_ms, scale=1000.0):
    """Dense time-major counts (T, B, n_in) by a plain loop over events (docs/model.md §6)."""
    out = torch.zeros(t_len, len(times), n_in)
    for i, (ts, us) in enumerate(zip(times, units, strict=True)):
        for t, u in zip(ts, us, strict=True):
            b = round(float(t) * scale / dt_ms)
            if b < t_len:
                out[b, i, int(u)] += 1
    return out


def no_network(monkeypatch):
    """tonic's download raises as it does offline; nothing is fetched."""
    import tonic

    def fail(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tonic.dataset.Dataset, "download", fail)


# --- loading through the normal path --------------------------------------------------------


def test_shd_from_config_matches_hand_binning(shd_dir):
    dm, cfg = from_config("shd", shd_dir)
    assert (cfg.model.n_in, cfg.model.n_classes, cfg.model.t_len) == (700, 20, 500)
    dm.prepare_data()
    dm.setup()
    with h5py.File(shd_dir / "SHD" / "shd_test.h5") as f:  # float16 as stored
        times, units = list(f["spikes/times"][:]), list(f["spikes/units"][:])
    batch = next(iter(dm.test_dataloader()))
    x, y = dm.on_after_batch_transfer(batch, 0)
    want = hand_dense(times, units, 700, 500, 2.0)[:, batch["idx"]]
    assert x.layout == torch.sparse_coo  # dataset.input=auto on the CPU
    torch.testing.assert_close(x.to_dense(), want)
    torch.testing.assert_close(dm.stores["test"].dense(batch["idx"]), want)
    assert y.tolist() == (np.arange(20) % 20)[batch["idx"].numpy()].tolist()
    train, val = dm.split_indices["train"][1], dm.split_indices["val"][1]
    assert len(train) + len(val) == 40 and len(val) == 20  # at least one per class
    assert dm.stores["train"].dropped.sum() > 0  # times up to 1.2 s: some beyond T


def test_shd_no_validation_split(shd_dir):
    dm, _ = from_config("shd", shd_dir, "dataset.val_fraction=0")
    dm.setup()
    assert len(dm.split_indices["train"][1]) == 40 and dm.val_dataloader() == []


def test_ssc_uses_valid_file(ssc_dir):
    dm, _ = from_config("ssc", ssc_dir)
    dm.setup()
    assert dm.split_indices["val"][0] == "valid" and len(dm.split_indices["val"][1]) == 35
    assert len(dm.split_indices["train"][1]) == 70
    x, y = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert (x.shape[0], x.shape[2]) == (500, 700) and y.max() < 35


def test_ssc_without_validation_needs_no_valid_file(ssc_dir, monkeypatch):
    no_network(monkeypatch)
    (ssc_dir / "SSC" / "ssc_valid.h5").unlink()
    dm, _ = from_config("ssc", ssc_dir, "dataset.val_fraction=0")
    dm.prepare_data()
    dm.setup()
    assert dm.val_dataloader() == [] and "valid" not in dm.stores


def test_nmnist_decode_matches_tonic(nmnist_dir):
    from tonic.io import read_mnist_file

    from datamodules.tonic_datasets import decode_nmnist

    files = sorted((nmnist_dir / "NMNIST" / "Train").glob("*/*.bin"))[:4]
    blobs = [np.fromfile(f, np.uint8) for f in files]
    x, y, t, counts = decode_nmnist(np.concatenate(blobs), np.array([len(b) // 5 for b in blobs]))
    ref = [read_mnist_file(str(f), dtype=np.dtype([("x", int), ("y", int), ("t", int),
                                                    ("p", int)])) for f in files]
    assert counts.tolist() == [len(r) for r in ref]
    assert np.array_equal(t, np.concatenate([r["t"] for r in ref]))
    assert np.array_equal(x + 34 * y, np.concatenate([r["x"] + 34 * r["y"] for r in ref]))
    assert t.max() > 300_000  # the overflow record was applied


def test_nmnist_store_matches_hand_binning(nmnist_dir):
    from tonic.io import read_mnist_file

    dm, cfg = from_config("nmnist", nmnist_dir, "dataset.val_fraction=0")
    assert (cfg.model.n_in, cfg.model.t_len) == (1156, 300)
    dm.setup()
    files = sorted((nmnist_dir / "NMNIST" / "Train").glob("*/*.bin"))
    assert len(dm.stores["train"]) == len(files) == 30
    dtype = np.dtype([("x", int), ("y", int), ("t", int), ("p", int)])
    ev = [read_mnist_file(str(f), dtype=dtype) for f in files]
    want = hand_dense([e["t"] for e in ev], [e["x"] + 34 * e["y"] for e in ev], 1156, 300, 1.0,
                      scale=1e-3)
    got = dm.stores["train"].dense(torch.arange(30))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dm.stores["train"].sparse(torch.arange(30)).to_dense(), want)
    assert dm.stores["train"].labels.tolist() == [int(f.parent.name) for f in files]
    assert int(dm.stores["train"].dropped.sum()) > 0  # events after 300 ms


def test_run_py_trains_on_shd_dir(shd_dir, tmp_path):
    run_cli(
        ["dataset=shd", f"paths.data_dir={shd_dir}", "debug=default", "n_hidden=8",
         "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
    )
    assert sorted(p.name for p in (shd_dir / "SHD").iterdir()) == ["shd_test.h5", "shd_train.h5"]


def test_run_py_missing_data_is_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()  # exists, but holds no files (a missing folder: test_reliability)
    proc = run_cli(
        ["dataset=shd", f"paths.data_dir={tmp_path / 'd'}", "dataset.download=false",
         "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(tmp_path / "d" / "SHD" / "shd_train.h5") in proc.stderr
    assert "shd_test.h5.zip" in proc.stderr


# --- the cache ------------------------------------------------------------------------------


def test_cache_is_used_and_invalidated(shd_dir, monkeypatch):
    built = []
    orig = SHDDataModule.read

    def counting(self, split):
        built.append((split, self.dt_ms, self.t_len))
        return orig(self, split)

    monkeypatch.setattr(SHDDataModule, "read", counting)

    def load(**kw):
        dm = SHDDataModule(shd_dir, n_in=700, n_classes=20, **{"t_len": 500, "dt_ms": 2.0, **kw})
        return dm.load_split("train")

    first = load()
    again = load()
    assert len(built) == 1  # second load from the cache
    for name in ("units", "bins", "offsets", "labels", "dropped"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    short = load(t_len=100)
    assert len(built) == 2 and short.n_events < first.n_events and short.t_len == 100
    coarse = load(dt_ms=4.0)
    assert len(built) == 3 and coarse.n_events > first.n_events  # fewer beyond T at 4 ms
    fresh = orig(SHDDataModule(shd_dir, n_in=700, n_classes=20, t_len=500, dt_ms=4.0), "train")
    assert torch.equal(coarse.bins, fresh.bins) and torch.equal(load(dt_ms=4.0).bins, fresh.bins)
    assert len(built) == 3
    path = shd_dir / "SHD" / "shd_train.h5"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    load(dt_ms=4.0)
    assert len(built) == 4  # the source changed
    load(t_len=200)
    from datamodules.cache import KEEP

    assert len(built) == 5
    assert len(list((shd_dir / "cache" / "shd").glob("shd_train-*.npz"))) == KEEP == 4


def test_corrupt_cache_is_rebuilt(shd_dir):
    dm = SHDDataModule(shd_dir, n_in=700, n_classes=20, t_len=500, dt_ms=2.0)
    ref = dm.load_split("test")
    (entry,) = (shd_dir / "cache" / "shd").glob("shd_test-*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    assert torch.equal(dm.load_split("test").bins, ref.bins)


# --- bad input --------------------------------------------------------------------------------


def shd(root, **kw):
    return SHDDataModule(root, n_in=kw.pop("n_in", 700), n_classes=20, t_len=500, dt_ms=2.0,
                         cache=False, **kw)


def test_missing_file_download_fails_lists_paths(tmp_path, monkeypatch):
    no_network(monkeypatch)
    with pytest.raises(DataError) as err:
        shd(tmp_path).prepare_data()
    msg = str(err.value)
    for split in ("train", "test"):
        assert str(tmp_path / "SHD" / f"shd_{split}.h5") in msg
        assert f"shd_{split}.h5.zip" in msg
    assert "URLError" in msg and "paths.data_dir" in msg


def test_missing_nmnist_folder_lists_paths(tmp_path, monkeypatch):
    no_network(monkeypatch)
    dm = NMNISTDataModule(tmp_path, n_in=1156, n_classes=10, t_len=300, dt_ms=1.0)
    with pytest.raises(DataError, match="Train.*missing") as err:
        dm.setup()
    assert str(tmp_path / "NMNIST" / "Test") in str(err.value)


def test_missing_file_downloaded_through_tonic(tmp_path, monkeypatch):
    import tonic

    def fake_download(self):  # what tonic's download leaves: the archive and the extracted file
        Path(self.location_on_system).mkdir(parents=True, exist_ok=True)
        Path(self.location_on_system, self.filename).write_bytes(b"zip")
        write_h5(Path(self.location_on_system, self.data_filename), *random_events(5, 700, 20, 0))

    monkeypatch.setattr(tonic.dataset.Dataset, "download", fake_download)
    dm = shd(tmp_path)
    dm.prepare_data()
    dm.setup()
    assert len(dm.stores["test"]) == 5


def test_download_disabled(tmp_path):
    with pytest.raises(DataError, match="download=false"):
        shd(tmp_path, download=False).prepare_data()


@pytest.mark.parametrize("cut", [0, 500, -200])
def test_truncated_or_corrupt_h5(shd_dir, cut):
    path = shd_dir / "SHD" / "shd_train.h5"
    data = path.read_bytes()
    path.write_bytes(b"not an hdf5 file" * 10 if cut == 0 else data[:cut])
    with pytest.raises(DataError, match=f"cannot read {path}.*fetch it again"):
        shd(shd_dir).load_split("train")


def test_missing_groups(tmp_path):
    path = tmp_path / "SHD" / "shd_train.h5"
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.zeros(3, np.uint16))
    with pytest.raises(DataError, match="lacks spikes/times, spikes/units"):
        shd(tmp_path).load_split("train")


def write_one(root, times, units, labels):
    write_h5(root / "SHD" / "shd_train.h5", times, units, np.asarray(labels))
    return shd(root)


def test_unit_beyond_n_in(tmp_path):
    dm = write_one(tmp_path, [np.array([0.1]), np.array([0.1, 0.2])], [np.array([3]),
                                                                       np.array([1, 700])], [0, 1])
    msg = r"shd_train.h5: sample 1 has unit 700 .*n_in to at least 701"
    with pytest.raises(DataError, match=msg):
        dm.load_split("train")


def test_label_outside_classes(tmp_path):
    dm = write_one(tmp_path, [np.array([0.1])] * 3, [np.array([1])] * 3, [0, 19, 20])
    with pytest.raises(DataError, match="sample 2 has label 20 outside.*n_classes=20"):
        dm.load_split("train")


@pytest.mark.parametrize("bad", [-0.5, np.nan, np.inf])
def test_negative_or_nonfinite_time(tmp_path, bad):
    dm = write_one(tmp_path, [np.array([0.1]), np.array([0.2, bad])],
                   [np.array([1]), np.array([1, 2])], [0, 1])
    with pytest.raises(DataError, match="sample 1 has a negative or non-finite time"):
        dm.load_split("train")


def test_empty_samples_are_counted(tmp_path, caplog):
    dm = write_one(tmp_path, [np.array([0.1]), np.array([]), np.array([0.3])],
                   [np.array([1]), np.array([], np.int64), np.array([2])], [0, 1, 2])
    write_h5(tmp_path / "SHD" / "shd_test.h5", [np.array([])], [np.array([], np.int64)], [0])
    dm.val_fraction = 0.0
    with caplog.at_level("INFO"):
        dm.setup()
    store = dm.stores["train"]
    assert store.dense(torch.tensor([1])).sum() == 0 and int(store.raw_counts[1]) == 0
    assert "3 samples (1 empty)" in caplog.text and "1 samples (1 empty)" in caplog.text


def test_float16_times_converted_before_scaling(tmp_path):
    """66 s * 1000 overflows float16 (max 65504); binning must happen in float64."""
    path = tmp_path / "SHD" / "shd_train.h5"
    write_h5(path, [np.array([66.0, 0.5])], [np.array([2, 1])], np.array([0]))
    with h5py.File(path) as f:
        assert f["spikes/times"][0].dtype == np.float16
    dm = SHDDataModule(tmp_path, n_in=3, n_classes=20, t_len=66_001, dt_ms=1.0, cache=False)
    x = dm.load_split("train").dense(torch.tensor([0]))
    assert x[66_000, 0, 2] == 1 and x[500, 0, 1] == 1 and x.sum() == 2


def raw_h5(path: Path, times, units, labels, t_dtype=np.float16, u_dtype=np.uint16) -> Path:
    """An SHD-layout file with free dtypes: ``times``/``units`` are per-sample lists (stored as
    variable-length datasets) or arrays (stored as they are), ``labels`` an array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, values, dtype in (("spikes/times", times, t_dtype),
                                   ("spikes/units", units, u_dtype)):
            if isinstance(values, list):
                ds = f.create_dataset(key, (len(values),), dtype=h5py.vlen_dtype(dtype))
                for i, v in enumerate(values):
                    ds[i] = np.asarray(v, dtype=dtype)
            else:
                f.create_dataset(key, data=values)
        f.create_dataset("labels", data=labels)
    return path


TWO = [np.array([0.1, 0.2]), np.array([0.3])]  # two samples' times (s)


def test_empty_train_file_is_refused(shd_dir):
    path = shd_dir / "SHD" / "shd_train.h5"
    write_h5(path, [], [], np.zeros(0, np.uint16))
    with pytest.raises(DataError, match=rf"{path}: the train split has 0 samples.*fetch it again"):
        shd(shd_dir).setup()


def test_empty_test_file_is_refused(shd_dir):
    path = shd_dir / "SHD" / "shd_test.h5"
    write_h5(path, [], [], np.zeros(0, np.uint16))
    with pytest.raises(DataError, match=rf"{path}: the test split has 0 samples"):
        shd(shd_dir).setup()


def test_empty_file_refused_by_run_py(shd_dir, tmp_path):
    """The whole path: one error line naming the file, exit 2, no results.json."""
    write_h5(shd_dir / "SHD" / "shd_train.h5", [], [], np.zeros(0, np.uint16))
    proc = run_cli(
        ["dataset=shd", f"paths.data_dir={shd_dir}", "n_hidden=8", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    path = shd_dir / "SHD" / "shd_train.h5"
    assert f"error: {path}: the train split has 0 samples" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize(
    "units, labels, match",
    [
        ([[1, 2], [3]], np.array([0.0, 0.7]), "sample 1 has label 0.7; labels must be whole"),
        ([[1, 2], [3]], np.array([19.7, 1.0]), "sample 0 has label 19.7"),
        ([[1, 3.5], [3]], np.array([0, 1]), "sample 0 has unit 3.5; units must be whole"),
        ([[1, 2], [np.nan]], np.array([0, 1]), "sample 1 has unit nan"),
        ([[1, 2], [3]], np.array([0.0, np.nan]), "sample 1 has label nan"),
    ],
)
def test_fractional_or_nan_labels_and_units_are_refused(tmp_path, units, labels, match):
    raw_h5(tmp_path / "SHD" / "shd_train.h5", TWO, units, labels, u_dtype=np.float32)
    with pytest.raises(DataError, match=match):
        shd(tmp_path).load_split("train")


def test_integral_float_labels_and_units_are_accepted(tmp_path):
    raw_h5(tmp_path / "SHD" / "shd_train.h5", TWO, [[1.0, 699.0], [3.0]], np.array([2.0, 19.0]),
           u_dtype=np.float64)
    write_h5(tmp_path / "ref" / "SHD" / "shd_train.h5", TWO, [[1, 699], [3]], np.array([2, 19]))
    got, want = shd(tmp_path).load_split("train"), shd(tmp_path / "ref").load_split("train")
    for name in ("units", "bins", "offsets", "labels"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def write_wrong(path: Path, case: str) -> None:
    vlen_t, vlen_u = TWO, [[1, 2], [3]]
    labels = np.array([0, 1], np.uint16)
    if case == "text labels":
        raw_h5(path, vlen_t, vlen_u, np.array(["yes", "no"], dtype="S"))
    elif case == "vlen text labels":
        raw_h5(path, vlen_t, vlen_u, np.array(["yes", "no"], dtype=h5py.string_dtype()))
    elif case == "2-D labels":
        raw_h5(path, vlen_t, vlen_u, np.zeros((2, 3), np.uint16))
    elif case == "3-D times":
        raw_h5(path, np.zeros((2, 3, 4)), np.zeros((2, 3), np.uint16), labels)
    elif case == "scalar times":
        raw_h5(path, np.float32(0.5), vlen_u, labels)
    elif case == "one time per sample":
        raw_h5(path, np.array([0.1, 0.2]), np.array([1, 2], np.uint16), labels)
    elif case == "text units":
        raw_h5(path, vlen_t, np.array([b"a", b"b"], dtype=h5py.string_dtype()), labels)
    elif case == "labels group":
        raw_h5(path, vlen_t, vlen_u, labels)
        with h5py.File(path, "a") as f:
            del f["labels"]
            f.create_group("labels")


WRONG = {
    "text labels": r"labels are of type \|S3 \(e.g. b'yes'\); labels must be integer",
    "vlen text labels": "labels are of type object",
    "2-D labels": r"labels of shape \(2, 3\); expected one label per sample",
    "3-D times": r"sample 0 has times of shape \(3, 4\)",
    "scalar times": "spikes/times is a single value, not one entry per sample",
    "one time per sample": r"sample 0 has times of shape \(\)",
    "text units": "sample 0 has units of",
    "labels group": "labels is a group",
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_types_or_shapes_are_data_errors(tmp_path, case):
    path = tmp_path / "SHD" / "shd_train.h5"
    write_wrong(path, case)
    with pytest.raises(DataError, match=WRONG[case]) as err:
        shd(tmp_path).load_split("train")
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "scale, dtype, hint",
    [(1e6, np.int64, "microseconds"), (1e3, np.float32, "milliseconds"), (3.0, np.float16,
                                                                          "Raise dataset.t_len")],
)
def test_most_events_beyond_t_name_the_likely_unit_mistake(tmp_path, scale, dtype, hint):
    """Times in integer microseconds (or ms) drop ~every event: refused, naming the unit, also
    when the store comes from the cache; dataset.max_dropped_fraction=1 allows it."""
    times, units, labels = random_events(10, 700, 20, 0, t_max=0.9)
    raw_h5(tmp_path / "SHD" / "shd_train.h5", [np.round(t * scale) for t in times], units,
           labels.astype(np.uint16), t_dtype=dtype)
    write_h5(tmp_path / "SHD" / "shd_test.h5", times, units, labels)

    def dm(**kw):
        return SHDDataModule(tmp_path, n_in=700, n_classes=20, t_len=500, dt_ms=2.0, **kw)

    allowed = dm(max_dropped_fraction=1.0)
    allowed.setup()  # builds and caches the store
    assert int(allowed.stores["train"].dropped.sum()) > 0.5 * sum(map(len, times))
    want = rf"shd_train.h5: \d+ of \d+ events .* T = t_len x dt_ms = 500 x 2 ms = 1 s.*{hint}"
    with pytest.raises(DataError, match=want + ".*max_dropped_fraction=1"):
        dm().setup()  # from the cache: still refused
    with pytest.raises(ValueError, match="max_dropped_fraction must be a number in"):
        dm(max_dropped_fraction=2)


def test_nmnist_short_t_is_refused(nmnist_dir):
    dm = NMNISTDataModule(nmnist_dir, n_in=1156, n_classes=10, t_len=100, dt_ms=1.0, cache=False)
    with pytest.raises(DataError, match="NMNIST/Train: .* beyond T.*N-MNIST samples last"):
        dm.setup()


def blocked(path: Path, kind: str) -> str:
    """Put a directory, a symlink loop or a broken symlink at ``path``; the expected status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        path.mkdir()
        return "a directory, not a file"
    if kind == "loop":
        os.symlink(path.name, path)  # points at itself
        return "a symlink loop"
    os.symlink(path.parent / "nowhere.h5", path)
    return f"a broken symlink to {path.parent / 'nowhere.h5'}"


@pytest.mark.parametrize("kind", ["directory", "loop", "broken"])
def test_directory_or_link_where_a_file_should_be_is_named(shd_dir, monkeypatch, kind):
    import tonic

    calls = []
    monkeypatch.setattr(tonic.dataset.Dataset, "download", lambda self: calls.append(self))
    path = shd_dir / "SHD" / "shd_test.h5"
    path.unlink()
    status = blocked(path, kind)
    with pytest.raises(DataError, match=f"{path} is {status}, where the test split should be. "
                                        "Nothing was downloaded over it") as err:
        shd(shd_dir).prepare_data()
    assert "[missing]" not in str(err.value) and calls == []
    with pytest.raises(DataError, match=f"{path} is {status}"):
        shd(shd_dir).setup()  # the same without prepare_data
    assert calls == []


def test_file_where_nmnist_folder_should_be(nmnist_dir, monkeypatch):
    import shutil

    no_network(monkeypatch)
    folder = nmnist_dir / "NMNIST" / "Test"
    shutil.rmtree(folder)
    folder.write_bytes(b"")
    dm = NMNISTDataModule(nmnist_dir, n_in=1156, n_classes=10, t_len=300, dt_ms=1.0)
    with pytest.raises(DataError, match=f"{folder} is a file, not a folder"):
        dm.prepare_data()


def test_bursts_refuses_a_directory_where_its_file_goes(tmp_path):
    from datamodules.bursts import BurstsDataModule

    dm = BurstsDataModule(tmp_path, n_train=16, n_test=8)
    dm.path("test").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{dm.path('test').name} is a directory, not a file"):
        dm.prepare_data()
    message = "dataset.n_train=0 is not allowed: dataset.n_train must be an integer >= 1"
    with pytest.raises(ValueError, match=message):
        BurstsDataModule(tmp_path, n_train=0)


def test_failed_download_leaves_no_folders(tmp_path, monkeypatch):
    """tonic creates <data_dir>/SHD/ before it fails: what this attempt created is removed."""
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # tonic's own download code runs
    root = tmp_path / "data"
    with pytest.raises(DataError, match="URLError"):
        shd(root).prepare_data()
    assert not root.exists()
    # a folder that was there before stays, with what it held
    (root / "SHD").mkdir(parents=True)
    (root / "SHD" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="URLError"):
        shd(root).prepare_data()
    assert sorted(p.name for p in (root / "SHD").iterdir()) == ["notes.txt"]


def test_failed_download_removes_its_partial_archive(tmp_path, monkeypatch):
    import tonic

    def partial(self):  # as tonic's _urlretrieve does when the connection drops
        Path(self.location_on_system).mkdir(parents=True, exist_ok=True)
        Path(self.location_on_system, self.filename).write_bytes(b"")
        raise urllib.error.URLError("connection reset")

    monkeypatch.setattr(tonic.dataset.Dataset, "download", partial)
    with pytest.raises(DataError, match="connection reset"):
        shd(tmp_path / "data").prepare_data()
    assert not (tmp_path / "data").exists()


def test_nmnist_truncated_file(nmnist_dir):
    f = sorted((nmnist_dir / "NMNIST" / "Train" / "3").glob("*.bin"))[1]
    f.write_bytes(f.read_bytes()[:-2])
    dm = NMNISTDataModule(nmnist_dir, n_in=1156, n_classes=10, t_len=300, dt_ms=1.0, cache=False)
    with pytest.raises(DataError, match=rf"{f.name} \(sample 10\).*truncated"):
        dm.load_split("train")


def test_nmnist_label_folder_outside_classes(nmnist_dir):
    sub = nmnist_dir / "NMNIST" / "Test" / "10"
    sub.mkdir()
    (sub / "00001.bin").write_bytes(encode_nmnist([1], [1], [0], [5]))
    dm = NMNISTDataModule(nmnist_dir, n_in=1156, n_classes=10, t_len=300, dt_ms=1.0, cache=False)
    with pytest.raises(DataError, match="'10' \\(label outside the class range\\)"):
        dm.load_split("test")


def test_ssc_bad_split_name_is_listed(ssc_dir, monkeypatch):
    no_network(monkeypatch)
    (ssc_dir / "SSC" / "ssc_valid.h5").unlink()
    dm = SSCDataModule(ssc_dir, n_in=700, n_classes=35, t_len=500, dt_ms=2.0)
    with pytest.raises(DataError, match=r"ssc_valid.h5  \[missing\]"):
        dm.setup()


def test_bench_data_smoke(tmp_path):
    """The benchmark script runs end to end on a tiny dataset and reports its ratios."""
    from experiments import bench_data as bench

    res = bench.main(["--samples", "24", "--mean-events", "100", "--batch", "8", "--t-len", "50",
                      "--model-batches", "1", "--device", "cpu", "--dir", str(tmp_path)])
    assert res["samples"] == 24 and res["events"] > 0
    assert res["speedup_epoch"] > 0 and res["speedup_epoch_sparse"] > 0
    assert res["data_fraction_of_dblock_epoch"] > 0 and res["model_input"] == "sparse"
    assert (tmp_path / "SHD" / "shd_train.h5").is_file()


def test_nmnist_chunked_conversion_is_identical(nmnist_dir):
    from datamodules.tonic_datasets import read_nmnist

    folder = nmnist_dir / "NMNIST" / "Train"
    whole = read_nmnist(folder, 1156, 300, 1.0, 10)
    chunked = read_nmnist(folder, 1156, 300, 1.0, 10, chunk=7)
    for name in ("units", "bins", "offsets", "labels", "dropped", "raw_counts"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    idx = torch.tensor([29, 0, 8, 7])
    assert torch.equal(whole.dense(idx), chunked.dense(idx))
