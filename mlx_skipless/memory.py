"""Process memory settings for a command that streams a checkpoint block by block."""

import ctypes
import sys


def keep_freed_memory():
    """For a process that streams many blocks of the same shapes: glibc hands every freed
    array over 32 MB back to the kernel, which zeroes fresh pages for the next block's
    arrays of the same sizes; on Linux that was a third of a 7B conversion's time per
    block (docs/numbers.md). Kept in the heap, they are reused. Process-wide, so the command line
    calls it, not the library; a no-op where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        mallopt(option, ctypes.c_int(2**31 - 1))
