"""Run a trained network on a dataset split or a data file and write its predictions as CSV.

    python -m dblock.predict ckpt_path=outputs/runs/<date>/checkpoints/best.ckpt
    python -m dblock.predict ckpt_path=... split=val out=val.csv
    python -m dblock.predict ckpt_path=... file=recordings.h5 out=recordings.csv
    python -m dblock.predict ckpt_path=... dataset.data_dir=/data dataset.batch_size=256

The network and the data settings come from the checkpoint alone (``dblock.load_model``). The
data go through the training path: the checkpoint's datamodule class with its stored settings
reads, bins (same ``dt_ms``, ``t_len``, ``n_in``) and batches them. Only where the data live and
how they load (``dataset.data_dir``, ``cache``, ``cache_dir``, ``download``, ``batch_size``,
``input``; for ``split=val`` also ``val_fraction``, ``split_seed``) may be overridden; any other
``dataset.`` setting is refused, since the model was trained on data binned that way.

``file=`` reads one data file in a supported format, binned like the training data: an
SHD-layout HDF5 file (``spikes/times`` in s, ``spikes/units``; ``labels`` optional) for a model
trained on shd, ssc or bursts; an N-MNIST ``.bin`` file (no label) or a folder of
``<digit>/*.bin`` files (labelled by folder) for one trained on nmnist.

The CSV has one row per sample: ``index`` (the sample's position in its file: for ``split=val``
held out of train, its position in the train file), ``label`` (empty when unknown),
``predicted`` (argmax of the scores) and ``score_0 .. score_{C-1}``, the logits. The accuracy
is printed when the labels are known. Bad input: one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from dblock.errors import ConfigError
from dblock.files import atomic_write
from dblock.load import load_model
from dblock.training.checkpoints import EVAL_FREE_KEYS, LOCATION_KEYS, fmt

log = logging.getLogger("dblock")

# the datamodule of each dataset a checkpoint may name (rebuilt from this list, never imported
# from the checkpoint's _target_ string: a checkpoint is data, not code)
DATAMODULES = {
    "bursts": "datamodules.bursts.BurstsDataModule",
    "shd": "datamodules.tonic_datasets.SHDDataModule",
    "ssc": "datamodules.tonic_datasets.SSCDataModule",
    "nmnist": "datamodules.tonic_datasets.NMNISTDataModule",
}
SPLITS = ("test", "val", "train")
KEYS = ("ckpt_path", "split", "file", "out", "device")
FILE_STORE = "file"


@dataclass
class Predictions:
    """Per-sample results: ``index`` (N,) positions in the file, ``labels`` (N,) or None when
    unknown, ``logits`` (N, C) float32; ``source`` names the split or file."""

    index: np.ndarray
    labels: np.ndarray | None
    logits: Tensor
    source: str

    @property
    def predicted(self) -> np.ndarray:
        """(N,) the predicted class of each sample (argmax of the logits)."""
        return self.logits.argmax(dim=1).numpy()

    @property
    def correct(self) -> int | None:
        """Samples whose predicted class is the label (None without labels)."""
        return None if self.labels is None else int((self.predicted == self.labels).sum())

    @property
    def accuracy(self) -> float | None:
        """Fraction of samples whose predicted class is the label (None without labels)."""
        if self.labels is None or len(self.labels) == 0:
            return None
        return self.correct / len(self.labels)


def datamodule(dataset_config: dict, overrides: dict | None = None, split: str = "test"):
    """The checkpoint's datamodule, built from its stored ``dataset_config`` plus
    ``overrides`` (location keys only, see the module docstring); ``ConfigError`` otherwise."""
    config = dict(dataset_config)
    name = config.pop("name", None)
    target = config.pop("_target_", None)
    if name not in DATAMODULES or target not in (None, DATAMODULES[name]):
        raise ConfigError(
            f"the checkpoint's dataset ({name!r}, {target!r}) is not one dblock can read; "
            f"known: {', '.join(DATAMODULES)}"
        )
    free = LOCATION_KEYS | (EVAL_FREE_KEYS if split == "val" else set())
    for key, value in (overrides or {}).items():
        if key not in config:
            raise ConfigError(f"dataset.{key} is not a setting of the {name} dataset")
        if key not in free and value != config[key]:
            raise ConfigError(
                f"dataset.{key}={fmt(value)} differs from the checkpoint's dataset.{key}="
                f"{fmt(config[key])}; the model was trained on data read that way: drop the "
                f"override (settings that may differ: {', '.join(sorted(free))})"
            )
        config[key] = value
    module, _, cls = DATAMODULES[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**config), name


def file_store(dm, name: str, path: Path):
    """(store, labels known) of the data file ``path``, read and binned with ``dm``'s settings."""
    from datamodules.checks import DataError, check_dropped
    from datamodules.hdf5 import read_h5
    from datamodules.store import build_store, store_from_flat
    from datamodules.tonic_datasets import NMNIST_SIZE, decode_nmnist, read_nmnist

    if not path.exists():
        raise ConfigError(f"file={path} does not exist")
    nmnist = name == "nmnist"
    is_h5 = path.is_file() and h5py.is_hdf5(path)
    bin_file = path.is_file() and path.suffix == ".bin" and not is_h5
    if not (path.is_dir() or bin_file if nmnist else is_h5):
        want = (
            "an N-MNIST .bin file or a folder of <digit>/*.bin files"
            if nmnist
            else "an SHD-layout HDF5 file (spikes/times, spikes/units, labels optional)"
        )
        raise ConfigError(f"file={path}: the model was trained on {name}, so it reads {want}")
    args = (dm.n_in, dm.t_len, dm.dt_ms)
    if path.is_dir():
        store, known = read_nmnist(path, *args, dm.n_classes), True
    elif nmnist:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % 5:
            raise DataError(f"{path}: {raw.size} bytes is not a whole number of 5-byte records")
        x, y, t, c = decode_nmnist(raw, np.array([raw.size // 5]))
        u = x.astype(np.int64) + NMNIST_SIZE * y.astype(np.int64)
        b = np.round(t / (1000.0 * dm.dt_ms))
        store, known = store_from_flat(c, b, u, np.zeros(1, np.int64), dm.n_in, dm.t_len), False
    else:
        with h5py.File(path, "r") as f:
            known = "labels" in f
        if known:
            store = read_h5(path, *args, dm.n_classes)
        else:
            with h5py.File(path, "r") as f:
                try:
                    times, units = list(f["spikes/times"][:]), list(f["spikes/units"][:])
                except KeyError as err:
                    raise DataError(f"{path} lacks spikes/times or spikes/units ({err})") from None
            labels = np.zeros(len(times), np.int64)
            store = build_store(times, units, labels, *args, dm.n_classes, source=str(path))
    if len(store) == 0:
        raise DataError(f"{path} holds no samples")
    check_dropped(str(path), int(store.raw_counts.sum()), int(store.dropped.sum()),
                  dm.max_dropped_fraction, dm.t_len, dm.dt_ms,
                  hint=lambda: "check the time unit (seconds) or the file")
    return store, known


@torch.no_grad()
def predict(
    ckpt_path: str | Path,
    split: str = "test",
    file: str | Path | None = None,
    overrides: dict | None = None,
    device: str = "cpu",
) -> Predictions:
    """Run the network of ``ckpt_path`` on a split of its dataset or on a data ``file``.

    Args:
        ckpt_path: a checkpoint written by ``run.py``.
        split: ``test`` | ``val`` | ``train``, used when ``file`` is None.
        file: a data file (or N-MNIST folder) in the format of the checkpoint's dataset.
        overrides: ``{key: value}`` for the dataset's location settings (``data_dir``,
            ``batch_size``, ...); any other key that differs from the checkpoint is refused.
        device: where to run (``cpu``, ``cuda``).

    Returns:
        ``Predictions`` with the samples in file order.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split}: choose one of {', '.join(SPLITS)}")
    dev = torch.device(device)
    net = load_model(ckpt_path, map_location=dev)
    dm, name = datamodule(net.run_config["dataset"], overrides, split)
    if file is not None:
        store, known = file_store(dm, name, Path(file))
        dm.stores[FILE_STORE] = store
        store_name, idx, source = FILE_STORE, np.arange(len(store)), str(file)
    else:
        if not Path(dm.data_dir).is_dir():
            raise ConfigError(
                f"dataset.data_dir={dm.data_dir} (from the checkpoint) does not exist here; give "
                f"dataset.data_dir=DIR, the folder that holds the {name} data"
            )
        dm.prepare_data()
        dm.setup("predict")
        if split == "val" and len(dm.split_indices["val"][1]) == 0:
            raise ConfigError("split=val: the checkpoint's dataset has no validation split "
                              "(val_fraction=0); use split=test or split=train")
        store_name, idx = dm.split_indices[split]
        known, source = True, f"{name} {split}"
    logits = []
    for lo in range(0, len(idx), dm.batch_size):
        batch = {"store": store_name, "idx": torch.as_tensor(idx[lo : lo + dm.batch_size]).to(dev)}
        x, _ = dm.on_after_batch_transfer(batch, 0)  # the training path: sparse or dense
        logits.append(net(x).logits.float().cpu())
    labels = dm.stores[store_name].labels[torch.as_tensor(idx)].numpy() if known else None
    return Predictions(np.asarray(idx), labels, torch.cat(logits), source)


def write_csv(result: Predictions, path: str | Path) -> None:
    """Write ``result`` to the CSV file ``path`` (atomically): one row per sample,
    ``index,label,predicted,score_0..score_{C-1}`` (``label`` empty when unknown)."""
    n_classes = result.logits.shape[1]
    lines = [",".join(["index", "label", "predicted"] + [f"score_{c}" for c in range(n_classes)])]
    pred = result.predicted
    for i, row in enumerate(result.logits.tolist()):
        label = "" if result.labels is None else str(int(result.labels[i]))
        scores = ",".join(f"{v:.9g}" for v in row)
        lines.append(f"{int(result.index[i])},{label},{int(pred[i])},{scores}")
    data = ("\n".join(lines) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def parse_value(text: str):
    """A command-line value as a Hydra override spells it: int, float, true/false, null, text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_args(argv: list[str]) -> tuple[dict, dict]:
    """``key=value`` arguments into (options, dataset overrides); ``ConfigError`` otherwise."""
    options, overrides = {"split": "test", "out": "predictions.csv", "device": "cpu"}, {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg!r} is not key=value; usage: python -m dblock.predict "
                              "ckpt_path=PATH [split=test|val|train] [file=PATH] [out=CSV] "
                              "[device=cpu] [dataset.KEY=VALUE ...]")
        if key.startswith("dataset."):
            overrides[key[len("dataset."):]] = parse_value(value)
        elif key in KEYS:
            options[key] = value
        else:
            raise ConfigError(f"{key} is not a setting of dblock.predict; settings: "
                              f"{', '.join(KEYS)}, dataset.KEY")
    if "ckpt_path" not in options:
        raise ConfigError("ckpt_path= is missing: give the checkpoint to run, e.g. "
                          "ckpt_path=outputs/runs/<date>/checkpoints/best.ckpt")
    return options, overrides


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit code."""
    from datamodules.checks import DataError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        result = predict(options["ckpt_path"], options["split"], options.get("file"),
                         overrides, options["device"])
        write_csv(result, options["out"])
    except (ConfigError, DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    acc = result.accuracy
    told = (f"accuracy {acc:.4f} ({result.correct}/{len(result.index)})"
            if acc is not None else "no labels")
    print(f"{result.source}: {len(result.index)} samples, {told} -> {options['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
