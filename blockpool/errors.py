"""Errors raised by blockpool for bad input (user errors), as opposed to bugs.

Messages name the problem and, where there is one, the fix. They speak of the library's
arguments, marked with :func:`arg`: ``str(error)`` shows the argument's name (``budget``),
and the command line shows its own flag instead (``--budget``, see
:meth:`BlockpoolError.render`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = [
    "arg",
    "BlockpoolError",
    "IntegrityError",
    "ManifestError",
    "PoolBusy",
    "PoolWriteError",
    "SourceError",
    "UnsupportedArchitecture",
    "UsageError",
]


_MARK = "\x1f"
_ARG_RE = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*){_MARK}")


def arg(name: str) -> str:
    """An argument's name inside an error message (shown as ``name``, or as a CLI flag)."""
    return f"{_MARK}{name}{_MARK}"


class BlockpoolError(Exception):
    """Base of all user-facing errors; the CLI prints :meth:`render` and exits 2."""

    def render(self, flag: Callable[[str], str] | None = None) -> str:
        """The message, each marked argument written as ``flag(name)`` (default: the name)."""
        text = super().__str__()
        return _ARG_RE.sub(lambda m: flag(m[1]) if flag else m[1], text)

    def __str__(self) -> str:
        return self.render()


class UsageError(BlockpoolError):
    """A bad argument or input file."""


class SourceError(BlockpoolError):
    """A model source that cannot be read (missing, pickled, malformed)."""


class UnsupportedArchitecture(BlockpoolError):
    """A checkpoint whose architecture no family spec covers."""


class ManifestError(BlockpoolError):
    """A ``pool.json`` that is missing, truncated, malformed or unsafe."""


class IntegrityError(BlockpoolError):
    """A block file whose bytes do not match the sum recorded in the manifest."""


class PoolBusy(BlockpoolError):
    """Another process holds the pool's write lock (see :func:`blockpool.lock.pool_lock`)."""


class PoolWriteError(BlockpoolError):
    """A file of the pool could not be written (full disk, read-only or missing location);
    the pool's manifest, and so every model it lists, is left as it was."""
