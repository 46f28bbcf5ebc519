"""Run a pool model block by block.

The runner owns what transformers' top-level model classes do between layers: position
ids, the rotary position embeddings, the attention masks (causal, sliding-window or
bidirectional, as the config's attention implementation wants them) and the KV cache. The
blocks themselves come from a ``fetch(block_id) -> nn.Module`` callable, so that a swapper
can serve them within a memory budget; by default every block is built once and kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blockpool.families import import_object
from blockpool.pool import Pool

__all__ = ["BlockRunner", "RunOutput"]


@dataclass
class RunOutput:
    """What one forward pass returns.

    Attributes:
        logits: ``[B, T, V]`` for decoders, ``None`` for encoders.
        hidden: ``[B, T, d]`` hidden states after the last layer (before the final norm).
        pooled: ``[B, d]`` encoder pooler output, when the model has a pooler.
        past_key_values: the KV cache, when ``use_cache``.
    """

    logits: torch.Tensor | None
    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    past_key_values: Any = None


class BlockRunner:
    """One model of a pool, run from its blocks.

    Args:
        pool: the open pool.
        model: the model's name in the pool.
        dtype: compute dtype (weights are cast to it at load).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        fetch: ``block_id -> module``; default: build each block once and keep it.
    """

    def __init__(
        self,
        pool: Pool,
        model: str,
        *,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        fetch: Callable[[str], nn.Module] | None = None,
    ) -> None:
        self.pool = pool
        self.name = model
        self.spec = pool.family(model)
        self.config = pool.config(model, attn_implementation)
        self.block_ids: list[str] = pool.model(model)["blocks"]
        self.dtype = dtype
        self._cache: dict[str, nn.Module] = {}
        self.fetch = fetch or self._resident
        self._rotary = None
        if self.spec.rotary_class:
            self._rotary = import_object(self.spec.rotary_class)(config=self.config)

    def _resident(self, bid: str) -> nn.Module:
        if bid not in self._cache:
            self._cache[bid] = self.pool.build_module(bid, dtype=self.dtype, config=self.config)
        return self._cache[bid]

    @property
    def is_causal(self) -> bool:
        return self.spec.causal

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Logits ``[B, T, V]`` (decoders) or last hidden states ``[B, T, d]`` (encoders)."""
        out = self.forward(input_ids, attention_mask)
        return out.logits if out.logits is not None else out.hidden

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> RunOutput:
        """Run embed -> layers -> head.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, past + T]`` 1 for real tokens, 0 for padding; ``None`` for all.
            past_key_values: a transformers cache from an earlier call (decoders).
            use_cache: create and fill a KV cache for token-by-token generation.
        """
        from transformers import DynamicCache

        if use_cache and past_key_values is None and self.spec.causal:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = torch.arange(past, past + input_ids.shape[1]).unsqueeze(0)
        hidden = self.fetch(self.block_ids[0])(input_ids, attention_mask, position_ids, past)
        kwargs_by_type = self._layer_kwargs(hidden, attention_mask, position_ids, past_key_values)
        kwargs_by_type = {t: {**kw, "use_cache": use_cache} for t, kw in kwargs_by_type.items()}
        layers = [b for b in self.block_ids if self.pool.blocks[b]["kind"] == "layer"]
        for bid in layers:
            index = self.pool.blocks[bid]["index"]
            out = self.fetch(bid)(
                hidden, **kwargs_by_type[self.spec.layer_type(self.config, index)]
            )
            hidden = out[0] if isinstance(out, tuple) else out
        head_id = (
            self.block_ids[-1] if self.pool.blocks[self.block_ids[-1]]["kind"] == "head" else None
        )
        head_out = self.fetch(head_id)(hidden) if head_id else None
        if self.spec.causal:
            return RunOutput(head_out, hidden, past_key_values=past_key_values)
        return RunOutput(None, hidden, pooled=head_out)

    def _layer_kwargs(self, hidden, attention_mask, position_ids, past) -> dict[str, dict]:
        """Per attention type, the keyword arguments every layer of that type receives."""
        from transformers.masking_utils import (
            create_bidirectional_mask,
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        types = set(getattr(self.config, "layer_types", None) or ["full_attention"])
        if not self.spec.causal:
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
            )
            return {t: {"attention_mask": mask} for t in types}
        mask_args = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past,
            position_ids=position_ids,
        )
        masks = {"full_attention": create_causal_mask}
        masks["sliding_attention"] = create_sliding_window_causal_mask
        result = {}
        for t in types:
            kw: dict[str, Any] = {
                "attention_mask": masks[t](**mask_args),
                "position_ids": position_ids,
                self.spec.cache_kwarg: past,
            }
            if self._rotary is not None:
                args = (
                    (hidden, position_ids, t)
                    if self.spec.rotary_per_layer_type
                    else (hidden, position_ids)
                )
                kw["position_embeddings"] = self._rotary(*args)
            result[t] = kw
        return result
