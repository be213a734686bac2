"""Linux calls that Python's os module lacks, loaded from libc on first use (ctypes is not
imported on the runtime's hot path). Both are hints to the kernel: where libc or the file
system lacks them, nothing happens and the caller's data stays as it was."""

import functools
from collections.abc import Callable

_SYNC_FILE_RANGE_WRITE = 2
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


@functools.cache
def _call(name: str, *argtypes: str) -> Callable[..., int] | None:
    import ctypes

    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except AttributeError:  # not Linux
        return None
    call.argtypes = [getattr(ctypes, t) for t in argtypes]
    call.restype = ctypes.c_int
    return call


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Start writing the file's dirty pages (in the range; length 0: to the end) to disk,
    without waiting; an error is the next fsync's to report."""
    if (call := _call("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")) is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free a range of a file, its size kept; bytes outside the range are untouched."""
    if (call := _call("fallocate", "c_int", "c_int", "c_int64", "c_int64")) is not None:
        call(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
