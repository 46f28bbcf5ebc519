"""Progress bars: a redrawn bar on a terminal, plain lines anywhere else.

tqdm redraws its line with carriage returns; piped into a file or a CI log that leaves one
long line of overwritten states (and bars closed with ``leave=False`` vanish without a
trace). Off a terminal, :func:`bar` writes whole lines instead: its first state, then one
line at most every :data:`PLAIN_INTERVAL` seconds, and its final state when it closes.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["PLAIN_INTERVAL", "bar"]

PLAIN_INTERVAL = 10.0  # seconds between two lines of one bar off a terminal


class _Lines(io.TextIOBase):
    """A stream that turns tqdm's redraws into whole lines (its clears into nothing)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on stderr (or ``file=``), plain lines off a terminal."""
    stream = kwargs.pop("file", None) or sys.stderr
    if not kwargs.get("disable") and not _terminal(stream):
        interval = max(kwargs.pop("mininterval", 0.0), PLAIN_INTERVAL)
        kwargs |= {"mininterval": interval, "leave": True, "dynamic_ncols": False}
        stream = _Lines(stream)
    return tqdm(iterable, file=stream, **kwargs)
