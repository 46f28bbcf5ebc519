"""The elastic adapter: the module at a seam, saved as its own safetensors file.

An :class:`ElasticAdapter` maps the hidden stream leaving one slice ``[B, T, d_src]`` into
the space the next slice expects ``[B, T, d_dst]``:

1. a projection: ``affine`` (``W (x / s) + b``, ``W: [d_dst, d_src]``, ``s`` the fitted
   per-dimension scale of the input), ``diagonal`` (a scale and shift per dimension) or
   ``identity``; fitted in closed form (:mod:`assy.assembly.fit`);
2. an optional gated cross-attention sublayer in the destination space (query from the
   projected stream, key and value from the source stream, causal), added as
   ``tanh(gate) * attention`` with ``gate = 0`` at initialization: it starts as the plain
   projection and learns to re-match what the projection misses;
3. interface fixes that the fit sets: destination dimensions holding massive activations
   (near-constant biases a few hundred times the median) can be held at their mean, and
   position 0 (the attention sink, input-independent under causal attention) gets the
   destination model's own first-position state instead of a mapped one.

Positions (rotary or absolute) and masks are the chain runner's business: every slice runs
with its own family's positions and every block of a causal chain causally
(:mod:`blockpool.chain`). The adapter never changes a block's weights (it sits between
blocks), and its state is its own file, stamped with the recipe it was fitted for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from assy.errors import UsageError
from blockpool import Seam, SeamContext, atomic_write_bytes

__all__ = [
    "ADAPTER_FORMAT",
    "ElasticAdapter",
    "GatedCrossAttention",
    "load_adapter",
    "save_adapter",
]

ADAPTER_FORMAT = "assy-adapter/1"


class GatedCrossAttention(nn.Module):
    """Causal multi-head attention, query from ``y [B, T, d_q]``, key/value from
    ``x [B, T, d_kv]``, output ``tanh(gate) * o(attention)`` (zero while ``gate == 0``).

    During token-by-token generation it keeps its keys and values in the seam's
    ``context.state`` (``k``, ``v``: ``[B, heads, past + T, dim / heads]``).
    """

    def __init__(self, d_q: int, d_kv: int, heads: int = 4, dim: int = 128) -> None:
        super().__init__()
        if dim % heads:
            raise UsageError(f"cross-attention dim {dim} is not a multiple of {heads} heads")
        self.heads = heads
        self.norm_q = nn.LayerNorm(d_q)
        self.norm_kv = nn.LayerNorm(d_kv)
        self.q = nn.Linear(d_q, dim, bias=False)
        self.k = nn.Linear(d_kv, dim, bias=False)
        self.v = nn.Linear(d_kv, dim, bias=False)
        self.o = nn.Linear(dim, d_q, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self, y: torch.Tensor, x: torch.Tensor, context: SeamContext | None = None
    ) -> torch.Tensor:
        q = self._split(self.q(self.norm_q(y)))
        k = self._split(self.k(self.norm_kv(x)))
        v = self._split(self.v(self.norm_kv(x)))
        past = context.past_length if context is not None else 0
        state = context.state if context is not None else {}
        if past:
            if "k" not in state:
                raise UsageError("cross-attention seam: a cached call without its cached keys")
            k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
        state["k"], state["v"] = k.detach(), v.detach()
        t, s = q.shape[2], k.shape[2]
        # causal; a query always sees itself, so a row of padding never attends to nothing
        mask = torch.ones(t, s, dtype=torch.bool, device=y.device).tril(s - t)
        if context is not None and context.attention_mask is not None:
            itself = torch.zeros(t, s, dtype=torch.bool, device=y.device)
            itself[torch.arange(t), torch.arange(s - t, s)] = True
            keys = context.attention_mask[:, -s:].to(y.device).bool()[:, None, None, :]
            mask = mask & (keys | itself)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(y.shape[0], t, -1)
        return torch.tanh(self.gate) * self.o(out)


class ElasticAdapter(Seam):
    """Projection + optional gated cross-attention + held dimensions + position-0 state.

    Args:
        d_in: width of the stream entering the seam.
        d_out: width the next slice expects.
        kind: ``affine``, ``diagonal`` (needs ``d_in == d_out``) or ``identity``.
        cross_attention: ``(heads, dim)`` of a :class:`GatedCrossAttention`, or ``None``.

    ``forward(hidden [B, T, d_in], context) -> [B, T, d_out]``, computed in the adapter's
    dtype and returned in the input's. Buffers ``held`` / ``held_value`` (``[d_out]``) and
    ``sink`` / ``use_sink`` are set by the fit; an unfitted adapter is the identity (or
    the leading-block identity when widths differ).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        kind: str = "affine",
        cross_attention: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("affine", "diagonal", "identity"):
            raise UsageError(f"unknown adapter kind {kind!r}")
        if kind != "affine" and d_in != d_out:
            raise UsageError(f"a {kind} adapter needs equal widths, got {d_in} -> {d_out}")
        self.d_in, self.d_out, self.kind = d_in, d_out, kind
        if kind == "affine":
            self.weight = nn.Parameter(torch.eye(d_out, d_in))
            self.bias = nn.Parameter(torch.zeros(d_out))
        elif kind == "diagonal":
            self.scale = nn.Parameter(torch.ones(d_out))
            self.bias = nn.Parameter(torch.zeros(d_out))
        self.cross_attention = (
            GatedCrossAttention(d_out, d_in, *cross_attention) if cross_attention else None
        )
        self.xattn_shape = cross_attention
        # the projection acts on x / in_scale (per-dimension input scale from the fit), so
        # a training step moves every weight's effect on the output alike
        self.register_buffer("in_scale", torch.ones(d_in))
        self.register_buffer("held", torch.zeros(d_out, dtype=torch.bool))
        self.register_buffer("held_value", torch.zeros(d_out))
        self.register_buffer("sink", torch.zeros(d_out))
        self.register_buffer("use_sink", torch.zeros((), dtype=torch.bool))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The projection alone, ``[..., d_in] -> [..., d_out]``."""
        if self.kind == "affine":
            return F.linear(x / self.in_scale, self.weight, self.bias)
        if self.kind == "diagonal":
            return x / self.in_scale * self.scale + self.bias
        return x

    def forward(self, hidden: torch.Tensor, context: SeamContext | None = None) -> torch.Tensor:
        dtype = self.held_value.dtype
        x = hidden.to(dtype)
        y = self.project(x)
        if self.cross_attention is not None:
            y = y + self.cross_attention(y, x, context)
        y = torch.where(self.held, self.held_value, y)
        if bool(self.use_sink):
            if context is not None:
                first = context.position_ids[0].to(y.device) == 0
            else:
                first = torch.arange(y.shape[1], device=y.device) == 0
            y = torch.where(first[None, :, None], self.sink, y)
        return y.to(hidden.dtype)

    def trainable_parameters(self) -> int:
        """Parameters a training objective updates (buffers excluded)."""
        return sum(p.numel() for p in self.parameters())


def _describe(xattn: tuple[int, int] | None) -> str:
    return "" if xattn is None else f"{xattn[0]},{xattn[1]}"


def save_adapter(adapter: ElasticAdapter, path: Path, *, fingerprint: str, before: int) -> str:
    """Write ``adapter`` to ``path`` (atomically) stamped with the recipe's fingerprint.

    Returns:
        The file's sha256.
    """
    state = {
        k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
        for k, v in adapter.state_dict().items()
    }
    meta = {
        "format": ADAPTER_FORMAT,
        "kind": adapter.kind,
        "d_in": str(adapter.d_in),
        "d_out": str(adapter.d_out),
        "cross_attention": _describe(adapter.xattn_shape),
        "recipe": fingerprint,
        "before": str(before),
    }
    data = st_save(state, metadata=meta)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_adapter(
    path: Path,
    *,
    sha256: str,
    kind: str,
    d_in: int,
    d_out: int,
    cross_attention: tuple[int, int] | None,
    fingerprint: str,
    before: int,
    name: str,
) -> ElasticAdapter:
    """Read an adapter file, checking its sum, its recipe stamp and its shapes.

    Args:
        path: the file.
        sha256: the sum the recipe pins.
        kind, d_in, d_out, cross_attention, before: what the recipe expects at this seam.
        fingerprint: the recipe's :meth:`~assy.assembly.recipe.Recipe.fingerprint`.
        name: how messages name the file (its path inside the assembly).

    Raises:
        UsageError: missing file, sum mismatch (corrupted, resized or replaced), an adapter
            fitted for another recipe or seam, or tensors of the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{name}: adapter file missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UsageError(
            f"{name}: sha256 mismatch (adapter file corrupted, resized or replaced); "
            "re-stitch the assembly"
        )
    try:
        state = st_load(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise UsageError(f"{name}: not a safetensors adapter file ({e})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise UsageError(f"{name}: not an assy adapter (format {meta.get('format')!r})")
    if meta.get("recipe") != fingerprint or meta.get("before") != str(before):
        raise UsageError(
            f"{name}: this adapter was fitted for another recipe or seam (stamp "
            f"{meta.get('recipe', '?')[:12]} before {meta.get('before')}, this recipe "
            f"{fingerprint[:12]} before {before}); re-stitch instead of copying adapters"
        )
    expected = (kind, str(d_in), str(d_out), _describe(cross_attention))
    found = (meta.get("kind"), meta.get("d_in"), meta.get("d_out"), meta.get("cross_attention"))
    if found != expected:
        raise UsageError(f"{name}: adapter is {found}, the recipe expects {expected}")
    adapter = ElasticAdapter(d_in, d_out, kind, cross_attention)
    try:
        adapter.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UsageError(
            f"{name}: tensors do not fit the adapter ({str(e).splitlines()[-1]})"
        ) from None
    return adapter.eval()


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (its JSON header)."""
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8:
        raise ValueError("bad header length")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
