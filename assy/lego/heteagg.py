"""Aggregation of heterogeneous sparse clients: HeteAgg, its exact variant, and FedAvg.

A *state* is a dict of tensors (a LoRA adapter's ``state_dict``, or any model state), or
the path of a safetensors file holding one. Paths are read one client at a time, so the
memory of an aggregation is O(global state + one client), not O(all clients).

References:
    LEGO (seed ``001_*.txt``), Algorithm 2 "Model Heterogeneous Aggregation (HeteAgg)" and
    section 7 (Limitations: aggregating LoRA's A and B separately is not the aggregation of
    the products B·A).
    McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized
    Data (FedAvg), AISTATS 2017; Zhang et al., Towards Building the Federated GPT (FedIT),
    2023.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from assy.errors import UsageError

__all__ = [
    "fedavg",
    "heteagg",
    "heteagg_exact",
    "heteagg_write_back",
    "lora_pairs",
    "svd_refactor",
]

State = Mapping[str, torch.Tensor]
Source = State | str | Path


@contextlib.contextmanager
def _reader(source: Source) -> Iterator[tuple[list[str], Callable[[str], torch.Tensor | None]]]:
    """``(names, get)``: a dict's or a safetensors file's tensor names and a getter that
    returns ``None`` for an absent name."""
    if isinstance(source, Mapping):
        yield list(source), source.get
        return
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"client state {path}: no such file")
    with safe_open(path, "pt") as f:
        names = list(f.keys())
        present = set(names)
        yield names, lambda name: f.get_tensor(name) if name in present else None


def _load_all(source: Source) -> dict[str, torch.Tensor]:
    with _reader(source) as (names, get):
        return {k: get(k) for k in names}


def _fetch(get: Callable, name: str, like: torch.Tensor, client: int) -> torch.Tensor:
    t = get(name)
    if t is None:
        raise UsageError(f"client {client} has no parameter {name!r} of the global state")
    if t.shape != like.shape:
        raise UsageError(
            f"client {client}: {name} has shape {tuple(t.shape)}, the global {tuple(like.shape)}"
        )
    return t


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _emit(
    source: Source, new: dict[str, torch.Tensor], out_dir: Path | None
) -> dict[str, torch.Tensor] | Path:
    """The updated client: a dict for a dict, a safetensors file in ``out_dir`` for a path."""
    if isinstance(source, Mapping):
        return new
    if out_dir is None:
        raise UsageError("clients given as files need out_dir for the updated client files")
    from blockpool import atomic_write_bytes

    target = Path(out_dir) / Path(source).name
    atomic_write_bytes(target, save({k: v.contiguous() for k, v in new.items()}))
    return target


def _check_out_names(clients: Sequence[Source]) -> None:
    names = [Path(c).name for c in clients if not isinstance(c, Mapping)]
    if len(names) != len(set(names)):
        raise UsageError("client files need distinct file names (they are written to out_dir)")


def heteagg(
    global_state: State,
    clients: Sequence[Source],
    *,
    out_dir: Path | None = None,
    write_back: bool = True,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor] | Path]]:
    """HeteAgg, Algorithm 2 of the LEGO paper, on every parameter of ``global_state``.

    Per parameter ``p`` and client ``i``: mask ``M_i = (p_i != 0)``; ``sums += where(M_i,
    p_i, 0)``; ``counts += M_i``; ``p_avg = sums / max(counts, 1)``. The global takes
    ``p_avg`` where some client was non-zero and **keeps its own value where none was**
    (Algorithm 2 as printed would write ``p_avg = 0`` there; the paper's text and Figure 2
    keep the global's value, so does this function). Each client then takes
    ``where(M_i, p_avg, p_i)`` (:func:`heteagg_write_back`): its zeros stay zeros. The
    global's own values do not join the average; to average them in (Figure 2's two-model
    picture), pass the global state as a client too. Parameters a client has beyond the
    global's are left untouched.

    Args:
        global_state: ``name -> tensor``.
        clients: each a dict or a safetensors path with (at least) the global's names and
            shapes. Paths are read one at a time (twice with ``write_back``).
        out_dir: where the updated client files are written (same file names); needed
            when a client is a path and ``write_back``.
        write_back: also return every client's updated state. Without it only the global
            is computed, and each client can apply :func:`heteagg_write_back` itself.

    Returns:
        ``(new_global, new_clients)``: dicts (global's dtypes), and per client a dict or
        the path of its updated file (empty without ``write_back``).

    Raises:
        UsageError: no clients, a missing parameter, or a shape mismatch.
    """
    if not clients:
        raise UsageError("heteagg needs at least one client")
    _check_out_names(clients)
    count_dtype = torch.int16 if len(clients) < 2**15 else torch.int32
    sums = {p: torch.zeros(g.shape, dtype=_acc_dtype(g)) for p, g in global_state.items()}
    counts = {p: torch.zeros(g.shape, dtype=count_dtype) for p, g in global_state.items()}
    for i, client in enumerate(clients):
        with _reader(client) as (_, get):
            for p, g in global_state.items():
                t = _fetch(get, p, g, i)
                sums[p] += t  # == where(M_i, p_i, 0): the masked-out entries are zeros
                counts[p] += t != 0
    new_global = {}
    for p, g in global_state.items():
        count = counts.pop(p)
        avg = sums.pop(p) / count.clamp_min(1)
        new_global[p] = torch.where(count > 0, avg, g.to(avg.dtype)).to(g.dtype)
    if not write_back:
        return new_global, []
    new_clients = [
        _emit(client, heteagg_write_back(_load_all(client), new_global), out_dir)
        for client in clients
    ]
    return new_global, new_clients


def heteagg_write_back(client_state: State, new_global: State) -> dict[str, torch.Tensor]:
    """A client's side of HeteAgg: ``where(p_i != 0, p_global, p_i)`` for every global ``p``.

    Equal to Algorithm 2's ``where(M_i, p_avg, p_i)``, since the new global is ``p_avg``
    wherever any client, this one included, is non-zero. Other entries are copied.
    """
    state = dict(client_state)
    for p, g in new_global.items():
        t = state.get(p)
        if t is None or t.shape != g.shape:
            raise UsageError(f"client state lacks {p!r} {tuple(g.shape)} of the global")
        state[p] = torch.where(t != 0, g.to(t.dtype), t)
    return state


def fedavg(clients: Sequence[Source], weights: Sequence[float] | None = None) -> dict:
    """FedAvg of full states (the FedIT baseline: LoRA adapters of dense models).

    Args:
        clients: dicts or safetensors paths with the same names and shapes (those of the
            first client are used), read one at a time.
        weights: per-client weights (e.g. sample counts); equal when ``None``.

    Returns:
        ``name -> sum_i w_i p_i / sum_i w_i``, in the first client's dtypes.
    """
    if not clients:
        raise UsageError("fedavg needs at least one client")
    weights = [1.0] * len(clients) if weights is None else [float(w) for w in weights]
    if len(weights) != len(clients) or sum(weights) <= 0 or min(weights) < 0:
        raise UsageError("fedavg needs one non-negative weight per client, not all zero")
    total = sum(weights)
    with _reader(clients[0]) as (names, get):
        like = {k: get(k) for k in names}
        dtypes = {k: v.dtype for k, v in like.items()}
        sums = {k: torch.zeros(v.shape, dtype=_acc_dtype(v)) for k, v in like.items()}
        del like
    for i, (client, w) in enumerate(zip(clients, weights, strict=True)):
        with _reader(client) as (_, get):
            for name, acc in sums.items():
                acc += _fetch(get, name, acc, i).to(acc.dtype) * (w / total)
    return {k: v.to(dtypes[k]) for k, v in sums.items()}


_LORA_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<ab>[AB])(?P<adapter>\.[^.]+)?\.weight$")


def lora_pairs(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> ``(lora_A key, lora_B key)`` in a peft LoRA state dict.

    Accepts saved-adapter keys (``q_proj.lora_A.weight``) and live ones
    (``q_proj.lora_A.default.weight``).

    Raises:
        UsageError: an A without its B or the reverse.
    """
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in names:
        m = _LORA_KEY.match(name)
        if m:
            found.setdefault((m["prefix"], m["adapter"] or ""), {})[m["ab"]] = name
    pairs = {}
    for (prefix, adapter), ab in found.items():
        if set(ab) != {"A", "B"}:
            raise UsageError(f"LoRA module {prefix}{adapter} lacks lora_{'AB'[('A' in ab)]}")
        pairs[prefix + adapter] = (ab["A"], ab["B"])
    return pairs


def svd_refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta [out, in]`` (Eckart–Young), split evenly.

    Returns:
        ``(B [out, rank], A [rank, in])`` with ``B @ A`` the truncated SVD of ``delta``:
        ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``.
    """
    return _truncate(torch.linalg.svd(delta.float(), full_matrices=False), rank)


def _truncate(usv: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = usv
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = u[:, :r] * root.unsqueeze(0)
    a = root.unsqueeze(1) * vh[:r]
    if r < rank:  # keep the requested shapes; the missing directions are zero
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
    return b, a


def _masked_product_sums(
    pairs: dict[str, tuple[str, str]],
    global_state: State,
    clients: Sequence[Source],
    masks: Sequence[Mapping[str, torch.Tensor] | None] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per module: ``sum_i (B_i A_i) ⊙ M_i`` and ``sum_i M_i``, one client at a time."""
    count_dtype = torch.int16 if len(clients) < 2**15 else torch.int32
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for i, client in enumerate(clients):
        client_masks = (masks[i] if masks is not None else None) or {}
        with _reader(client) as (_, get):
            for prefix, (ka, kb) in pairs.items():
                a, b = get(ka), get(kb)
                if a is None or b is None:
                    raise UsageError(f"client {i} has no LoRA factors for {prefix}")
                delta = b.float() @ a.float()
                mask = client_masks.get(prefix)
                mask = delta != 0 if mask is None else mask.to(torch.bool)
                if mask.shape != delta.shape:
                    raise UsageError(
                        f"client {i}: mask of {prefix} is {tuple(mask.shape)}, B·A is "
                        f"{tuple(delta.shape)}"
                    )
                if prefix not in sums:
                    sums[prefix] = torch.zeros_like(delta)
                    counts[prefix] = torch.zeros(delta.shape, dtype=count_dtype)
                sums[prefix].add_(delta.mul_(mask))  # (B A) ⊙ M
                counts[prefix].add_(mask)
    return sums, counts


def heteagg_exact(
    global_state: State,
    clients: Sequence[Source],
    masks: Sequence[Mapping[str, torch.Tensor] | None] | None = None,
    *,
    out_dir: Path | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor] | Path]]:
    """HeteAgg on the masked products ``(B_i A_i) ⊙ M_i`` instead of on A and B apart.

    The LEGO paper's own limitation (section 7): ``ΣA × ΣB ≠ Σ(A × B)``. Here, per LoRA
    module, the count-normalized average ``Δ = Σ_i (B_i A_i) ⊙ M_i / max(Σ_i M_i, 1)`` is
    formed (the global's ``B_g A_g`` where no client counts), then re-factored by truncated
    SVD to the global's rank for the global and to each client's own rank for each client
    (whose mask keeps applying in its forward pass). When ``Δ`` has rank at most r, the
    re-factored ``B' A'`` equals it exactly. The cost is one dense ``[out, in]`` sum per
    module, as large as the base weights; the LoRA scaling (alpha / r) is assumed equal
    across clients and the global, so it cancels.

    Args:
        global_state: a peft LoRA state (``*.lora_A.weight`` ``[r, in]``,
            ``*.lora_B.weight`` ``[out, r]``); other entries are copied unchanged.
        clients: LoRA states (dicts or safetensors paths) with the same modules.
        masks: per client, ``module prefix -> [out, in]`` bool mask of its pruned weight
            (``None`` or a missing prefix: the client counts where its ``B A`` is non-zero).
        out_dir: where updated client files go, for clients given as paths.

    Returns:
        ``(new_global, new_clients)`` as for :func:`heteagg`.
    """
    if not clients:
        raise UsageError("heteagg_exact needs at least one client")
    if masks is not None and len(masks) != len(clients):
        raise UsageError(f"got {len(masks)} masks for {len(clients)} clients")
    _check_out_names(clients)
    pairs = lora_pairs(list(global_state))
    if not pairs:
        raise UsageError("the global state holds no LoRA factors (*.lora_A/lora_B.weight)")
    sums, counts = _masked_product_sums(pairs, global_state, clients, masks)
    svds = {}  # one SVD per module, truncated to each rank asked for
    new_global = dict(global_state)
    for prefix, (ka, kb) in pairs.items():
        a_g, b_g = global_state[ka], global_state[kb]
        count = counts.pop(prefix)
        avg = torch.where(
            count > 0, sums.pop(prefix) / count.clamp_min(1), b_g.float() @ a_g.float()
        )
        svds[prefix] = torch.linalg.svd(avg, full_matrices=False)
        b, a = _truncate(svds[prefix], a_g.shape[0])
        new_global[ka], new_global[kb] = a.to(a_g.dtype), b.to(b_g.dtype)
    new_clients = []
    for client in clients:
        state = _load_all(client)
        for prefix, (ka, kb) in pairs.items():
            b, a = _truncate(svds[prefix], state[ka].shape[0])
            state[ka], state[kb] = a.to(state[ka].dtype), b.to(state[kb].dtype)
        new_clients.append(_emit(client, state, out_dir))
    return new_global, new_clients
