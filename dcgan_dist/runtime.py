"""Process-wide settings every training process applies first: CPU threads and the host memory allocator.

Why the allocator: glibc's malloc hands large freed blocks back to the OS (munmap, heap trimming), so each
training step maps its activations afresh and the kernel zero-fills every page on first touch. A CPU
DCGAN-64 step (ngf=ndf=32, batch 64) took ~20,000 page faults and ~40 ms of system time out of ~350-400 ms;
keeping freed memory in the process made steps 2-11 % faster (docs/performance.md), and data-parallel
workers in lock step gain a little more (they no longer fault and zero-fill at the same moments). The
process then keeps its peak footprint, which a training loop returns to every step anyway.
"""

from __future__ import annotations

import ctypes
import sys

import torch

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit: larger blocks are still mapped and unmapped
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap before any is returned


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve blocks up to 32 MiB from its heap and to keep freed memory for reuse.

    Returns False (and changes nothing) where the C library is not glibc, e.g. macOS or musl.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either threshold also turns off glibc's own adjustment of them; mallopt returns 1 on success.
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def configure_process(train_cfg) -> None:
    """Apply cfg.train's process-wide settings: torch's CPU thread count and the allocator (see above)."""
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    if train_cfg.keep_freed_memory:
        keep_freed_memory()
