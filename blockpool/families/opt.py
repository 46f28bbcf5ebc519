"""OPT family: learned positions offset by 2, optional project_in/project_out
(``word_embed_proj_dim != hidden_size``, e.g. OPT-350m), pre- or post-norm layers."""

from torch import nn

from blockpool.families import FamilySpec, import_object
from blockpool.families._modules import LearnedOffsetEmbed, LMHead

_M = "transformers.models.opt.modeling_opt."


def _projects(config) -> bool:
    return config.word_embed_proj_dim != config.hidden_size


def _embed(config):
    positions = import_object(_M + "OPTLearnedPositionalEmbedding")
    d, e = config.hidden_size, config.word_embed_proj_dim
    project_in = nn.Linear(e, d, bias=False) if _projects(config) else None
    tokens = nn.Embedding(config.vocab_size, e, config.pad_token_id)
    return LearnedOffsetEmbed(tokens, positions(config.max_position_embeddings, d), project_in)


def _head(config):
    d, e = config.hidden_size, config.word_embed_proj_dim
    norm = None
    if config.do_layer_norm_before and not config._remove_final_layer_norm:
        norm = nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine)
    project_out = nn.Linear(d, e, bias=False) if _projects(config) else None
    return LMHead(norm, nn.Linear(e, config.vocab_size, bias=False), project_out)


SPEC = FamilySpec(
    name="opt",
    model_types=("opt",),
    layer_class=_M + "OPTDecoderLayer",
    embed={
        "model.decoder.embed_tokens.": "tokens.",
        "model.decoder.embed_positions.": "positions.",
        "model.decoder.project_in.": "project_in.",
    },
    layer="model.decoder.layers.{i}.",
    head={
        "model.decoder.final_layer_norm.": "norm.",
        "model.decoder.project_out.": "project_out.",
        "lm_head.": "lm_head.",
    },
    tied={"lm_head.weight": "model.decoder.embed_tokens.weight"},
    build_embed=_embed,
    build_head=_head,
    rename=((r"^decoder\.", "model.decoder."),),
    learned_positions="max_position_embeddings",
)
