"""The comparator (AssyLLM Q1): which blocks of different models fit together, forward only.

- :mod:`~assy.comparator.metrics`: unbiased linear CKA (minibatch), KL of value
  histograms, compatibility — pure tensor functions.
- :mod:`~assy.comparator.capture`: pooled hidden states entering and leaving every layer
  block, through the runner's observe hook, cached as safetensors.
- :mod:`~assy.comparator.compare`: the matrices over every pair of layer blocks, the seams.
- :mod:`~assy.comparator.heatmaps`: the heatmap figures (AssyLLM Figure 10).
- :mod:`~assy.comparator.pipeline`: ``assy compare`` end to end.
"""

from assy.comparator.capture import Activations, cached_capture, calibration_texts, capture_model
from assy.comparator.compare import CompareOptions, Comparison, compare_activations, top_seams
from assy.comparator.metrics import compatibility, linear_cka
from assy.comparator.pipeline import compare_pool

__all__ = [
    "Activations",
    "CompareOptions",
    "Comparison",
    "cached_capture",
    "calibration_texts",
    "capture_model",
    "compare_activations",
    "compare_pool",
    "compatibility",
    "linear_cka",
    "top_seams",
]
