"""Process set-up for training on the CPU, applied once at start-up (``prepare_process``).

The allocator. torch takes CPU tensors from the C allocator. glibc serves every block above its
mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``; the first write
to each page of a fresh mapping is a page fault that the kernel fills with zeros. A training
step at the SHD shape allocates several (500, 128, 128) tensors (33 MB, 8 k pages each) and pays
those faults again every step. Serving large blocks from the heap (``M_MMAP_MAX = 0``) and
trimming its top only above 2 GiB of free memory (``M_TRIM_THRESHOLD``) lets later steps reuse
pages already mapped; the process keeps its peak heap (plus some fragmentation) instead of
handing it back between steps. Measured on SHD (d-block, default threads): 13.9 s per epoch
against 17.95 s, for 1.02 GB of peak memory against 0.90 GB. The environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do the same; setting either yourself leaves
the allocator to them.

Threads. torch's OpenMP threads spin while they wait for each other. On a CPU that other jobs
already keep busy, a waiting thread holds its core while the one it waits for is descheduled,
and every parallel operator can cost a scheduler time slice: a d-block training step at the
default 2 threads took 1.9-3.1 s on a 2-core machine at load 7, against 58-70 ms with one thread
(``OMP_NUM_THREADS=1``). The thread count is left to the user (it changes the order of
floating-point reductions, hence results); ``prepare_process`` says so when the CPU is busy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def prepare_process() -> None:
    """Tune the allocator and warn when a busy CPU makes torch's thread default a poor choice."""
    tune_allocator()
    threads, cpus, load = torch.get_num_threads(), os.cpu_count() or 1, os.getloadavg()[0]
    if threads > 1 and load >= cpus:
        log.warning(
            "the CPU is busy (load %.1f on %d cores): torch's %d threads spin-wait for each "
            "other and may run many times slower than one; on a shared machine try "
            "OMP_NUM_THREADS=1",
            load,
            cpus,
            threads,
        )


def tune_allocator() -> bool:
    """Keep large CPU blocks on glibc's heap (see the module docstring). Returns whether it did.

    A no-op where it cannot apply or the user chose: not Linux with glibc, or ``MALLOC_MMAP_MAX_``
    or ``MALLOC_TRIM_THRESHOLD_`` already set in the environment.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    log.debug("glibc allocator: large blocks on the heap (%s)", done)
    return done
