"""blockpool: split pre-trained models into verified safetensors blocks and run them back.

Knows architectures, files, bytes and memory; knows nothing of data sets, federation or
assembly (those live in ``assy``, which depends on this package, never the reverse).
"""

from __future__ import annotations

import importlib
from typing import Any

from blockpool.noise import quiet_bitsandbytes

quiet_bitsandbytes()  # before bitsandbytes loads (see blockpool.noise)

_EXPORTS = {
    "add_quantized_variant": "blockpool.quant.write",
    "arg": "blockpool.errors",
    "atomic_write_bytes": "blockpool.storage",
    "BlockCall": "blockpool.chain",
    "block_nbytes": "blockpool.offload",
    "min_budget": "blockpool.offload",
    "missing_quantized_variants": "blockpool.quant.write",
    "BlockEntry": "blockpool.entries",
    "BlockpoolError": "blockpool.errors",
    "BlockRunner": "blockpool.runner",
    "build_pool": "blockpool.build",
    "cache_dir": "blockpool.sources",
    "ChainCache": "blockpool.chain",
    "budget_allowance": "blockpool.sizes",
    "chain_nbytes": "blockpool.offload",
    "ChainModule": "blockpool.chain",
    "ChainRunner": "blockpool.chain",
    "check_model_name": "blockpool.names",
    "check_precision_choices": "blockpool.quant.plan",
    "check_variant_target": "blockpool.variants",
    "DEFAULT_POLICY": "blockpool.swapper",
    "FamilySpec": "blockpool.families",
    "format_size": "blockpool.sizes",
    "IntegrityError": "blockpool.errors",
    "layer_output": "blockpool.chain",
    "ModelEntry": "blockpool.entries",
    "normalize_precision": "blockpool.quant.formats",
    "open_runner": "blockpool.session",
    "parse_device": "blockpool.session",
    "parse_size": "blockpool.sizes",
    "peak_rss_bytes": "blockpool.session",
    "plan_precisions": "blockpool.quant.plan",
    "POLICIES": "blockpool.swapper",
    "Pool": "blockpool.pool",
    "pool_lock": "blockpool.lock",
    "PoolBusy": "blockpool.errors",
    "PoolWriteError": "blockpool.errors",
    "quantize_pool": "blockpool.quant.write",
    "REGISTRY": "blockpool.families",
    "rehash_pool": "blockpool.pool",
    "RunOptions": "blockpool.session",
    "RunOutput": "blockpool.chain",
    "RunSession": "blockpool.session",
    "Seam": "blockpool.chain",
    "SeamContext": "blockpool.chain",
    "summarize": "blockpool.pool",
    "UsageError": "blockpool.errors",
    "use_threads": "blockpool.session",
    "write_variant_model": "blockpool.variants",
}

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "REGISTRY",
    "BlockCall",
    "BlockEntry",
    "BlockRunner",
    "BlockpoolError",
    "ChainCache",
    "ChainModule",
    "ChainRunner",
    "FamilySpec",
    "IntegrityError",
    "ModelEntry",
    "Pool",
    "PoolBusy",
    "PoolWriteError",
    "RunOptions",
    "RunOutput",
    "RunSession",
    "Seam",
    "SeamContext",
    "UsageError",
    "add_quantized_variant",
    "missing_quantized_variants",
    "arg",
    "atomic_write_bytes",
    "block_nbytes",
    "budget_allowance",
    "min_budget",
    "build_pool",
    "chain_nbytes",
    "cache_dir",
    "check_model_name",
    "check_precision_choices",
    "check_variant_target",
    "format_size",
    "layer_output",
    "normalize_precision",
    "open_runner",
    "parse_device",
    "parse_size",
    "peak_rss_bytes",
    "plan_precisions",
    "pool_lock",
    "quantize_pool",
    "rehash_pool",
    "summarize",
    "use_threads",
    "write_variant_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blockpool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
