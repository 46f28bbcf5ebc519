"""Quantization: formats, quantized pool variants, sensitivity, mixed-precision plans.

- :mod:`~blockpool.quant.formats`: fp32/bf16/fp16, int8 (row-wise absmax) and nf4/fp4
  (block size 64) in bitsandbytes' serialized layout; quantize and dequantize tensors.
- :mod:`~blockpool.quant.write`: write the quantized variant of a pool's models.
- :mod:`~blockpool.quant.sensitivity`: per-block activation sensitivity on calibration
  windows, forward only.
- :mod:`~blockpool.quant.plan`: the mixed-precision plan (weight-statistics filter, then
  a knapsack over measured sensitivities within a byte budget or a bits target).
"""
