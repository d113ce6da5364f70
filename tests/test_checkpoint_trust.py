"""Checkpoints are data, never code or a location to trust; a resume continues the run it
resumes, or stops with one line: stored paths and URLs, copied and moved runs, changed training
settings, too few epochs, failing checkpoint writes, and the messages for bad ``ckpt_path``s.
Runs go through ``tests.faults.run_cli``."""

from __future__ import annotations

import errno
import http.server
import os
import pickle
import random
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch

from dblock.errors import ConfigError
from dblock.training.checkpoints import check_checkpoint, load_checkpoint
from tests.faults import RESUMABLE, TINY, fault, run_cli
from tests.test_reliability import load, same
from tests.test_run import results, run

RECIPE = [*RESUMABLE, "recipe=paper"]


def killed_run(args: list[str], out: Path, tmp_path: Path) -> Path:
    """``run.py ARGS`` into ``out``, killed (-9) at the start of epoch 2: its last.ckpt holds
    epochs 0-1. Returns that last.ckpt."""
    kill = fault("KillAt", epoch=2, batch=0)
    proc = run_cli([*args, f"hydra.run.dir={out}", *kill], tmp_path, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    assert load(last)["epoch"] == 1
    return last


def error_line(proc) -> str:
    """The run's one line on stderr, checked to be its only ``error:`` line, no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


class Server:
    """An HTTP server on 127.0.0.1 that serves ``directory`` and records every request. It
    stops when the ``with`` block ends, and by itself after ``seconds`` in any case."""

    def __init__(self, directory: Path, seconds: float = 300) -> None:
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.timer = threading.Timer(seconds, self.httpd.shutdown)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def point_recipe_at(last: Path, where: str, unbeaten: bool = False) -> None:
    """Rewrite ``last.ckpt`` so that the paper recipe's stored best checkpoint is ``where``;
    ``unbeaten``: with a best score no later epoch beats, so that it is reloaded at the end."""
    ckpt = load(last)
    key = next(k for k in ckpt["callbacks"] if k.startswith("PaperRecipe"))
    state = ckpt["callbacks"][key]
    if unbeaten:
        state["best_model_score"] = state["kth_value"] = torch.tensor(-1.0)
    state["best_model_path"] = state["kth_best_model_path"] = where
    state["best_k_models"] = {where: state["best_model_score"]}
    torch.save(ckpt, last)


@pytest.fixture(scope="module")
def recipe_reference(tmp_path_factory) -> Path:
    """One uninterrupted ``run.py RESUMABLE recipe=paper``."""
    tmp = tmp_path_factory.mktemp("recipe")
    run_cli([*RECIPE, f"hydra.run.dir={tmp / 'ref'}"], tmp)
    return tmp / "ref"


@pytest.mark.parametrize("where", ["url", "unbeaten url", "outside"])
def test_a_path_stored_in_a_checkpoint_is_never_fetched_or_used(recipe_reference, tmp_path, where):
    """The paper recipe reloads its best checkpoint when training ends. A last.ckpt whose
    recipe state names a pickle on an HTTP server, or a checkpoint with other weights outside
    the run, resumes to exactly the uninterrupted result: nothing is fetched, no code runs,
    nothing outside the run is deleted, the run's own best-train-loss.ckpt is the one reloaded
    and tested. With a best score no epoch beats (``unbeaten``) the stored path is what would be
    reloaded: the run's own file is, and the tampered score selects it (not the reference's)."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    site = tmp_path / "site"
    site.mkdir()
    (site / "best-train-loss.ckpt").write_bytes(pickle.dumps(Evil()))
    out = tmp_path / "run"
    last = killed_run(RECIPE, out, tmp_path)
    elsewhere = tmp_path / "elsewhere" / "best-train-loss.ckpt"
    with Server(site) as server:
        if where.endswith("url"):
            url = f"{server.url}/best-train-loss.ckpt"
            point_recipe_at(last, url, unbeaten=where.startswith("unbeaten"))
        else:  # a whole checkpoint of this run, every weight zeroed, in another folder
            other = load(out / "checkpoints" / "best-train-loss.ckpt")
            other["state_dict"] = {k: torch.zeros_like(v) for k, v in other["state_dict"].items()}
            elsewhere.parent.mkdir()
            torch.save(other, elsewhere)
            point_recipe_at(last, str(elsewhere))
        args = [*RECIPE, f"hydra.run.dir={out}", f"ckpt_path={last}"]
        proc = run_cli(args, tmp_path, check=False)
    assert server.requests == [] and not marker.exists()
    assert where != "outside" or elsewhere.is_file()  # not removed as a superseded best
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = results(out)
    assert got["tested_ckpt"] == str(out / "checkpoints" / "best-train-loss.ckpt")
    if not where.startswith("unbeaten"):
        assert same(got, results(recipe_reference)), proc.stderr[-3000:]
    else:
        assert got["tested_epoch"] == 2  # the run's own file of epoch 1 (best by the score)


def test_lightning_never_loads_a_url_or_unsafely(tmp_path):
    """The trainer plugin every load of Lightning's goes through (resume, test, callbacks):
    a URL is refused without a request, a pickle is refused without running it."""
    from dblock.training.checkpoint_io import AtomicCheckpointIO

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    io = AtomicCheckpointIO()
    with Server(tmp_path) as server:
        with pytest.raises(ConfigError, match="is a URL; dblock loads checkpoints only from local"):
            io.load_checkpoint(f"{server.url}/evil.ckpt", weights_only=False)
        with pytest.raises(ConfigError, match="cannot be loaded as a checkpoint"):
            io.load_checkpoint(tmp_path / "evil.ckpt", weights_only=False)
    assert server.requests == [] and not marker.exists()


@pytest.mark.parametrize("how", ["copy", "move"])
def test_a_copied_or_moved_run_resumes_to_the_same_result(reference, tmp_path, how):
    """``cp -a run run2`` (or ``mv``) and resume in run2: the same selection, the same tested
    epoch and results as the uninterrupted run, and none of Lightning's warnings."""
    killed_run(RESUMABLE, tmp_path / "run", tmp_path)
    moved = tmp_path / "run2"
    if how == "copy":
        shutil.copytree(tmp_path / "run", moved, symlinks=True)
    else:
        shutil.move(tmp_path / "run", moved)
    last = moved / "checkpoints" / "last.ckpt"
    proc = run_cli([*RESUMABLE, f"hydra.run.dir={moved}", f"ckpt_path={last}"], tmp_path)
    got, want = results(moved), results(reference)
    assert (got["tested_epoch"], got["test/acc"]) == (want["tested_epoch"], want["test/acc"])
    assert same(got, want) and got["tested_ckpt"] == str(moved / "checkpoints" / "best.ckpt")
    assert "dirpath has changed" not in proc.stderr
    assert "Checkpoint directory" not in proc.stderr, proc.stderr


def resumable_copy(reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the reference run (3 epochs done) and its last.ckpt."""
    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    return out, out / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "override, key, old, new",
    [
        (["task.lr=0.05"], "task.lr", "0.01", "0.05"),
        (["task.milestones=[2]"], "task.milestones", "[1]", "[2]"),
        (["task.gamma=0.5"], "task.gamma", "0.1", "0.5"),
        (["selection.monitor=train/loss"], "selection.monitor", "val/acc", "train/loss"),
        (
            ["selection.mode=min", "selection.monitor=val/loss"],
            "selection.monitor",
            "val/acc",
            "val/loss",
        ),
        (["recipe=paper"], "recipe", "null", "paper"),
    ],
)
def test_resume_with_other_training_settings_is_refused(
    reference, tmp_path, override, key, old, new
):
    """A resume continues the training it resumes: another lr, schedule, selection metric or
    the paper recipe would be ignored (Lightning restores the optimiser, the scheduler and the
    selection state), so each is refused with one line naming the key and both values, and the
    run's config.yaml keeps what the run was trained with."""
    out, last = resumable_copy(reference, tmp_path)
    config = (out / "config.yaml").read_text()
    args = [*RESUMABLE, "trainer.max_epochs=4", *override]
    proc = run_cli([*args, f"hydra.run.dir={out}", f"ckpt_path={last}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc).startswith(
        f"error: ckpt_path={last} was trained with {key}={old}, this run has {key}={new}; "
    )
    assert (out / "config.yaml").read_text() == config
    assert load(last)["epoch"] == 2 and results(out) == results(reference)


def test_resume_with_fewer_max_epochs_than_done_is_one_line(reference, tmp_path):
    out, last = resumable_copy(reference, tmp_path)
    args = [*RESUMABLE, "trainer.max_epochs=2", f"hydra.run.dir={out}", f"ckpt_path={last}"]
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode == 2
    assert error_line(proc).startswith(
        f"error: ckpt_path={last} has trained 3 epochs, more than trainer.max_epochs=2; "
    )


def test_a_training_resume_reads_only_a_checkpoint_of_its_own_run(reference, tmp_path):
    """Resuming another run's checkpoint into a new folder would test a best checkpoint that
    is not in the run (or none): refused, with the command that resumes it in its own folder."""
    out, last = tmp_path / "other", reference / "checkpoints" / "last.ckpt"
    args = [*RESUMABLE, "trainer.max_epochs=4", f"hydra.run.dir={out}", f"ckpt_path={last}"]
    proc = run_cli(args, tmp_path, check=False)
    assert proc.returncode == 2
    assert error_line(proc).startswith(
        f"error: ckpt_path={last} is not in this run's folder ({out}); resume it in its own "
        f"folder with hydra.run.dir={reference}"
    )
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    "error, phase", [("EROFS", "replace"), ("EIO", "replace"), ("EROFS", "open")]
)
def test_a_failing_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, error, phase):
    """A filesystem remounted read-only (EROFS) or failing (EIO) while last.ckpt is written in
    epoch 1: one ``error:`` line naming the file and the reason, exit 3, the previous last.ckpt
    whole, results.json says failed and names it."""
    out = tmp_path / "run"
    failing = fault("FailingWrite", epoch=1, error=error, phase=phase)
    proc = run_cli(
        [*TINY, "trainer.max_epochs=3", f"hydra.run.dir={out}", *failing], tmp_path, check=False
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    reason = os.strerror(getattr(errno, error))
    assert error_line(proc).startswith(f"error: cannot write {last} ({reason}); ")
    assert load(last)["epoch"] == 0 and not list((out / "checkpoints").glob("*.tmp"))
    res = results(out)
    assert res["status"] == "failed" and res["last_good_ckpt"] == str(last)


def test_bad_checkpoint_paths_are_named_for_what_they_are(tmp_path):
    rng = random.Random(0)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    with pytest.raises(ConfigError) as info:
        load_checkpoint(garbage)
    assert "it is not a checkpoint" in str(info.value)
    assert "tampered" not in str(info.value) and "operand" not in str(info.value)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load_checkpoint(run_dir)
    assert str(info.value) == (
        f"ckpt_path={run_dir} is a directory; give the checkpoint file in it "
        f"(ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'})"
    )
    proc = run_cli([*TINY, "train=false", f"ckpt_path={tmp_path}"], tmp_path, check=False)
    assert proc.returncode == 2
    assert error_line(proc).startswith(f"error: ckpt_path={tmp_path} is a directory; ")


def test_a_dataset_mismatch_suggests_the_dataset_choice():
    stored = {"dataset": {"name": "bursts", "_target_": "datamodules.bursts.BurstsDataModule"}}
    current = {"dataset": {"name": "shd", "_target_": "datamodules.tonic_datasets.SHD"}}
    ckpt = {"state_dict": {}, "dblock_config": {**stored, "model": {}}}
    with pytest.raises(ConfigError) as info:
        check_checkpoint(ckpt, "x.ckpt", {}, {**current, "model": {}}, evaluate=True)
    assert "evaluate it with dataset=bursts" in str(info.value)
    assert "_target_" not in str(info.value)


def test_sigint_is_reported_as_sigint(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=2", f"hydra.run.dir={out}"]
    proc = run_cli([*args, *fault("SignalAt", epoch=1, signal="SIGINT")], tmp_path, check=False)
    assert proc.returncode == 130
    assert "SIGTERM" not in proc.stderr and "SIGTERM" not in (out / "run.log").read_text()
    assert error_line(proc).startswith("error: interrupted by SIGINT after 1 saved epoch(s)")


@pytest.mark.slow
def test_ddp_a_signal_to_one_process_stops_every_process(tmp_path):
    """Two DDP processes (CPU, gloo), SIGTERM to rank 1 only: both stop at the same batch
    boundary as an interrupted run does (exit 143, results.json "interrupted" from rank 0,
    last.ckpt the last completed epoch), with no traceback and none of Lightning's warnings."""
    out = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=3"]
    data = ["dataset.n_train=256", "dataset.n_test=101", "dataset.batch_size=32", "n_hidden=16"]
    once = fault("SignalAt", epoch=1, batch=1, rank=1)
    proc = run([*data, *ddp, f"hydra.run.dir={out}", *once], tmp_path, check=False, timeout=300)
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    res = results(out)
    assert res["status"] == "interrupted" and res["signal"] == "SIGTERM" and res["epoch"] == 1
    assert load(out / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert "sync_dist" not in proc.stderr, proc.stderr
