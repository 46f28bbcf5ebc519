"""Known library noise, filtered by exact match so that anything new still shows.

* bitsandbytes (0.50) logs a warning on every CPU with AVX512-BF16 when its CPU backend
  loads (any quantization, and any ``import peft``): it tries to fetch an optional
  4-bit kernel from a model hub with the ``kernels`` package and says it could not. The
  built-in CPU path it falls back to is the one this package uses and tests; there is
  nothing for a user to do (hubs are never reached at run time here).

The filter is installed when ``blockpool`` is imported, before bitsandbytes loads; it
drops that one message only.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_bitsandbytes"]

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_HUB = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _KernelHubNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNEL_HUB)


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' optional-kernel warning (idempotent)."""
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _KernelHubNoise) for f in logger.filters):
        logger.addFilter(_KernelHubNoise())
