"""Known library noise, filtered by exact match so that anything new still shows.

* Flower logs a deprecation warning for ``run_simulation`` (the in-process entry point
  ``assy federate`` relies on: users never write a Flower ``pyproject.toml``), and logs
  every failed client's traceback; the server reports failed clients itself, one line each.
* Ray warns (FutureWarning) about accelerator variables unless told which behaviour to keep.
* Flower's SecAgg+ workflow (``--secagg``) logs its start, its sampling and its end at
  INFO every round; the round's own line reports the outcome (a halt included). On a
  deployment the workflow runs in the ServerApp's process, whose log ``flwr run`` streams:
  the ServerApp filters it there too.
* transformers 5 warns that the ``past_key_values`` keyword the block runner passes is
  deprecated (the runner's refactor removes it).
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["quiet_flower", "quiet_libraries"]

_FLOWER_DROPPED_FUNCS = {"worker", "process_message"}  # vce_api / RayBackend client errors
_SECAGG_INFO = ("Secure aggregation commencing.", "Secure aggregation completed.",
                "Secure aggregation halted.")  # fmt: skip
_SECAGG_INFO_PREFIXES = ("configure_fit: strategy sampled ", "aggregate_fit: received ")


class _FlowerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "DEPRECATED FEATURE: The `run_simulation` function" in message:
            return False
        if record.levelno >= logging.ERROR and record.funcName in _FLOWER_DROPPED_FUNCS:
            return False  # a client's exception: it comes back as an error reply, reported
        if record.levelno == logging.INFO and (
            message in _SECAGG_INFO or message.startswith(_SECAGG_INFO_PREFIXES)
        ):
            return False  # SecAgg+'s progress per round: the round's line reports it
        return "This is a deprecated feature. It will be removed" not in message


def quiet_libraries() -> None:
    """Drop the known warnings of transformers (idempotent)."""
    warnings.filterwarnings(
        "ignore", message=r"`past_key_values` is deprecated", category=FutureWarning
    )


def quiet_flower() -> None:
    """Environment and log filters for Flower and Ray; call before they start (idempotent)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no call home from offline hosts
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    quiet_libraries()
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, _FlowerNoise) for f in logger.filters):
        logger.addFilter(_FlowerNoise())
