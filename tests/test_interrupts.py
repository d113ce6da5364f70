"""Clean stops: SIGTERM, SIGINT and SLURM's requeue signal write an "interrupted" results.json
with the exact resume command, exit 128 + the signal, stop a -m sweep and name what did not run."""

from __future__ import annotations

import os
import shlex
import signal
import sys

from tests.faults import RESUMABLE, TINY, fault, run_cli
from tests.test_reliability import load, same
from tests.test_run import ROOT, results


def test_sigterm_writes_interrupted_results_with_the_exact_resume_command(reference, tmp_path):
    out = tmp_path / "run"
    args = [*RESUMABLE, f"hydra.run.dir={out}"]
    proc = run_cli([*args, *fault("SignalAt", epoch=1, batch=1)], tmp_path, check=False)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr
    res = results(out)
    assert res["status"] == "interrupted" and res["signal"] == "SIGTERM" and res["epoch"] == 1
    assert res["last_ckpt"] == str(out / "checkpoints" / "last.ckpt")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: interrupted by SIGTERM after 1 saved epoch(s); resume with: {res['resume']}"
    )
    assert load(out / "checkpoints" / "last.ckpt")["epoch"] == 0 and not (out / ".lock").exists()
    cd, command = res["resume"].split(" && ", 1)
    python, script, *resume = shlex.split(command)
    assert cd == f"cd {shlex.quote(str(tmp_path))}" and python == sys.executable
    assert script == str(ROOT / "run.py")
    # the command as written, less the fault that made this test's signal
    run_cli([a for a in resume if "callbacks.fault" not in a], tmp_path)
    assert same(results(out), results(reference))


def test_sigint_stops_cleanly_with_exit_130(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=3", f"hydra.run.dir={out}"]
    proc = run_cli([*args, *fault("SignalAt", epoch=1, signal="SIGINT")], tmp_path, check=False)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    res = results(out)
    assert res["status"] == "interrupted" and res["signal"] == "SIGINT" and res["epoch"] == 1
    assert load(out / "checkpoints" / "last.ckpt")["epoch"] == 0


def test_sigterm_stops_a_sweep_and_names_the_jobs_that_did_not_run(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer.max_epochs=2", "seed=0,1,2", f"hydra.sweep.dir={sweep}"]
    proc = run_cli([*args, *fault("SignalAt", epoch=1)], tmp_path, check=False)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "the sweep stops: 2 job(s) did not run: #1 (" in proc.stderr
    assert "seed=1" in proc.stderr and "seed=2" in proc.stderr
    assert results(sweep / "seed=0")["status"] == "interrupted"  # job folders: what they sweep
    assert not (sweep / "seed=1").exists() and not (sweep / "seed=2").exists()


def test_slurm_requeue_signal_requeues_and_the_job_resumes_by_itself(reference, tmp_path):
    """SLURM's requeue signal (SIGUSR1, Lightning's SLURMEnvironment with auto-requeue) stops at
    a batch boundary and calls ``scontrol requeue``; the requeued job (same command, same
    environment) resumes from last.ckpt on its own and ends as the uninterrupted run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "dblock",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    out = tmp_path / "run"
    signal_once = fault("SignalAt", epoch=1, signal="SIGUSR1", unless_resumed=True)
    args = [*RESUMABLE, f"hydra.run.dir={out}", *signal_once]
    proc = run_cli(args, tmp_path, check=False, env=env)
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    res = results(out)
    assert res["status"] == "interrupted" and res["signal"] == "SIGUSR1" and res["epoch"] == 1
    assert not list(out.rglob("hpc_ckpt_*.ckpt"))  # no mid-batch checkpoint from Lightning
    run_cli(args, tmp_path, env=env)  # the requeued job
    assert same(results(out), results(reference))
