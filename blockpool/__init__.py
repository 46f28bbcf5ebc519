"""blockpool: split pre-trained models into verified safetensors blocks and run them back.

Knows architectures, files, bytes and memory; knows nothing of data sets, federation or
assembly (those live in ``assy``, which depends on this package, never the reverse).
"""

from blockpool.build import build_pool
from blockpool.chain import (
    BlockCall,
    ChainCache,
    ChainModule,
    ChainRunner,
    RunOutput,
    Seam,
    SeamContext,
    layer_output,
)
from blockpool.errors import BlockpoolError
from blockpool.families import REGISTRY, FamilySpec
from blockpool.pool import Pool
from blockpool.runner import BlockRunner
from blockpool.session import RunOptions, RunSession, open_runner

__all__ = [
    "REGISTRY",
    "BlockCall",
    "BlockRunner",
    "BlockpoolError",
    "ChainCache",
    "ChainModule",
    "ChainRunner",
    "FamilySpec",
    "Pool",
    "RunOptions",
    "RunOutput",
    "RunSession",
    "Seam",
    "SeamContext",
    "build_pool",
    "layer_output",
    "open_runner",
]
