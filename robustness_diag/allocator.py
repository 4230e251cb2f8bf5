"""How the CPU process gets memory for large tensors: from the kernel on every call, or reused from earlier calls.

Sampling an official SRFlow architecture at hundreds of LR pixels allocates and frees tensors of tens to hundreds of
MB at every layer. With glibc's defaults every block above its mmap threshold (at most 32 MiB) is a fresh mapping:
the kernel zero-fills each of its pages on first touch and unmaps it on free, so the same memory is faulted in again
and again. Measured on the official 4X architecture (``benchmarks/realsize_bench.py --plan modes``), those page
faults are 15-20% of the CPU time of plain and traced sampling at 240x136 LR and a third at 480x270, and their count
varies from call to call.

:func:`keep_freed_memory` ("reuse", what the commands do by default on Linux) tells glibc to serve large blocks from
its heap and to keep up to :data:`KEEP_LIMIT` bytes of freed memory there, so a block freed by one layer is reused by
the next: no page faults after the first call. The cost: the process's resident memory stays near its peak until it
ends (or until :func:`return_freed_memory`), and the peak itself is higher (1.1x at 240x136, 1.2x at 480x270:
freed blocks between live ones are not always reusable).
:func:`system_defaults` ("system") leaves (or puts back) the C library's own behaviour. Neither changes a single
computed number. Other C libraries (macOS, Windows, musl) are left alone: the functions return False there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: freed bytes the heap keeps before giving memory back to the kernel in "reuse" mode (mallopt takes a C int)
KEEP_LIMIT = 2 ** 31 - 1
#: glibc's defaults: 128 KiB trim and mmap thresholds, 65536 mappings
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
#: the choices of ``--cpu-memory``
MODES = ("reuse", "system")

_mode = "system"


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc's handle, or None when this process does not run on glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _set(values: dict) -> bool:
    libc = _glibc()
    return libc is not None and all(libc.mallopt(k, v) == 1 for k, v in values.items())


def keep_freed_memory() -> bool:
    """"reuse": large blocks from the heap, up to :data:`KEEP_LIMIT` freed bytes kept for reuse. True when applied."""
    global _mode
    ok = _set({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: KEEP_LIMIT})
    if ok:
        _mode = "reuse"
    return ok


def system_defaults() -> bool:
    """"system": the C library's own behaviour. Nothing to do unless "reuse" was applied in this process; then
    large blocks are mapped again, the heap is trimmed at glibc's default 128 KiB and the memory "reuse" kept is
    given back (glibc's dynamic mmap threshold stays off once any threshold was set). True when applied."""
    global _mode
    if _mode == "system":
        return _glibc() is not None
    ok = _set({M_MMAP_MAX: DEFAULTS[M_MMAP_MAX], M_TRIM_THRESHOLD: DEFAULTS[M_TRIM_THRESHOLD]})
    if ok:
        return_freed_memory()
        _mode = "system"
    return ok


def use(mode: str) -> bool:
    """Applies ``mode`` (one of :data:`MODES`); True when applied, False where the C library is not glibc.

    Raises:
        ValueError: an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"--cpu-memory must be one of {', '.join(MODES)}, got {mode!r}")
    return keep_freed_memory() if mode == "reuse" else system_defaults()


def return_freed_memory() -> bool:
    """Gives the heap's free memory back to the kernel (``malloc_trim``); True when glibc released any."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def current_mode() -> str:
    """``"reuse"`` when :func:`keep_freed_memory` is in effect, else ``"system"``."""
    return _mode


__all__ = ["MODES", "KEEP_LIMIT", "keep_freed_memory", "system_defaults", "use", "return_freed_memory",
           "current_mode"]
