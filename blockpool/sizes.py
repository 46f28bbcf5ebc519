"""Byte sizes as people write them: ``4GB``, ``512MB``, ``1.5GiB``, ``300000000``."""

from __future__ import annotations

import re

from blockpool.errors import UsageError

__all__ = ["budget_allowance", "format_size", "parse_size"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a size into bytes: decimal (``KB``/``MB``/``GB``/``TB``) and binary
    (``KiB``/``MiB``/``GiB``/``TiB``) units, case-insensitive, or a plain byte count.

    Raises:
        UsageError: not a positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _UNITS:
            raise UsageError(
                f"cannot read size {text!r}; write it like 4GB, 512MB, 1.5GiB or a byte count"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return value


def format_size(n: float) -> str:
    """``1_500_000`` -> ``"1.5MB"`` (decimal units, as parse_size reads them back)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}B"


def budget_allowance(budget: int) -> int:
    """The most a run within ``budget`` may hold over its warm floor, peak RSS (DESIGN.md's
    budget contract): the budget and a tolerance of max(10%, 32 MiB), for what no plan
    counts (allocator slack, a tokenizer's tables, read buffers)."""
    return budget + max(budget // 10, 32 << 20)
