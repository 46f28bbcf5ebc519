"""Quantized weights kept packed in memory and dequantized at each use.

A block stored at ``int8``, ``nf4`` or ``fp4`` (see :mod:`blockpool.quant.formats`) runs
with its matrices packed: a :class:`PackedWeight` holds the int8 matrix and its row scales,
or the 4-bit codes, their block absmax (float32, the double quantization undone once at
load) and the 16-value code book. The module that owned the weight (``nn.Linear``,
transformers' ``Conv1D``, ``nn.Embedding`` and its subclasses) is given a ``weight``
property that dequantizes on access, so its own ``forward`` runs unchanged on the very
values :func:`~blockpool.quant.formats.dequantize` gives (the dequantize-at-load path):

* a linear layer dequantizes its matrix per call, in row chunks of at most
  :data:`CHUNK_ELEMENTS` weights when it is larger (a tied LM head over a 262k vocabulary
  never exists dense);
* a token embedding dequantizes only the rows of the tokens present.

What a packed block costs in memory is its packed bytes (:func:`packed_nbytes`); what a
forward call needs on top, while one matrix is dequantized, is :func:`transient_bytes`.
bitsandbytes 0.50 runs ``dequantize_4bit`` on the CPU when rows are whole blocks of 64;
other shapes (tiny test models) are dequantized in plain torch, as the load path does.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CHUNK_ELEMENTS",
    "PackedWeight",
    "pack_module",
    "packed_nbytes",
    "packed_weight_of",
    "transient_bytes",
]

CHUNK_ELEMENTS = 1 << 20
"""The most weights one linear call dequantizes at once (4 MiB at float32)."""

_PACKED_CLASSES: dict[type, type] = {}


class PackedWeight(nn.Module):
    """One quantized matrix, packed, dequantized on demand to ``dtype``.

    Args:
        tensors: the module-relative stored state from
            :func:`~blockpool.quant.formats.quantize` (``weight`` and ``SCB``, or ``weight``
            and ``weight.*``).
        dtype: the compute dtype of the dequantized matrix.
        transposed: the owner stores the matrix ``[in, out]`` (GPT-2's ``Conv1D``).
    """

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, *, transposed: bool = False
    ) -> None:
        super().__init__()
        self.dtype, self.transposed = dtype, transposed
        if "SCB" in tensors:
            self.precision = "int8"
            self.register_buffer("data", tensors["weight"])
            self.register_buffer("scale", tensors["SCB"].float().unsqueeze(1) / 127.0)
            self.shape = tuple(tensors["weight"].shape)
            self.blocksize = 1
            return
        import bitsandbytes.functional as bnb_f

        stats = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
        state = bnb_f.QuantState.from_dict(stats, device=torch.device("cpu"))
        absmax = state.absmax
        if state.nested:
            absmax = bnb_f.dequantize_blockwise(absmax, state.state2) + state.offset
        self.precision = state.quant_type
        self.register_buffer("data", tensors["weight"].reshape(-1))
        self.register_buffer("absmax", absmax.float())
        self.register_buffer("code", state.code.float())
        self.shape = tuple(state.shape)
        self.blocksize = int(state.blocksize)

    @property
    def rows_per_chunk(self) -> int:
        """Rows dequantized at once by a chunked call: a multiple of the rows that make
        whole 4-bit blocks, at most :data:`CHUNK_ELEMENTS` weights (one aligned run if more)."""
        width = self.shape[1]
        align = self.blocksize // math.gcd(width, self.blocksize)
        return max(align, CHUNK_ELEMENTS // width // align * align)

    def matrix(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the ``[out, in]`` matrix at ``dtype`` (``start`` on a
        chunk boundary: a multiple of the rows that make whole 4-bit blocks)."""
        rows, width = self.shape
        stop = rows if stop is None else min(stop, rows)
        if self.precision == "int8":
            return self.data[start:stop].float().mul_(self.scale[start:stop]).to(self.dtype)
        first, n = start * width, (stop - start) * width
        if first % self.blocksize:
            raise ValueError(f"row {start} does not start a 4-bit block of {self.blocksize}")
        packed = self.data[first // 2 : (first + n + 1) // 2]
        absmax = self.absmax[first // self.blocksize : -(-(first + n) // self.blocksize)]
        return self._dequantize(packed, absmax, stop - start)

    def rows_at(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (a 1-D long tensor) of the ``[out, in]`` matrix at ``dtype``."""
        rows, width = self.shape
        if self.precision == "int8":
            return self.data[index].float().mul_(self.scale[index]).to(self.dtype)
        if width % self.blocksize == 0:
            packed = self.data.view(rows, width // 2)[index].reshape(-1)
            absmax = self.absmax.view(rows, -1)[index].reshape(-1)
            return self._dequantize(packed, absmax, len(index))
        # rows that are not whole blocks: element by element, as the load path does
        at = (index.unsqueeze(1) * width + torch.arange(width, device=index.device)).reshape(-1)
        byte = self.data[at // 2]
        codes = torch.where(at % 2 == 0, byte >> 4, byte & 15).long()
        values = self.code[codes] * self.absmax[at // self.blocksize]
        return values.view(len(index), width).to(self.dtype)

    def _dequantize(self, packed: torch.Tensor, absmax: torch.Tensor, rows: int) -> torch.Tensor:
        import bitsandbytes.functional as bnb_f

        from blockpool.quant.formats import _dequantize_4bit_unaligned

        state = bnb_f.QuantState(
            absmax=absmax,
            shape=torch.Size([rows, self.shape[1]]),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.precision,
            dtype=self.dtype,
        )
        if self.shape[1] % self.blocksize == 0 or packed.device.type != "cpu":
            return bnb_f.dequantize_4bit(packed, state)
        return _dequantize_4bit_unaligned(packed, state)

    @property
    def layout_shape(self) -> tuple[int, int]:
        """The shape the owner's ``weight`` has (``[in, out]`` when transposed)."""
        return self.shape[::-1] if self.transposed else self.shape

    def dense(self) -> torch.Tensor:
        """The whole matrix at ``dtype``, in the owner's layout (``[in, out]`` if transposed)."""
        matrix = self.matrix()
        return matrix.t().contiguous() if self.transposed else matrix

    def extra_repr(self) -> str:
        return f"{self.precision}, shape={self.shape}, dtype={self.dtype}"


class _PackedMixin:
    """Gives a module whose weight was packed a ``weight`` that dequantizes on access."""

    packed_weight: PackedWeight
    _rows: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self._rows if self._rows is not None else self.packed_weight.dense()


class _PackedLinear(_PackedMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_weight
        rows, chunk = packed.shape[0], packed.rows_per_chunk
        if packed.transposed or rows <= chunk:
            return super().forward(x)
        out = x.new_empty(*x.shape[:-1], rows)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            bias = self.bias[start:stop] if self.bias is not None else None
            out[..., start:stop] = F.linear(x, packed.matrix(start, stop), bias)
        return out


class _PackedEmbedding(_PackedMixin):
    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        uniq, local = torch.unique(input_ids, return_inverse=True)
        self._rows = self.packed_weight.rows_at(uniq)
        try:
            return super().forward(local, *args, **kwargs)
        finally:
            self._rows = None


def _gathers(cls: type) -> bool:
    """An embedding whose forward takes token ids first (not OPT's positions)."""
    if not issubclass(cls, nn.Embedding):
        return False
    first = next(iter(list(inspect.signature(cls.forward).parameters)[1:]), "")
    return first in ("input", "input_ids")


def _packed_class(cls: type) -> type:
    if cls not in _PACKED_CLASSES:
        if _gathers(cls):
            base: type = _PackedEmbedding
        elif issubclass(cls, nn.Linear):
            base = _PackedLinear
        else:
            base = _PackedMixin
        _PACKED_CLASSES[cls] = type(f"Packed{cls.__name__}", (base, cls), {})
    return _PACKED_CLASSES[cls]


def pack_module(module: nn.Module, packed: PackedWeight) -> None:
    """Replace ``module.weight`` by ``packed`` (held as ``module.packed_weight``)."""
    if "weight" in module._parameters:
        del module._parameters["weight"]
    module.__class__ = _packed_class(type(module))
    if isinstance(module, nn.Embedding):
        module.padding_idx = None  # ids are renumbered per call; padding_idx only shapes grads
    module.packed_weight = packed


def packed_weight_of(module: nn.Module) -> PackedWeight | None:
    """The :class:`PackedWeight` standing for ``module.weight``, if it is packed."""
    return module._modules.get("packed_weight") if isinstance(module, _PackedMixin) else None


# --------------------------------------------------------------------------- bytes


def _kind(name: str, names: Mapping[str, Any]) -> str:
    """How a stored tensor sits in memory: ``int8`` data, ``scb``, ``4bit`` data, ``absmax``,
    ``code``, ``gone`` (double-quantization state, undone at load) or ``plain``."""
    if name.endswith(".SCB"):
        return "scb"
    if name.endswith(".weight.absmax"):
        return "absmax"
    if name.endswith(".weight.quant_map"):
        return "code"
    if any(name.endswith(s) for s in (".nested_absmax", ".nested_quant_map")) or (
        ".weight.quant_state." in name
    ):
        return "gone"
    if name.endswith("weight") and f"{name}.absmax" in names:
        return "4bit"
    if name.endswith("weight") and f"{name[: -len('weight')]}SCB" in names:
        return "int8"
    return "plain"


def packed_nbytes(infos: Mapping[str, Any], dtype: torch.dtype, skip: tuple[str, ...] = ()) -> int:
    """Bytes a block's stored tensors take once built packed at compute dtype ``dtype``.

    Args:
        infos: stored tensor name -> header info (``shape``, ``dtype``, as
            :func:`blockpool.reads.read_header` gives).
        dtype: the compute dtype (plain floating tensors are cast to it).
        skip: logical tensors not counted (with their quantization state).
    """
    total = 0
    for name, info in infos.items():
        if any(name == s or name.startswith(f"{s}.") for s in skip):
            continue
        if name.endswith(".SCB") and f"{name[: -len('SCB')]}weight" in skip:
            continue
        numel = int(torch.Size(info.shape).numel())
        kind = _kind(name, infos)
        if kind in ("absmax", "code", "scb"):
            total += numel * 4
        elif kind in ("int8", "4bit"):
            total += numel
        elif kind == "plain":
            floating = info.dtype.is_floating_point
            total += numel * (dtype.itemsize if floating else info.dtype.itemsize)
    return total


def matrices(path: Any, quant: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Logical name -> ``(rows, columns)`` of each quantized matrix of a block file (its
    ``[out, in]`` shape as quantized; 4-bit shapes come from the stored quant state)."""
    import json

    from blockpool.reads import read_header, read_tensors

    infos = read_header(path)[1]
    out, states = {}, {}
    for name in quant.get("tensors", ()):
        if name not in infos:
            continue
        if f"{name[: -len('weight')]}SCB" in infos:
            out[name] = tuple(infos[name].shape)
        else:
            states[name] = next(n for n in infos if n.startswith(f"{name}.quant_state."))
    if states:
        read = read_tensors(path, list(states.values()))
        for name, key in states.items():
            out[name] = tuple(json.loads(bytes(read[key].tolist()))["shape"])
    return out


def transient_bytes(
    shape: tuple[int, int], precision: str, dtype: torch.dtype, *, rows: int | None = None
) -> int:
    """Memory one dequantization of a packed ``[out, in]`` matrix takes while a forward call
    uses it: a chunk of :data:`CHUNK_ELEMENTS` weights of a large matrix, or ``rows`` rows
    (an embedding's gathered tokens).

    Per weight: int8 is widened to float32 and scaled in place (4 B), then cast to
    ``dtype``; 4-bit is written at ``dtype`` by bitsandbytes, except rows that are not whole
    64-weight blocks, dequantized in plain torch (about 24 B a weight: int64 codes, values,
    padding). A transposed owner (Conv1D) adds a copy."""
    out_f, in_f = shape
    if precision == "int8":
        per = 4 + (dtype.itemsize if dtype != torch.float32 else 0)
    else:
        per = dtype.itemsize + (0 if in_f % 64 == 0 else 24)
    if rows is not None:
        per += 1  # the gathered codes (and absmax) of the rows, copied before dequantizing
    else:
        align = 64 // math.gcd(in_f, 64) if precision != "int8" else 1
        rows = max(align, CHUNK_ELEMENTS // in_f // align * align)
        per += dtype.itemsize  # a transposed copy or the chunk's output slice: bounded by it
    return min(out_f, rows) * in_f * per


def packed_matrices(pool: Any, block_ids: Any) -> list[tuple[tuple[int, int], str, bool]]:
    """``(shape, precision, in an embedding)`` of every packed matrix the blocks
    ``block_ids`` of ``pool`` use (the weights they are tied to included)."""
    blocks = dict.fromkeys(block_ids)
    for bid in list(blocks):
        for ref in pool.blocks[bid].tied.values():
            blocks.setdefault(ref.partition(":")[0])
    out = []
    for bid in blocks:
        entry = pool.blocks[bid]
        if entry.quant:
            embed = entry.kind == "embed"
            for shape in matrices(pool.path(bid), entry.quant).values():
                out.append((shape, entry.quant["precision"], embed))
    return out
