"""Flower ServerApp: reads the run's settings once and runs :func:`~.server.run_server`.

Deployment: ``assy federate --engine deployment`` submits this app with the settings as
its run config; on the simulation engine :func:`make_server_app` hands them over directly
(Flower's ``run_simulation`` takes no run config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from assy.federation.config import FederationConfig
from assy.federation.quiet import quiet_flower
from assy.federation.server import Log, run_server

__all__ = ["app", "make_server_app"]


def make_server_app(
    cfg: FederationConfig | None = None,
    log: Log = print,
    slots: int | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ServerApp for ``cfg`` (``None``: read it from ``context.run_config``); ``log``,
    ``slots`` and ``on_round`` as for :func:`~.server.run_server`."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_flower()  # a deployment's ServerApp process too: its log is the user's
        settings = cfg or FederationConfig.from_record(context.run_config)
        run_server(grid, settings, log=log, slots=slots, on_round=on_round)

    return server


app = make_server_app(log=lambda line: print(line, flush=True))
