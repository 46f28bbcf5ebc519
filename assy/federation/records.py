"""Flower record keys and the conversions between tensors, configs and messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from assy.federation.config import FederationConfig

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "NODE_KEYS",
    "ROUND",
    "WARM_UP",
    "arrays_record",
    "config_record",
    "content_bytes",
    "error_reason",
    "payload_bytes",
    "record_tensors",
    "run_settings",
]

CONFIG = "config"
"""ConfigRecord: the run's settings (:meth:`FederationConfig.to_record`) and the round."""
ARRAYS = "arrays"
"""ArrayRecord: an adapter's tensors (down: the global; up: the client's)."""
METRICS = "metrics"
"""MetricRecord: a client's numbers (``num-examples``, losses, times, accuracy)."""
ROUND = "round"
WARM_UP = "warm-up"
"""Discovery's ConfigRecord key: import the training code now (simulation workers persist)."""
NODE_KEYS = ("pool", "data", "client-dir")
"""SuperNode ``--node-config`` keys that override a run setting on that host (paths)."""


def config_record(cfg: FederationConfig, round_: int) -> ConfigRecord:
    """The settings every message carries down: clients need nothing else but data.

    Empty strings (unset options) are left out: they are the defaults, and Flower 1.42
    cannot count the bytes of an empty string value.
    """
    settings = {k: v for k, v in cfg.to_record().items() if v != ""}
    return ConfigRecord({**settings, ROUND: round_})


def run_settings(msg: Message | RecordDict) -> tuple[FederationConfig, int]:
    """``(config, round)`` from a message (or its content) built with :func:`config_record`."""
    record = (msg if isinstance(msg, RecordDict) else msg.content)[CONFIG]
    return FederationConfig.from_record(record), int(record[ROUND])


def arrays_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of CPU tensors (made contiguous), names kept."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_tensors(record: Any) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord (raises ``TypeError``/``ValueError`` if malformed)."""
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected an ArrayRecord, got {type(record).__name__}")
    return dict(record.to_torch_state_dict())


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower counts them (records' data and keys)."""
    return sum(
        _config_bytes(record) if isinstance(record, ConfigRecord) else record.count_bytes()
        for record in content.values()
    )


def _config_bytes(record: ConfigRecord) -> int:
    """``ConfigRecord.count_bytes``'s count (1 per bool, 8 per number, the length of a
    string or bytes, plus the keys), also where Flower 1.42's raises: empty strings and
    empty lists, which SecAgg+'s messages carry (an empty status, no dropped client)."""

    def size(v) -> int:
        if isinstance(v, bool):
            return 1
        return 8 if isinstance(v, int | float) else len(v)

    total = 0
    for key, value in record.items():
        items = value if isinstance(value, list) else [value]
        total += len(key) + sum(size(v) for v in items)
    return total


def error_reason(reply: Message) -> str:
    """The client's own exception message out of Flower's error reason (one line)."""
    reason = reply.error.reason or f"error code {reply.error.code}"
    if "Message:" in reason:
        reason = reason.rsplit("Message:", 1)[1]
    return " ".join(reason.strip(" '>\n").split())[:300]


def payload_bytes(msg: Message) -> int:
    """:func:`content_bytes` of a message (0 for an error reply)."""
    if msg.has_error() or not msg.has_content():
        return 0
    return content_bytes(msg.content)
