"""Read safetensors files into buffers this process owns: positioned reads, no memory map.

A memory-mapped file's pages count in the process's RSS while they are mapped; a budget
that must hold for the whole process cannot let a 671 MB LM head be paged in through a map.
These readers parse the safetensors header themselves and ``readinto`` / ``pread`` each
tensor's bytes straight into a freshly allocated tensor: one copy from the page cache, no
intermediate ``bytes``, nothing mapped. :func:`read_tensors` can hash the file on the way
(header and data in file order), so verifying a block costs no extra pass over its bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blockpool.errors import IntegrityError

__all__ = ["TensorInfo", "cast", "empty", "read_header", "read_rows", "read_tensors"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in its file: dtype, shape, absolute byte range."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (``shape[0]`` slices) of the tensor."""
        rows = self.shape[0] if self.shape else 1
        return (self.stop - self.start) // max(rows, 1)


def read_header(path: Path) -> tuple[bytes, dict[str, TensorInfo], dict[str, str]]:
    """The raw header bytes (length prefix included), the tensors and the metadata.

    Raises:
        IntegrityError: not a safetensors file, or a header out of bounds.
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise IntegrityError(f"{path}: truncated safetensors file (no header)")
        (size,) = struct.unpack("<Q", prefix)
        if size > _MAX_HEADER:
            raise IntegrityError(f"{path}: safetensors header of {size} bytes is implausible")
        raw = f.read(size)
    if len(raw) != size:
        raise IntegrityError(f"{path}: truncated safetensors header")
    try:
        doc: dict[str, Any] = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: unreadable safetensors header ({e})") from None
    meta = doc.pop("__metadata__", None) or {}
    base = 8 + size
    tensors = {}
    for name, spec in doc.items():
        if spec["dtype"] not in _DTYPES:
            raise IntegrityError(f"{path}: tensor {name} has unsupported dtype {spec['dtype']}")
        start, stop = spec["data_offsets"]
        tensors[name] = TensorInfo(
            name, _DTYPES[spec["dtype"]], tuple(spec["shape"]), base + start, base + stop
        )
    return prefix + raw, tensors, meta


_HUGE = 2 << 20
_OWN_MAP = 128 << 10  # buffers from this size get a memory map of their own


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` for weights: a large buffer gets a private anonymous map of its own.

    A map of its own goes back to the OS the moment the tensor goes, whatever malloc's
    thresholds (weights never sit in the heap among activations, where freed holes stay).
    Its pages are advised ``MADV_HUGEPAGE`` (honoured where transparent huge pages are in
    ``madvise`` or ``always`` mode): a fresh buffer faulted in 4 KiB at a time costs more
    than copying a block from the page cache, which a budgeted run does at every pass.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _OWN_MAP:
        return torch.empty(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= _HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    # the tensor keeps the map alive; it is unmapped when the last view of it goes
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` for floating weights, into a buffer of :func:`empty` (a map of its own
    for a large one, so a cast weight stays out of the heap too); other tensors as they are."""
    if not t.is_floating_point():
        return t
    if t.dtype == dtype or t.device.type != "cpu":
        return t.to(dtype)
    return empty(tuple(t.shape), dtype).copy_(t)


def _fill(f, target: torch.Tensor, nbytes: int, hasher=None) -> None:
    """``readinto`` the next ``nbytes`` of ``f`` into ``target``'s memory."""
    if nbytes == 0:
        return
    view = memoryview(target.view(torch.uint8).reshape(-1).numpy()).cast("B")
    done = 0
    while done < nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise IntegrityError(f"{f.name}: truncated (expected {nbytes - done} more bytes)")
        done += got
    if hasher is not None:
        hasher.update(view)


def read_tensors(
    path: Path, names: list[str] | None = None, *, hasher: Any = None, one_buffer: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, each read into its own freshly allocated buffer.

    Args:
        path: the file.
        names: the tensors to read (default: all).
        hasher: a ``hashlib`` object updated with every byte of the file in order (the
            whole file is then read, ``names`` or not).
        one_buffer: read all the tensors (``names`` must be ``None``) with one read into
            one buffer and return views of it: one large allocation faults in far faster
            than many (a budgeted run re-reads its blocks at every pass). The tensors then
            share memory, which safetensors refuses to save: for modules that only run.

    Raises:
        IntegrityError: a truncated or malformed file.
    """
    if one_buffer and names is None:
        return _read_whole(path, hasher)
    header, tensors, _ = read_header(path)
    wanted = set(tensors) if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    if hasher is not None:
        hasher.update(header)
    with open(path, "rb", buffering=0) as f:
        position = f.seek(len(header))
        for info in sorted(tensors.values(), key=lambda t: t.start):
            keep = info.name in wanted
            if not keep and hasher is None:
                continue
            if info.start != position:
                if hasher is None:
                    f.seek(info.start)
                elif info.start > position:  # valid files have no gaps; hash one anyway
                    hasher.update(f.read(info.start - position))
                else:
                    raise IntegrityError(f"{path}: overlapping tensors in the header")
            buffer = empty(info.shape, info.dtype)
            _fill(f, buffer, info.stop - info.start, hasher)
            position = info.stop
            if keep:
                out[info.name] = buffer
        if hasher is not None:
            rest = f.read()
            hasher.update(rest)
    return out


def _read_whole(path: Path, hasher: Any) -> dict[str, torch.Tensor]:
    """:func:`read_tensors` of every tensor as views of one buffer."""
    header, tensors, _ = read_header(path)
    base = stop = len(header)
    for info in sorted(tensors.values(), key=lambda t: t.start):
        if info.start < stop:
            raise IntegrityError(f"{path}: overlapping tensors in the header")
        stop = info.stop
    data = empty((stop - base,), torch.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(base)
        _fill(f, data, stop - base)
        rest = f.read() if hasher is not None else b""
    if hasher is not None:
        hasher.update(header)
        hasher.update(memoryview(data.numpy()))
        hasher.update(rest)
    out = {}
    for info in tensors.values():
        piece = data[info.start - base : info.stop - base]
        size = info.dtype.itemsize
        if (info.start - base) % size:  # a misaligned tensor cannot be a view: copy it
            piece = piece.clone()
        out[info.name] = piece.view(info.dtype).view(info.shape)
    return out


def read_rows(
    path: Path, info: TensorInfo, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor, by one positioned read into an owned buffer: ``out``
    (contiguous, the tensor's dtype, ``stop - start`` rows) or a fresh one.

    (Reading a large range as parts on two threads at once was measured slower: Gemma-3
    decoding at 25% of its bytes, 17.8 s against 15.6-16.2 s.)
    """
    shape = (stop - start, *info.shape[1:])
    if out is None:
        rows = empty(shape, info.dtype)
    elif tuple(out.shape) != shape or out.dtype != info.dtype or not out.is_contiguous():
        raise ValueError(f"out: {tuple(out.shape)} {out.dtype} for rows {shape} {info.dtype}")
    else:
        rows = out
    nbytes = (stop - start) * info.row_bytes
    if nbytes:
        view = memoryview(rows.view(torch.uint8).reshape(-1).numpy()).cast("B")
        fd = os.open(path, os.O_RDONLY)
        try:
            _pread(fd, view, info.start + start * info.row_bytes, path, info.name)
        finally:
            os.close(fd)
    return rows


def _pread(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise IntegrityError(f"{path}: truncated tensor {name}")
        done += got
