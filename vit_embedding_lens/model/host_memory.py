"""Keep freed host memory in the process, so that a full cache does not page-fault on every call.

A full ``run_with_cache`` keeps every activation alive: about 1.3 GB of fresh memory per call for
ViT-B/16 at batch 8. With glibc's default settings, ``malloc`` serves blocks that large with
``mmap`` (or trims them off the heap's top once freed), so every call's cache arrives as pages the
kernel has to fault in and zero: about 320k minor page faults per call, at several microseconds
each in a virtual machine. That, and not the arithmetic, made a full cache cost about 2x a plain
forward on a 2-core CPU; with freed memory kept for reuse it costs about 1.05x.

:func:`retain_freed_memory` tells glibc to keep what is freed (no trimming, no ``mmap`` for large
blocks; ``mallopt(3)``), which is what jemalloc or tcmalloc, preloaded, would do. HookedViT calls it
once, on the first ``run_with_cache``, unless the environment variable
``VIT_LENS_RETAIN_FREED_MEMORY`` is ``0``. The price is that the process's resident memory stays at
its peak until :func:`release_freed_memory` hands the free pages back. Elsewhere than on glibc
(macOS, Windows, musl) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

#: ``mallopt`` parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: set to ``0`` to keep glibc's defaults
ENV_SWITCH = "VIT_LENS_RETAIN_FREED_MEMORY"

_retained = False


def _glibc() -> Optional[ctypes.CDLL]:
    """glibc, when the process runs on it (Linux with glibc); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (glibc): no trimming of the heap
    (``M_TRIM_THRESHOLD = -1``, "disables trimming completely") and every block from the heap
    (``M_MMAP_MAX = 0``), so later allocations reuse pages already faulted in.

    Idempotent; returns True when the setting is in effect.
    """
    global _retained
    if _retained:
        return True
    libc = _glibc()
    if libc is None:
        return False
    _retained = bool(libc.mallopt(_M_TRIM_THRESHOLD, -1)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
    return _retained


def retain_freed_memory_by_default() -> bool:
    """:func:`retain_freed_memory`, unless ``VIT_LENS_RETAIN_FREED_MEMORY=0`` says not to."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    return retain_freed_memory()


def release_freed_memory() -> bool:
    """Hand the free pages the process holds back to the kernel (glibc's ``malloc_trim(0)``),
    e.g. after a large cache is dropped in a long-lived notebook. Returns True when some memory
    was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
