"""Block precisions in bitsandbytes' formats: quantize, dequantize, count bits.

Precisions: ``fp32``, ``bf16``, ``fp16`` (a cast), ``int8`` (row-wise absmax, as
``bnb.functional.int8_vectorwise_quant``), ``nf4`` and ``fp4`` (``int4`` is an alias of
``nf4``): 4-bit blockwise absmax with block size 64 and double-quantized absmax
(``bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True)``, the QLoRA
setting: 4.13 bits per weight instead of 4.5).

What is quantized: every 2-D floating ``*.weight`` whose both dimensions are at least
:data:`MIN_DIM` (projections, MLPs, token and position embeddings, an untied LM head).
Norms, biases and tiny matrices (BERT's 2-row token types) keep the source dtype.

On-disk layout, the one bitsandbytes and transformers use to serialize ``Linear8bitLt``
and ``Linear4bit`` modules, so bitsandbytes can run a stored block directly
(:func:`bnb_linear`):

* int8: ``<mod>.weight`` int8 ``[out, in]`` (CB) and ``<mod>.SCB`` float32 ``[out]``;
* nf4/fp4: ``<mod>.weight`` packed uint8 ``[ceil(n/2), 1]`` plus ``<mod>.weight.absmax``,
  ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and
  ``.quant_state.bitsandbytes__nf4`` (``QuantState.as_dict(packed=True)``).

GPT-2 ``Conv1D`` weights are stored ``[in, out]``; they are transposed to ``[out, in]``
before quantizing (so rows are output features, as for ``nn.Linear``) and transposed back
on dequantization; the names are listed under ``transposed`` in the block's quant info.
The quant info (``{"format", "blocksize", "double_quant", "dtype", "tensors",
"transposed"}``) is kept in the manifest entry (``quant``) and, JSON-encoded, in the
block file's metadata (``quant``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from blockpool.errors import IntegrityError, UsageError

__all__ = [
    "BLOCKSIZE",
    "FLOAT_PRECISIONS",
    "MIN_DIM",
    "PRECISIONS",
    "QUANT_PRECISIONS",
    "bnb_linear",
    "companions",
    "dequantize",
    "dequantize_block",
    "encode_quant",
    "fake_quantize_block",
    "logical_params",
    "normalize_precision",
    "quantize",
    "quantize_block",
]

BLOCKSIZE = 64
MIN_DIM = 16
FLOAT_PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
QUANT_PRECISIONS = ("int8", "nf4", "fp4")
PRECISIONS = (*FLOAT_PRECISIONS, *QUANT_PRECISIONS)
_ALIASES = {"int4": "nf4"}
_DTYPE_NAMES = {v: k for k, v in FLOAT_PRECISIONS.items()}


def normalize_precision(precision: str) -> str:
    """``int4`` -> ``nf4``; any other known precision unchanged.

    Raises:
        UsageError: an unknown precision (the message lists the known ones).
    """
    p = _ALIASES.get(precision.lower(), precision.lower())
    if p not in PRECISIONS:
        raise UsageError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} or int4 (= nf4)"
        )
    return p


# --------------------------------------------------------------------------- one tensor


def quantize(w: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    """Quantize one matrix as the weight of a bitsandbytes module.

    Args:
        w: ``[out, in]`` floating weight (rows are output features).
        precision: ``int8``, ``nf4`` or ``fp4``.

    Returns:
        The module-relative state: ``{"weight": CB int8 [out, in], "SCB": fp32 [out]}``
        (int8) or ``{"weight": uint8 [ceil(out*in/2), 1], "weight.absmax": ..., ...}``
        (4-bit, :meth:`QuantState.as_dict` with ``packed=True``).
    """
    import bitsandbytes.functional as F

    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"quantize needs a 2-D floating matrix, got {w.dtype} {tuple(w.shape)}")
    if precision == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.contiguous(), threshold=0.0)
        return {"weight": cb, "SCB": scb.float()}
    if precision in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(
            w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type=precision
        )
        return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(True).items()}}
    raise ValueError(f"not a quantized precision: {precision!r}")


def dequantize(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` matrix back from a :func:`quantize` state, as ``dtype``.

    The format is read from the keys (``SCB``: int8; ``weight.quant_state.*``: 4-bit).
    """
    import bitsandbytes.functional as F

    if "SCB" in tensors:
        scale = tensors["SCB"].float().unsqueeze(1) / 127.0
        return (tensors["weight"].float() * scale).to(dtype)
    stats = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
    state = F.QuantState.from_dict(stats, device=torch.device("cpu"))
    state.dtype = dtype
    if state.shape[-1] % state.blocksize == 0 or tensors["weight"].device.type != "cpu":
        return F.dequantize_4bit(tensors["weight"], state)
    return _dequantize_4bit_unaligned(tensors["weight"], state)


def _dequantize_4bit_unaligned(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """Blockwise 4-bit dequantization in plain torch.

    bitsandbytes 0.50's CPU kernel (``dequantize_4bit`` on ``cpu``) cuts blocks within
    rows, which is wrong when the last dimension is not a multiple of the block size
    (absmax blocks run over the flattened matrix); only such shapes come here.
    """
    import bitsandbytes.functional as F

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(absmax, state.state2) + state.offset
    n = state.shape.numel()
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n].long()
    values = torch.nn.functional.pad(state.code[codes], (0, (-n) % state.blocksize))
    values = values.view(-1, state.blocksize) * absmax.float().unsqueeze(1)
    return values.reshape(-1)[:n].view(state.shape).to(state.dtype)


# --------------------------------------------------------------------------- names


def _module_of(name: str) -> str:
    return name[: -len("weight")]  # "mlp.up_proj.weight" -> "mlp.up_proj."


def _quantizable(name: str, t: torch.Tensor) -> bool:
    return (
        name.endswith("weight")
        and t.is_floating_point()
        and t.ndim == 2
        and min(t.shape) >= MIN_DIM
    )


def companions(name: str, names: Iterable[str]) -> list[str]:
    """The stored tensors that make up logical tensor ``name``: itself plus its quant state."""
    scb = f"{_module_of(name)}SCB" if name.endswith("weight") else None
    return [n for n in names if n in (name, scb) or n.startswith(f"{name}.")]


# --------------------------------------------------------------------------- one block


def quantize_block(
    state: Mapping[str, torch.Tensor], precision: str, *, conv1d: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A block's tensors at ``precision``.

    Args:
        state: plain (dequantized) tensors by their names in the block module.
        precision: any of :data:`PRECISIONS` (aliases allowed).
        conv1d: name suffixes of weights stored ``[in, out]`` (``FamilySpec.conv1d``).

    Returns:
        ``(stored, quant)``: the tensors to store and the quant info (``None`` for the
        float precisions, which cast every floating tensor).
    """
    precision = normalize_precision(precision)
    if precision in FLOAT_PRECISIONS:
        dtype = FLOAT_PRECISIONS[precision]
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, None
    conv1d = tuple(conv1d)
    stored: dict[str, torch.Tensor] = {}
    tensors, transposed, dtypes = [], [], set()
    for name, t in state.items():
        if not _quantizable(name, t):
            stored[name] = t
            continue
        if name.endswith(conv1d) and conv1d:
            t = t.t()
            transposed.append(name)
        dtypes.add(t.dtype)
        q = quantize(t, precision)
        stored.update({_module_of(name) + k: v for k, v in q.items()})
        tensors.append(name)
    quant = {
        "format": "bitsandbytes",
        "precision": precision,
        "blocksize": BLOCKSIZE if precision != "int8" else None,
        "double_quant": precision != "int8",
        "dtype": _DTYPE_NAMES[max(dtypes, key=lambda d: d.itemsize)] if dtypes else "fp32",
        "tensors": tensors,
        "transposed": transposed,
    }
    return stored, quant


def dequantize_block(
    stored: Mapping[str, torch.Tensor],
    quant: Mapping[str, Any] | None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Plain tensors back from :func:`quantize_block`'s output.

    Args:
        stored: the stored tensors (a subset is fine: a logical tensor is restored when its
            main tensor is present).
        quant: the block's quant info; ``None`` for a float block (returned as is).
        dtype: dtype of the restored matrices (default: the dtype they were quantized from).

    Returns:
        Tensors by their names in the block module; the quantization state is consumed.
    """
    if not quant:
        return dict(stored)
    dtype = dtype or FLOAT_PRECISIONS[quant["dtype"]]
    out = dict(stored)
    for name in quant["tensors"]:
        if name not in stored:
            continue
        prefix = _module_of(name)
        own = {k: out.pop(k) for k in companions(name, list(out))}
        if len(own) < 2:
            raise IntegrityError(
                f"tensor {name} is listed as {quant['precision']} but its quantization state "
                "is missing; the block was written inconsistently, rebuild it"
            )
        matrix = dequantize({k[len(prefix) :]: v for k, v in own.items()}, dtype)
        out[name] = matrix.t().contiguous() if name in quant["transposed"] else matrix
    return out


def fake_quantize_block(
    state: Mapping[str, torch.Tensor], precision: str, *, conv1d: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """``dequantize_block(quantize_block(state))`` in the dtype of ``state``'s matrices."""
    stored, quant = quantize_block(state, precision, conv1d=conv1d)
    if quant is None:
        return {k: v.to(state[k].dtype) for k, v in stored.items()}
    return {k: v.to(state[k].dtype) for k, v in dequantize_block(stored, quant).items()}


def logical_params(stored: Mapping[str, torch.Tensor], quant: Mapping[str, Any] | None) -> int:
    """Number of weights a stored block represents (elements of its plain tensors)."""
    if not quant:
        return sum(t.numel() for t in stored.values())
    import bitsandbytes.functional as F

    total = 0
    restored = set()
    for name in quant["tensors"]:
        prefix = _module_of(name)
        if f"{prefix}SCB" in stored:
            total += stored[name].numel()
            restored |= {name, f"{prefix}SCB"}
        else:
            own = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(f"{name}.")}
            restored |= {name, *(f"{name}.{k}" for k in own)}  # from_dict pops its input
            total += F.QuantState.from_dict(own, device=torch.device("cpu")).shape.numel()
    return total + sum(t.numel() for k, t in stored.items() if k not in restored)


# --------------------------------------------------------------------------- bitsandbytes


def bnb_linear(
    tensors: Mapping[str, torch.Tensor],
    precision: str,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` running a stored quantized matrix.

    Args:
        tensors: the module-relative state from :func:`quantize` (``weight``, ``SCB`` or
            ``weight.*``), as stored.
        precision: ``int8``, ``nf4`` or ``fp4``.
        bias: ``[out]`` bias, if the layer has one.
        compute_dtype: dtype of the 4-bit matmul.

    Returns:
        The bitsandbytes module on the CPU, in eval mode; ``module(x [.., in]) -> [.., out]``.
    """
    import bitsandbytes as bnb

    if precision == "int8":
        out_f, in_f = tensors["weight"].shape
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False)
        cb, scb = tensors["weight"], tensors["SCB"]
        layer.weight = bnb.nn.Int8Params(
            cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb
        )
    else:
        stats = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
        weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, device="cpu")
        out_f, in_f = weight.quant_state.shape
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, quant_type=precision
        )
        layer.weight = weight
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return layer.eval()


def encode_quant(quant: Mapping[str, Any] | None) -> str:
    """The quant info as a JSON string for safetensors metadata (``""`` for none)."""
    return json.dumps(quant, sort_keys=True) if quant else ""
