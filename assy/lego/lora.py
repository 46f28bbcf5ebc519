"""Sparsity-preserving LoRA (peft) on pruned pool models.

LoRA adds ``ΔW = s · B A`` to a weight (Hu et al. 2021, https://arxiv.org/abs/2106.09685;
``s = alpha / r``). On a pruned weight this update is dense and merging it would undo the
pruning. Here the effective update of every pruned weight is ``(s · B A) ⊙ M``, with ``M``
the weight's non-zero pattern, in training, in the forward pass and in merging; so a
merged model keeps exactly the zeros of the pruned one (LEGO, seed 001, section 3: "The
LoRA adapters preserve model sparsity").

The masking is a peft ``LoraVariant`` installed on the LoRA layers whose base weight has
zeros; dense weights keep vanilla LoRA. Adapters save and load with peft as usual (the
mask is derived from the base weights, never stored). The masked forward materializes
``ΔW`` (``[out, in]``) per call: it costs one dense weight-sized matmul per LoRA layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

from assy.errors import UsageError
from blockpool import ChainModule

__all__ = [
    "MaskedLoraVariant",
    "PoolModule",
    "apply_sparse_lora",
    "load_sparse_lora",
    "mask_lora_layers",
    "masked_delta",
    "write_merged_model",
]

MASK_BUFFER = "lego_mask"


def masked_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The sparsity-preserving LoRA update ``(scaling · B A) ⊙ M``.

    Args:
        lora_a: ``[r, in]``.
        lora_b: ``[out, r]``.
        mask: ``[out, in]`` bool, ``True`` where the base weight is non-zero.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).

    Returns:
        ``[out, in]`` update, exactly zero where ``mask`` is ``False``.
    """
    return (lora_b @ lora_a) * scaling * mask


class MaskedLoraVariant(LoraVariant):
    """peft LoRA variant whose update is masked by the base weight's non-zero pattern.

    The mask is the layer's non-persistent buffer ``lego_mask`` (``[out, in]``), set by
    :func:`mask_lora_layers`.
    """

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to initialize: the mask comes from the base weight."""

    @staticmethod
    def _delta(module: LoraLayer, adapter: str) -> torch.Tensor:
        """The masked update in the base weight's own layout (``[in, out]`` for Conv1D)."""
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        delta = masked_delta(a.float(), b.float(), getattr(module, MASK_BUFFER), 1.0)
        delta = delta * module.scaling[adapter]
        return delta.t() if module.fan_in_fan_out else delta

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor):
        delta = MaskedLoraVariant._delta(module, active_adapter)
        return orig_weight + delta.to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        delta = MaskedLoraVariant._delta(module, active_adapter)
        orig_weight.data += delta.to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor):
        delta = MaskedLoraVariant._delta(module, active_adapter)
        return orig_weight.data - delta.to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        a = module.lora_A[active_adapter].weight
        b = module.lora_B[active_adapter].weight
        delta = masked_delta(a, b, getattr(module, MASK_BUFFER), module.scaling[active_adapter])
        x = module.lora_dropout[active_adapter](x)
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)


def mask_lora_layers(model: nn.Module, adapter_name: str = "default") -> int:
    """Install :class:`MaskedLoraVariant` on every LoRA linear layer over a sparse weight.

    Args:
        model: a peft model (or any module holding peft LoRA layers).
        adapter_name: the adapter to mask.

    Returns:
        The number of LoRA layers masked (their base weight has at least one zero).

    Raises:
        UsageError: a sparse base weight under a LoRA layer kind that cannot be masked
            (embedding, convolution) or under another LoRA variant (DoRA, ...).
    """
    masked = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        weight = module.get_base_layer().weight
        if bool((weight != 0).all()):
            continue  # dense base weight: vanilla LoRA is already exact
        if not isinstance(module, LoraLinear):
            raise UsageError(f"{name}: sparsity-preserving LoRA supports linear layers only")
        current = module.lora_variant.get(adapter_name)
        if current is not None and not isinstance(current, MaskedLoraVariant):
            raise UsageError(f"{name}: cannot mask a {type(current).__name__} adapter")
        mask = weight.detach() != 0
        module.register_buffer(MASK_BUFFER, mask.t() if module.fan_in_fan_out else mask, False)
        module.lora_variant[adapter_name] = MaskedLoraVariant()
        masked += 1
    return masked


def _check_config(config: LoraConfig) -> None:
    unsupported = [flag for flag in ("use_dora", "lora_bias") if getattr(config, flag, False)]
    if unsupported:
        raise UsageError(
            f"sparsity-preserving LoRA does not support {', '.join(unsupported)}; "
            "turn it off in the LoraConfig"
        )


def apply_sparse_lora(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default"
) -> PeftModel:
    """``peft.get_peft_model`` with every update over a pruned weight masked.

    Args:
        model: the (pruned) model, e.g. a :class:`PoolModule` or a transformers model.
        config: the peft ``LoraConfig`` (``use_dora`` and ``lora_bias`` not supported).
        adapter_name: the adapter's name.

    Returns:
        The peft model; ``merge_and_unload()`` keeps the base weights' zeros.
    """
    _check_config(config)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    mask_lora_layers(peft_model, adapter_name)
    return peft_model


def load_sparse_lora(
    model: nn.Module, path: str | Path, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Load a saved adapter (``save_pretrained`` directory) onto a pruned model, masked."""
    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, **kwargs)
    _check_config(peft_model.peft_config[adapter_name])
    mask_lora_layers(peft_model, adapter_name)
    return peft_model


class PoolModule(ChainModule):
    """A pool model as one trainable ``nn.Module``: embed, layers, head built from blocks.

    The one-model case of :class:`blockpool.ChainModule` (the runner is inference only; this
    carries gradients, so peft can wrap it): layer ``i``'s modules are named
    ``layers.<i>.<name inside the block>``.

    Args:
        pool: the open pool.
        model: the model's name.
        dtype: the dtype the blocks are loaded at.
        device: where the blocks live.

    ``forward(input_ids [B, T], attention_mask [B, T] | None)`` returns the head's output
    (logits ``[B, T, V]`` for decoders, pooled ``[B, d]`` for encoders).
    """

    def __init__(
        self, pool, model: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> None:
        from blockpool import BlockRunner

        super().__init__(BlockRunner(pool, model, dtype=dtype, device=device))


def write_merged_model(
    pool,
    model: str,
    module: PoolModule,
    name: str,
    *,
    out: Path | None = None,
    fp32_layers: bool = False,
    wait: bool = False,
) -> dict[str, Any]:
    """Write a (merged, unloaded) :class:`PoolModule` of ``model`` as pool model ``name``.

    Every block records its parent and its sparsity (zeros over its linear weights). The
    name goes through :func:`blockpool.check_model_name` and must be new in the pool; the
    pool is locked while it is written (``wait``: wait for another writer).

    Args:
        out: another pool directory to write to (made if missing; a model ``name`` there
            of the same source blocks is replaced); default: ``pool`` itself.
        fp32_layers: write the layer blocks in float32 (else at their stored precision,
            which rounds an update smaller than an fp16 weight's resolution away).

    Returns:
        The pool manifest, as written.
    """
    from assy.lego.sequential import prunable_linears
    from blockpool import write_variant_model

    def transform(bid: str, tensors: dict[str, torch.Tensor]):
        state = module.block_state(bid)
        layer = pool.blocks[bid].kind == "layer"
        widen = fp32_layers and layer and any(t.is_floating_point() for t in tensors.values())
        dtypes = {k: torch.float32 if widen else t.dtype for k, t in tensors.items()}
        new = {k: state[k].detach().to(dtypes[k]).contiguous() for k in tensors}
        if not layer:
            return new, {}
        linears = prunable_linears(module.layers[module.layer_ids.index(bid)])
        weights = [new[f"{n}.weight"] for n in linears]
        total = sum(w.numel() for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        return new, {"sparsity": zeros / total if total else 0.0} | (
            {"precision": "fp32"} if widen else {}
        )

    return write_variant_model(pool, model, transform, out=out, name=name, wait=wait)
