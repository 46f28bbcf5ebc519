"""What a client round holds in memory besides the swapper, read from the process itself.

The swapper keeps a round's weights and working memory within the share of the budget it
is given; :class:`HeldMemory` measures the rest (data, a tokenizer) so that the swapper's
share is the budget less that (DESIGN.md's budget contract for federated tiers). Linux's
``/proc/self/status`` is the source; elsewhere nothing is held back.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path

__all__ = ["HeldMemory", "release_freed_memory", "status_bytes"]


def status_bytes(key: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status`` in bytes (Linux; else None)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release_freed_memory() -> None:
    """Collect cycles (peft models hold some) and hand freed heap back to the kernel, so
    that what was built before the round neither counts as the round's nor hides in RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc


class HeldMemory:
    """What a client round holds beyond the resident set it began with.

    The swapper keeps a round's weights and working memory within the budget it is given;
    what the round holds besides -- its local data, a tokenizer (Gemma-3's takes 234 MB of
    resident set, SmolLM2's 33 MB), what a previous candidate's run left -- comes on top.
    For the whole round to keep its tier's budget (DESIGN.md's budget contract) the swapper
    is given the budget less that (:meth:`held`). Measured as the growth of the resident
    set since the round began, after collecting garbage and returning freed heap (Linux;
    elsewhere nothing is held back).
    """

    def __init__(self) -> None:
        release_freed_memory()
        self.start = status_bytes("VmRSS")

    def held(self) -> int:
        """Bytes the round holds now beyond where it began."""
        if self.start is None:
            return 0
        release_freed_memory()
        now = status_bytes("VmRSS")
        return max(0, now - self.start) if now is not None else 0
