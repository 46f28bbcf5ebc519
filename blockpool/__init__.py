"""blockpool: split pre-trained models into verified safetensors blocks and run them back.

Knows architectures, files, bytes and memory; knows nothing of data sets, federation or
assembly (those live in ``assy``, which depends on this package, never the reverse).
"""

from blockpool.build import build_pool
from blockpool.errors import BlockpoolError
from blockpool.families import REGISTRY, FamilySpec
from blockpool.pool import Pool
from blockpool.runner import BlockRunner, RunOutput

__all__ = [
    "REGISTRY",
    "BlockRunner",
    "BlockpoolError",
    "FamilySpec",
    "Pool",
    "RunOutput",
    "build_pool",
]
