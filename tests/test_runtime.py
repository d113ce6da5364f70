"""The process set-up that run.py applies: large CPU tensors reuse heap pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import resource, torch
from dblock.runtime import tune_allocator
tuned = tune_allocator()
faults = []
for _ in range(12):  # allocate, write and free 64 MB: fresh pages faulted in each time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2**24)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, min(faults[-3:]))  # after a few rounds the heap has room for it
"""


def probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_tuned_allocator_reuses_pages_and_respects_the_users_setting():
    tuned, faults = probe()
    assert tuned and faults < 1000  # 64 MB of 4 KiB pages would be 16384 faults
    tuned, faults = probe(MALLOC_MMAP_MAX_="65536")  # the user's own setting (glibc's default)
    assert not tuned and faults > 10000


def test_prepare_process_names_one_thread_only_when_the_cpu_is_busy(monkeypatch, caplog):
    import torch

    from dblock import runtime

    monkeypatch.setattr(runtime, "tune_allocator", lambda: False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, warned in ((0.3, False), (2.0, True), (7.5, True)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        caplog.clear()
        with caplog.at_level("WARNING", logger="dblock.runtime"):
            runtime.prepare_process()
        assert ("OMP_NUM_THREADS=1" in caplog.text) is warned
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # already one thread: nothing to say
    caplog.clear()
    runtime.prepare_process()
    assert caplog.text == ""
