"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["drop_page_cache"]


def drop_page_cache(files: list[str] | list[Path]) -> None:
    """Ask the kernel to drop the cached pages of ``files`` (clean pages only), so that the
    next read is real I/O (``posix_fadvise(DONTNEED)``)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
