"""``--secagg``: Flower's SecAgg+ for adapter rounds, on both sides of the wire.

The server runs Flower's own :class:`~flwr.server.workflow.SecAggPlusWorkflow` (four
message exchanges: setup, share keys, collect masked vectors, unmask) once per group of
clients that train the same adapter; the workflow is bound to Flower's legacy strategy
API, so :class:`AdapterStrategy` is a small legacy ``Strategy`` that hands it the
sampled clients' ``FitIns`` (the global adapter as ``Parameters``, flattened in a fixed
key order, and the run's settings) and, in ``aggregate_fit``, keeps the unmasked
*weighted average* that the workflow computed. The server never sees one client's
adapter: only the masked vectors and their sum.

The client side is :func:`secagg_mod` (Flower's ``secaggplus_mod``, applied only to
messages of the SecAgg+ protocol, so that plain rounds pass through) and
:func:`train_fitins`, which turns the ``FitIns``-shaped content into the plain round's
content, trains exactly as a plain round does, and answers ``FitRes``-shaped content.

SecAgg+ quantizes: each client clips ``(n_i / max_weight) · value`` to
``±clipping_range`` and rounds it stochastically to ``quantization_range`` levels. The
server sets ``max_weight`` to the largest example count of the round's clients (so every
weight is at most 1) and ``clipping_range`` to a power of two at least twice the largest
absolute value of the global adapter (:func:`clipping_range`); a client whose trained
adapter holds a value beyond it (or a NaN/inf, which quantization would turn into a
finite integer) fails its round with that reason instead of being clipped in silence. The averaged value's error is then at most
``k · (2 · clipping_range / quantization_range) · max_weight / Σ n_i`` for ``k`` clients
(:func:`quantization_bound`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from assy.federation.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    arrays_record,
    content_bytes,
    error_reason,
)

__all__ = [
    "QUANTIZATION_RANGE",
    "GroupOutcome",
    "SecureGroup",
    "clipping_range",
    "quantization_bound",
    "run_group",
    "secagg_mod",
    "train_fitins",
]

QUANTIZATION_RANGE = 2**22
"""Levels a clipped value is quantized to (Flower's default; with the 2**32 modulus the
sum of up to 1,023 clients cannot wrap around)."""
IN_KEYS, OUT_KEYS, CLIP = "secagg-in", "secagg-out", "secagg-clip"
"""FitIns config keys: the names of the arrays sent and of those to upload (JSON lists,
in the order of ``Parameters``), and the round's clipping range."""
FITINS_CONFIG = "fitins.config"
STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


def clipping_range(state: Mapping[str, torch.Tensor]) -> float:
    """The smallest power of two ≥ max(1, 2 · max |value| of ``state``)."""
    peak = max((float(t.abs().max()) for t in state.values() if t.numel()), default=0.0)
    return float(2.0 ** math.ceil(math.log2(max(1.0, 2.0 * peak))))


def quantization_bound(clip: float, counts: Sequence[int], levels: int = QUANTIZATION_RANGE):
    """The largest error SecAgg+'s quantization can add to one averaged value: each of the
    ``len(counts)`` clients rounds its weighted value by less than one level
    (``2 · clip / levels``), and the sum is divided by the total weight
    ``Σ n_i / max_weight`` (``max_weight = max(counts)``)."""
    step = 2.0 * clip / levels
    return len(counts) * step * max(counts) / sum(counts)


# --------------------------------------------------------------------------- server


@dataclass
class SecureGroup:
    """Clients that train the same adapter in a round: one SecAgg+ session.

    Attributes:
        name: the group (``fedit``: the anchor; ``assy``: the recipe key).
        clients: their partition ids (at least 2).
        content: what each of them receives (the plain round's ``RecordDict``).
        like: the global values of the tensors they upload (names, shapes, dtypes).
    """

    name: str
    clients: list[int]
    content: RecordDict
    like: dict[str, torch.Tensor]


@dataclass
class GroupOutcome:
    """What a SecAgg+ session gave: the average (``None`` if it halted) and its cost."""

    average: dict[str, torch.Tensor] | None
    summed: list[int] = field(default_factory=list)  # clients whose masked vectors were summed
    failed: list[dict[str, Any]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    bytes_down: list[int] = field(default_factory=list)  # per stage
    bytes_up: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    pending: dict[int, str] = field(default_factory=dict)  # late replies' message ids
    settings: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


class _CountingGrid:
    """The server's grid, counting each SecAgg+ exchange's messages, bytes and seconds."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.exchanges: list[tuple[list[Message], list[Message], float]] = []

    def send_and_receive(self, messages, *, timeout=None):
        import time

        messages = list(messages)
        start = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.exchanges.append((messages, replies, time.perf_counter() - start))
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


class AdapterStrategy(Strategy):
    """The legacy strategy SecAgg+ needs: ``configure_fit`` returns the group's FitIns,
    ``aggregate_fit`` keeps the unmasked weighted average (every ``FitRes`` carries it)."""

    def __init__(self, proxies: list[ClientProxy], fitins: FitIns) -> None:
        self.proxies, self.fitins = proxies, fitins
        self.average: list[np.ndarray] | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}  # the caller checks the average before it is applied

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _flat(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> list[np.ndarray]:
    return [state[k].detach().cpu().float().contiguous().numpy() for k in keys]


def _fitins(content: RecordDict, out_keys: Sequence[str], clip: float) -> FitIns:
    """The plain round's content as FitIns: arrays in sorted name order, names in the config."""
    sent = dict(content[ARRAYS].to_torch_state_dict()) if ARRAYS in content else {}
    in_keys = sorted(sent)
    config = dict(content[CONFIG])
    config |= {IN_KEYS: json.dumps(in_keys), OUT_KEYS: json.dumps(list(out_keys)), CLIP: clip}
    return FitIns(ndarrays_to_parameters(_flat(sent, in_keys)), config)


def _unflatten(
    arrays: Sequence[np.ndarray], like: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The average back into named tensors, or why it cannot be applied (shape, finite)."""
    keys = sorted(like)
    if len(arrays) != len(keys):
        return None, f"the aggregate holds {len(arrays)} arrays, the adapter {len(keys)}"
    state = {}
    for key, array in zip(keys, arrays, strict=True):
        if tuple(array.shape) != tuple(like[key].shape):
            return (
                None,
                f"the aggregate's {key} is {tuple(array.shape)}, not {tuple(like[key].shape)}",
            )
        if not np.isfinite(array).all():
            return None, f"the aggregate's {key} holds non-finite values"
        state[key] = torch.from_numpy(np.asarray(array)).to(like[key].dtype)
    return state, None


def run_group(
    grid,
    group: SecureGroup,
    node_of: Mapping[int, int],
    sizes: Sequence[int],
    round_: int,
    timeout: float | None,
) -> GroupOutcome:
    """One SecAgg+ session of Flower's workflow over ``group``; the average is checked
    (names, shapes, finite) but not applied."""
    partition_of = {node_of[p]: p for p in group.clients}
    keys = sorted(group.like)
    clip = clipping_range(group.like)
    max_weight = float(max(sizes[p] for p in group.clients))
    n = len(group.clients)
    threshold = max(2, n // 2 + 1)  # a majority of the group must answer to unmask
    settings = {
        "clients": n, "num_shares": n, "reconstruction_threshold": threshold,
        "clipping_range": clip, "quantization_range": QUANTIZATION_RANGE,
        "max_weight": max_weight,
    }  # fmt: skip
    counting = _CountingGrid(grid)
    proxies = [GridClientProxy(node_of[p], grid, 0) for p in group.clients]
    strategy = AdapterStrategy(proxies, _fitins(group.content, keys, clip))
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=strategy)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    context.state[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        strategy.fitins.parameters, keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every client of the group shares its keys with every other
        reconstruction_threshold=threshold,
        max_weight=max_weight,
        clipping_range=clip,
        quantization_range=QUANTIZATION_RANGE,
        timeout=timeout,
    )
    workflow(counting, context)
    outcome = GroupOutcome(None, settings=settings)
    answered: set[int] = set()
    failed: dict[int, str] = {}
    for sent, replies, seconds in counting.exchanges:
        outcome.bytes_down.append(sum(content_bytes(m.content) for m in sent))
        outcome.bytes_up.append(
            sum(content_bytes(r.content) for r in replies if not r.has_error() and r.has_content())
        )
        outcome.seconds.append(seconds)
        by_node = {r.metadata.src_node_id: r for r in replies}
        for msg in sent:
            p = partition_of[msg.metadata.dst_node_id]
            reply = by_node.get(msg.metadata.dst_node_id)
            if reply is None:
                outcome.pending[p] = msg.metadata.message_id
            elif reply.has_error():
                failed.setdefault(p, error_reason(reply))
            elif "fitres.metrics" in reply.content:  # stage 2: the masked vector
                answered.add(p)
                outcome.metrics[p] = {
                    k: float(v)
                    for k, v in reply.content["fitres.metrics"].items()
                    if isinstance(v, int | float)
                }
    outcome.failed = [{"client": p, "reason": r} for p, r in sorted(failed.items())]
    outcome.missing = sorted(outcome.pending)
    if strategy.average is None:
        outcome.problem = (
            f"SecAgg+ halted: fewer than {threshold} of the group's {n} clients answered "
            "every stage; the global is unchanged"
        )
        return outcome
    outcome.summed = sorted(partition_of[proxy.node_id] for proxy, _ in strategy.results)
    outcome.average, outcome.problem = _unflatten(strategy.average, group.like)
    return outcome


# --------------------------------------------------------------------------- client


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the SecAgg+ protocol's messages; every other
    message (discovery, plain rounds) passes through untouched."""
    from flwr.client.mod import secaggplus_mod

    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_fitins(msg: Message) -> bool:
    """Whether ``msg`` is SecAgg+'s FitIns-shaped training message."""
    return FITINS_CONFIG in msg.content


def train_fitins(msg: Message, context: Context, train) -> Message:
    """Train on a FitIns-shaped message with ``train`` (the plain round's work:
    ``(content, context) -> content``) and answer FitRes-shaped content: the uploaded
    tensors in the order the server named."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    in_keys = json.loads(str(fitins.config[IN_KEYS]))
    out_keys = json.loads(str(fitins.config[OUT_KEYS]))
    clip = float(fitins.config[CLIP])
    arrays = parameters_to_ndarrays(fitins.parameters)
    plain = RecordDict({CONFIG: ConfigRecord(dict(fitins.config))})
    if in_keys:
        sent = {k: torch.from_numpy(a.copy()) for k, a in zip(in_keys, arrays, strict=True)}
        plain[ARRAYS] = arrays_record(sent)
    reply = train(plain, context)
    state = dict(reply[ARRAYS].to_torch_state_dict())
    if sorted(state) != out_keys:
        raise ValueError(f"trained {len(state)} tensors, the server expects {len(out_keys)}")
    bad = sum(int((~torch.isfinite(t)).sum()) for t in state.values())
    if bad:  # quantized, a NaN turns into a finite integer nobody could tell from a value
        raise ValueError(f"non-finite: {bad} NaN/inf value(s) in the trained adapter; not sent")
    peak = max((float(t.abs().max()) for t in state.values() if t.numel()), default=0.0)
    if peak > clip:
        raise ValueError(
            f"an adapter value {peak:.4g} lies beyond SecAgg+'s clipping range ±{clip:g}: "
            "not sent, rather than clipped"
        )
    metrics = dict(reply[METRICS])
    fitres = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(_flat(state, out_keys)),
        int(metrics["num-examples"]),
        metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
