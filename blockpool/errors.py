"""Errors raised by blockpool for bad input (user errors), as opposed to bugs.

Messages name the problem and, where there is one, the fix.
"""

__all__ = [
    "BlockpoolError",
    "IntegrityError",
    "ManifestError",
    "SourceError",
    "UnsupportedArchitecture",
    "UsageError",
]


class BlockpoolError(Exception):
    """Base of all user-facing errors; the CLI prints ``str(e)`` and exits 2."""


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
