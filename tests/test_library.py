"""dblock as a library: input checks at the boundary, docstrings, load_model, predict, export.

The load, predict and export tests use real checkpoints: the session's reference run (d-block,
tests/conftest.py) and a one-epoch standard SNN run (NIR)."""

from __future__ import annotations

import csv
import inspect
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import dblock
from datamodules.hdf5 import write_h5
from dblock.errors import ConfigError
from dblock.models import SNNClassifier
from dblock.nn import DBlockLayer, LIFLayer
from tests.faults import TINY, run_cli, run_env

# --- input checks at the boundary -------------------------------------------------------------


@pytest.mark.parametrize("model", ["dblock", "standard"])
def test_classifier_refuses_batch_first_input(model):
    net = SNNClassifier(64, 16, 1, 10, model=model, d=10, t_len=100)
    x = torch.zeros(16, 100, 64)  # batch-first: (B, T, n_in)
    with pytest.raises(ValueError, match=r"time-major \(T=100, B, n_in=64\)") as err:
        net(x)
    assert "(16, 100, 64)" in str(err.value) and "batch-first" in str(err.value)
    assert net(torch.zeros(100, 16, 64)).logits.shape == (16, 10)


@pytest.mark.parametrize("layer", [DBlockLayer(8, 4, d=200), LIFLayer(8, 4)])
def test_layer_refuses_input_that_is_not_time_major(layer):
    with pytest.raises(ValueError, match=r"time-major \(T, B, n_in=8\).*\(2, 8\)"):
        layer(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*not n_in=8"):
        layer(torch.zeros(2, 3, 5))


def test_layer_names_the_inputs_T_and_shape():
    layer = DBlockLayer(8, 4, d=200)
    with pytest.raises(ValueError, match=r"d=200 is out of range for T=2") as err:
        layer(torch.zeros(2, 3, 8))
    assert "(2, 3, 8)" in str(err.value) and "time-major (T, B, n_in)" in str(err.value)
    built = DBlockLayer(8, 4, d=5, t_len=50)
    with pytest.raises(ValueError, match=r"built for T=50.*\(40, 3, 8\)"):
        built(torch.zeros(40, 3, 8))


# --- docstrings -------------------------------------------------------------------------------


def _public():
    import datamodules.base
    import datamodules.bursts
    import datamodules.tonic_datasets
    import dblock.export
    import dblock.functional
    import dblock.load
    import dblock.models
    import dblock.nn
    import dblock.predict

    objs = [getattr(dblock.functional, n) for n in dblock.functional.__all__]
    objs = [o for o in objs if callable(o)]
    objs += [getattr(dblock.functional.reference, n) for n in dir(dblock.functional.reference)
             if not n.startswith("_") and inspect.isfunction(getattr(dblock.functional.reference,
                                                                     n))
             and getattr(dblock.functional.reference, n).__module__.endswith("reference")]
    objs += [getattr(dblock.nn, n) for n in dblock.nn.__all__]
    objs += [getattr(dblock.models, n) for n in dblock.models.__all__ if n != "MODELS"]
    objs += [dblock.load.load_model, dblock.predict.predict, dblock.predict.write_csv,
             dblock.export.export_program, dblock.export.to_nir]
    objs += [datamodules.base.EventDataModule, datamodules.bursts.BurstsDataModule,
             datamodules.tonic_datasets.TonicDataModule, datamodules.tonic_datasets.SHDDataModule,
             datamodules.tonic_datasets.SSCDataModule,
             datamodules.tonic_datasets.NMNISTDataModule]
    return objs


def test_public_api_documents_every_argument():
    """help() shows each argument of every public function and class (class docstring or
    __init__'s), and the shapes of the model core."""
    missing = []
    for obj in _public():
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            doc += "\n" + (obj.__init__.__doc__ or "")
            # a subclass inherits the documented arguments it passes on (*args, **kwargs)
            doc += "".join("\n" + (c.__doc__ or "") for c in obj.__mro__[1:4])
        if not doc.strip():
            missing.append(f"{obj.__qualname__}: no docstring")
            continue
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.name in ("self", "_", "args", "kwargs") or p.name.startswith("_"):
                continue
            if p.name not in doc:
                missing.append(f"{obj.__module__}.{obj.__qualname__}: {p.name}")
    assert not missing, "undocumented: " + "; ".join(missing)


# --- load ------------------------------------------------------------------------------------


def _test_batches(run_dir: Path, n: int = 2):
    """Real test batches (dense and sparse) through the run's own datamodule."""
    from dblock.predict import datamodule

    net = dblock.load_model(run_dir / "checkpoints" / "last.ckpt")
    dm, _ = datamodule(net.run_config["dataset"])
    dm.setup()
    store, idx = dm.split_indices["test"]
    out = []
    for lo in range(0, n * 50, 50):
        batch = {"store": store, "idx": torch.as_tensor(idx[lo : lo + 50 - lo // 10])}
        out.append(dm.on_after_batch_transfer(batch, 0))
    return out


def test_load_model_from_the_checkpoint_alone(reference):
    from dblock.training.task import SNNTask

    ckpt = reference / "checkpoints" / "last.ckpt"
    net = dblock.load_model(ckpt)
    assert isinstance(net, SNNClassifier) and not net.training
    stored = torch.load(ckpt, weights_only=True)["dblock_config"]
    want = {k: v for k, v in stored["model"].items() if k != "_target_"}
    assert {k: net.config[k] for k in want} == want
    assert net.config["n_hidden"] == 16 and net.epochs == 3 and net.run_config == stored
    task = SNNTask.load_from_checkpoint(ckpt)  # Lightning's way works too
    for (x, _), _ in zip(_test_batches(reference), range(2), strict=False):
        with torch.no_grad():
            assert torch.equal(net(x).logits, task.eval().model(x).logits)
    # the network is rebuilt from the stored settings, and its weights are the checkpoint's
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[f"model.{k}"]), k


def test_load_model_refuses_other_files(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 0}, foreign)
    with pytest.raises(ConfigError, match="not a dblock run checkpoint"):
        dblock.load_model(foreign)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "path": Path("x")}, pickled)  # a Python object: not weights
    with pytest.raises(ConfigError, match="Python objects other than tensors"):
        dblock.load_model(pickled)
    with pytest.raises(ConfigError, match="does not exist"):
        dblock.load_model(tmp_path / "missing.ckpt")


# --- predict ---------------------------------------------------------------------------------


def _predict_cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "dblock.predict", *map(str, args)],
        cwd=cwd, env=run_env(cwd), capture_output=True, text=True, timeout=300,
    )


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_csv_accuracy_equals_the_runs_test_accuracy(reference, tmp_path):
    results = json.loads((reference / "results.json").read_text())
    out = tmp_path / "pred.csv"
    done = _predict_cli([f"ckpt_path={results['tested_ckpt']}", f"out={out}"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = _read_csv(out)
    assert len(rows) == results["test/samples"] == 128
    assert [int(r["index"]) for r in rows] == list(range(128))
    correct = sum(r["label"] == r["predicted"] for r in rows)
    assert correct / len(rows) == pytest.approx(results["test/acc"], abs=1e-7)
    assert f"accuracy {correct / len(rows):.4f} ({correct}/128)" in done.stdout
    scores = np.array([[float(r[f"score_{c}"]) for c in range(10)] for r in rows])
    assert (scores.argmax(1) == [int(r["predicted"]) for r in rows]).all()


def test_predict_refuses_other_data_settings(reference, tmp_path):
    ckpt = reference / "checkpoints" / "last.ckpt"
    done = _predict_cli([f"ckpt_path={ckpt}", "dataset.t_len=200"], tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset.t_len=200 differs")
    assert "dataset.t_len=100" in lines[0]
    from dblock.predict import main

    assert main([f"ckpt_path={ckpt}", "dataset.dt_ms=2.0"]) == 2
    assert main([f"ckpt_path={ckpt}", "split=dev"]) == 2
    assert main([f"ckpt_path={ckpt}", f"file={tmp_path / 'none.h5'}"]) == 2
    assert main(["split=test"]) == 2  # no checkpoint


def test_predict_on_a_data_file_without_labels(reference, tmp_path):
    from dblock.predict import predict

    ckpt = reference / "checkpoints" / "last.ckpt"
    split = predict(ckpt, "test", overrides={"batch_size": 32})
    (source,) = (reference.parent / "data" / "BURSTS").glob("bursts_test-*.h5")
    copy = tmp_path / "recordings.h5"
    copy.write_bytes(source.read_bytes())
    with h5py.File(copy, "a") as f:
        del f["labels"]
    from dblock.predict import main

    out = tmp_path / "rec.csv"
    assert main([f"ckpt_path={ckpt}", f"file={copy}", f"out={out}"]) == 0
    rows = _read_csv(out)
    assert len(rows) == 128 and all(r["label"] == "" for r in rows)
    assert [int(r["predicted"]) for r in rows] == split.predicted.tolist()
    scores = torch.tensor([[float(r[f"score_{c}"]) for c in range(10)] for r in rows])
    torch.testing.assert_close(scores, split.logits, rtol=1e-6, atol=1e-6)


# --- export ----------------------------------------------------------------------------------


def test_torch_export_equals_eager_on_real_batches(reference, tmp_path):
    from dblock.export import export_program

    net = dblock.load_model(reference / "checkpoints" / "best.ckpt")
    batches = _test_batches(reference, n=3)
    program = export_program(net, batches[0][0])
    torch.export.save(program, tmp_path / "net.pt2")
    loaded = torch.export.load(tmp_path / "net.pt2").module()
    with torch.no_grad():
        for x, _ in batches:  # batches of 50, 45 and 40 samples: the batch size may vary
            eager = net(x)
            dense = x.to_dense()
            for run in (program.module(), loaded):
                logits, spikes = run(dense)
                assert torch.equal(logits, eager.logits) and torch.equal(spikes, eager.spikes)
    with torch.no_grad(), pytest.raises(Exception):  # noqa: B017 T is fixed at export
        program.module()(torch.zeros(50, 4, 64))


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("standard")
    run_cli([*TINY, "model=standard", "trainer.max_epochs=1", f"hydra.run.dir={tmp / 'run'}"],
            tmp)
    return tmp / "run"


def test_standard_snn_round_trips_through_nir(standard_run, tmp_path, reference):
    import nir

    from dblock.export import to_nir

    net = dblock.load_model(standard_run / "checkpoints" / "last.ckpt")
    graph = to_nir(net, dt=1e-3)
    nir.write(tmp_path / "net.nir", graph)
    back = nir.read(tmp_path / "net.nir")
    assert sorted(back.nodes) == sorted(graph.nodes)
    assert sorted(back.edges) == sorted(graph.edges)
    assert ("hidden.0.recurrent", "hidden.0.lif") in back.edges
    for name, node in graph.nodes.items():
        assert type(back.nodes[name]) is type(node), name
    layer, readout = net.hidden[0], net.readout
    np.testing.assert_array_equal(back.nodes["hidden.0.projection"].weight,
                                  layer.projection.weight.detach().numpy())
    np.testing.assert_array_equal(back.nodes["hidden.0.recurrent"].bias,
                                  layer.recurrent.bias.detach().numpy())
    np.testing.assert_array_equal(back.nodes["readout.projection"].weight,
                                  readout.projection.weight.detach().numpy())
    lif, li = back.nodes["hidden.0.lif"], back.nodes["readout.li"]
    # the discrete decay read back from NIR's time constants: beta = 1 - dt / tau, r dt / tau = 1
    np.testing.assert_allclose(1 - 1e-3 / lif.tau, layer.beta().detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(1 - 1e-3 / li.tau, readout.beta().detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(lif.r * 1e-3 / lif.tau, 1.0)
    assert back.metadata["reset"] == "subtract"
    with pytest.raises(ValueError, match="d-block neuron has no NIR primitive"):
        to_nir(dblock.load_model(reference / "checkpoints" / "last.ckpt"))


def test_predict_reads_nmnist_files_as_training_does(nmnist_dir, tmp_path):
    from dblock.predict import main, predict

    run = tmp_path / "run"
    run_cli(["dataset=nmnist", f"paths.data_dir={nmnist_dir}", "n_hidden=8", "d=5",
             "dataset.batch_size=8", "dataset.val_fraction=0", "selection.monitor=train/loss",
             "selection.mode=min", "dataset.max_dropped_fraction=1", "trainer.max_epochs=1",
             f"hydra.run.dir={run}"], tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    split = predict(ckpt, "test")
    folder = predict(ckpt, file=nmnist_dir / "NMNIST" / "Test")  # <digit>/*.bin, labelled
    assert split.labels.tolist() == folder.labels.tolist() == list(range(10))
    assert torch.equal(split.logits, folder.logits)
    one = sorted((nmnist_dir / "NMNIST" / "Test" / "3").glob("*.bin"))[0]
    single = predict(ckpt, file=one)  # one recording, no label
    assert single.labels is None and single.accuracy is None
    torch.testing.assert_close(single.logits[0], split.logits[3])
    assert main([f"ckpt_path={ckpt}", f"file={one}", f"out={tmp_path / 'one.csv'}"]) == 0
    assert _read_csv(tmp_path / "one.csv")[0]["label"] == ""
    h5 = tmp_path / "x.h5"
    write_h5(h5, [np.zeros(1)], [np.zeros(1, np.int64)], np.zeros(1))
    other = tmp_path / "x.txt"
    other.write_bytes(b"")
    for wrong in (h5, other):  # not N-MNIST's format
        assert main([f"ckpt_path={ckpt}", f"file={wrong}", f"out={tmp_path / 'w.csv'}"]) == 2
    assert not (tmp_path / "w.csv").exists()
    assert main([f"ckpt_path={ckpt}", f"dataset.data_dir={tmp_path / 'nowhere'}"]) == 2
