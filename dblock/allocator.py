"""glibc allocator settings that suit training on the CPU, applied once at start-up.

torch takes CPU tensors from the C allocator. glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``; the first write to each page of
a fresh mapping is a page fault that the kernel fills with zeros. A training step at the SHD
shape allocates a (500, 128, 700) batch (179 MB, 44 k pages) and several (500, 128, 128) tensors,
and pays those faults again every step. Serving large blocks from the heap (``M_MMAP_MAX = 0``)
and trimming its top only above 2 GiB of free memory (``M_TRIM_THRESHOLD``) lets later steps
reuse pages already mapped; the process keeps its peak heap instead of handing it back between
steps. The environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do the same;
setting either yourself leaves the allocator to them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


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
