"""Assemblies: blocks of several pool models stitched by elastic adapters into one model.

- :mod:`~assy.assembly.recipe`: what to assemble (anchor, slices, seams), validated once;
  :func:`describe_recipe` puts one on a line.
- :mod:`~assy.assembly.adapter`: the elastic adapter at a seam, saved as safetensors.
- :mod:`~assy.assembly.fit`: closed-form seam maps from sufficient statistics.
- :mod:`~assy.assembly.assemble`: fitting along the assembled chain, in order; writing.
- :mod:`~assy.assembly.train`: the training loop and the adapter objectives.
- :mod:`~assy.assembly.runner`: loading and running an assembly directory.
"""

from assy.assembly.adapter import ElasticAdapter, GatedCrossAttention
from assy.assembly.assemble import FitOptions, fit_assembly, stitch, write_assembly
from assy.assembly.calibration import FitData, load_fit_data
from assy.assembly.recipe import (
    Recipe,
    SeamSpec,
    Slice,
    describe_recipe,
    load_recipe,
    plan_replacements,
)
from assy.assembly.runner import Assembly, describe_assembly, load_assembly, open_assembly

__all__ = [
    "Assembly",
    "ElasticAdapter",
    "FitData",
    "FitOptions",
    "GatedCrossAttention",
    "Recipe",
    "SeamSpec",
    "Slice",
    "describe_assembly",
    "describe_recipe",
    "fit_assembly",
    "load_assembly",
    "load_fit_data",
    "load_recipe",
    "open_assembly",
    "plan_replacements",
    "stitch",
    "write_assembly",
]
