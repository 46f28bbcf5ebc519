"""LEGO building blocks (Yu et al., "LEGO: Language Model Building Blocks"; seed 001).

Prune one LLM into sparse small models (magnitude, Wanda, SparseGPT; pool variants),
fine-tune them with sparsity-preserving LoRA, and recombine their adapters with HeteAgg.
"""

from assy.lego.heteagg import fedavg, heteagg, heteagg_exact, heteagg_write_back
from assy.lego.pruning import (
    METHODS,
    SparsityTarget,
    magnitude_mask,
    parse_sparsity,
    sparsegpt_prune,
    wanda_mask,
)
from assy.lego.sequential import PruneReport, prunable_linears, prune_pool_model

__all__ = [
    "METHODS",
    "PruneReport",
    "SparsityTarget",
    "fedavg",
    "heteagg",
    "heteagg_exact",
    "heteagg_write_back",
    "magnitude_mask",
    "parse_sparsity",
    "prunable_linears",
    "prune_pool_model",
    "sparsegpt_prune",
    "wanda_mask",
]
