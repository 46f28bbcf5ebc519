"""Gemma 3 text family: scaled embeddings, (1 + w) RMSNorm, local/global rotary layers."""

from torch import nn

from blockpool.families import FamilySpec, import_object
from blockpool.families._modules import LMHead, TokenEmbed

_M = "transformers.models.gemma3.modeling_gemma3."


def _embed(config):
    scaled = import_object(_M + "Gemma3TextScaledWordEmbedding")
    d = config.hidden_size
    return TokenEmbed(scaled(config.vocab_size, d, config.pad_token_id, embed_scale=d**0.5))


def _head(config):
    norm = import_object(_M + "Gemma3RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    return LMHead(norm, lm_head, softcap=config.final_logit_softcapping)


SPEC = FamilySpec(
    name="gemma3",
    model_types=("gemma3_text",),
    layer_class=_M + "Gemma3DecoderLayer",
    embed={"model.embed_tokens.": "tokens."},
    layer="model.layers.{i}.",
    head={"model.norm.": "norm.", "lm_head.": "lm_head."},
    tied={"lm_head.weight": "model.embed_tokens.weight"},
    rotary_class=_M + "Gemma3RotaryEmbedding",
    rotary_per_layer_type=True,
    build_embed=_embed,
    build_head=_head,
    rename=((r"^model\.language_model\.", "model."),),
    ignore=(r"rotary_emb\.\w*inv_freq$",),
)
