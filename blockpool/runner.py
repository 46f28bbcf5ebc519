"""Run one pool model block by block: the one-model case of :mod:`blockpool.chain`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from blockpool.chain import ChainRunner, RunOutput
from blockpool.pool import Pool

__all__ = ["BlockRunner", "RunOutput"]


class BlockRunner(ChainRunner):
    """One model of a pool, run from its blocks (a chain of that model's blocks).

    Args:
        pool: the open pool.
        model: the model's name in the pool.
        dtype: compute dtype (weights are cast to it at load).
        device: where blocks, positions, masks and caches live.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        fetch: ``block_id -> module``; default: build each block once and keep it.
    """

    def __init__(
        self,
        pool: Pool,
        model: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        fetch: Callable[[str], nn.Module] | None = None,
    ) -> None:
        super().__init__(
            pool,
            pool.model(model).blocks,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            fetch=fetch,
        )
        self.name = model
        self.spec = self.spec_of(self.block_ids[0])
        self.config = self.config_of(self.block_ids[0])
