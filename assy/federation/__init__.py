"""Federated rounds on Flower (DESIGN.md "Federation", docs/federation.md).

Flower-free: :mod:`~.config` (what a run is), :mod:`~.partition` (Dirichlet splits),
:mod:`~.tiers` (the seed's memory wall), :mod:`~.strategy` (screening, FedAvg/HeteAgg,
votes), :mod:`~.task` (what clients compute), :mod:`~.state` (the server's state on disk),
:mod:`~.memory` (a client's measured need), :mod:`~.plots`. On Flower:
:mod:`~.client_app`, :mod:`~.server_app` (thin adapters), :mod:`~.server` and
:mod:`~.methods` (the rounds), :mod:`~.engine` (simulation and deployment).

The names below load lazily: importing a Flower-free module does not import Flower.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["FederationConfig", "check_run", "run_federation"]

_LAZY = {
    "FederationConfig": "assy.federation.config",
    "check_run": "assy.federation.engine",
    "run_federation": "assy.federation.engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
