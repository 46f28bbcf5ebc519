"""Llama family (SmolLM2, Llama 2/3, TinyLlama): RMSNorm, rotary, gated MLP."""

from torch import nn

from blockpool.families import FamilySpec, import_object
from blockpool.families._modules import LMHead, TokenEmbed

_M = "transformers.models.llama.modeling_llama."


def _embed(config):
    return TokenEmbed(nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id))


def _head(config):
    norm = import_object(_M + "LlamaRMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    return LMHead(norm, nn.Linear(config.hidden_size, config.vocab_size, bias=False))


SPEC = FamilySpec(
    name="llama",
    model_types=("llama",),
    layer_class=_M + "LlamaDecoderLayer",
    embed={"model.embed_tokens.": "tokens."},
    layer="model.layers.{i}.",
    head={"model.norm.": "norm.", "lm_head.": "lm_head."},
    tied={"lm_head.weight": "model.embed_tokens.weight"},
    rotary_class=_M + "LlamaRotaryEmbedding",
    build_embed=_embed,
    build_head=_head,
    ignore=(r"rotary_emb\.inv_freq$",),
)
