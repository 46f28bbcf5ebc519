"""GPT-NeoX family (Pythia): parallel residual, partial rotary, untied ``embed_out``."""

from torch import nn

from blockpool.families import FamilySpec
from blockpool.families._modules import LMHead, TokenEmbed

_M = "transformers.models.gpt_neox.modeling_gpt_neox."


def _embed(config):
    return TokenEmbed(nn.Embedding(config.vocab_size, config.hidden_size))


def _head(config):
    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return LMHead(norm, nn.Linear(config.hidden_size, config.vocab_size, bias=False))


SPEC = FamilySpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layer_class=_M + "GPTNeoXLayer",
    embed={"gpt_neox.embed_in.": "tokens."},
    layer="gpt_neox.layers.{i}.",
    head={"gpt_neox.final_layer_norm.": "norm.", "embed_out.": "lm_head."},
    tied={"embed_out.weight": "gpt_neox.embed_in.weight"},
    rotary_class=_M + "GPTNeoXRotaryEmbedding",
    build_embed=_embed,
    build_head=_head,
    cache_kwarg="layer_past",
    ignore=(r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$",),
)
