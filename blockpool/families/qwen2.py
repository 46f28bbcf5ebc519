"""Qwen2 family (Qwen2, Qwen2.5): Llama-like with q/k/v biases and optional sliding layers."""

from torch import nn

from blockpool.families import FamilySpec, import_object
from blockpool.families._modules import LMHead, TokenEmbed

_M = "transformers.models.qwen2.modeling_qwen2."


def _embed(config):
    return TokenEmbed(nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id))


def _head(config):
    norm = import_object(_M + "Qwen2RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    return LMHead(norm, nn.Linear(config.hidden_size, config.vocab_size, bias=False))


SPEC = FamilySpec(
    name="qwen2",
    model_types=("qwen2",),
    layer_class=_M + "Qwen2DecoderLayer",
    embed={"model.embed_tokens.": "tokens."},
    layer="model.layers.{i}.",
    head={"model.norm.": "norm.", "lm_head.": "lm_head."},
    tied={"lm_head.weight": "model.embed_tokens.weight"},
    rotary_class=_M + "Qwen2RotaryEmbedding",
    build_embed=_embed,
    build_head=_head,
    ignore=(r"rotary_emb\.inv_freq$",),
)
