"""GPT-2 family: learned absolute positions, Conv1D weights stored ``[in, out]``."""

from torch import nn

from blockpool.families import FamilySpec
from blockpool.families._modules import AbsoluteEmbed, LMHead

_M = "transformers.models.gpt2.modeling_gpt2."


def _embed(config):
    d = config.hidden_size
    return AbsoluteEmbed(nn.Embedding(config.vocab_size, d), nn.Embedding(config.n_positions, d))


def _head(config):
    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
    return LMHead(norm, nn.Linear(config.hidden_size, config.vocab_size, bias=False))


SPEC = FamilySpec(
    name="gpt2",
    model_types=("gpt2",),
    layer_class=_M + "GPT2Block",
    embed={"transformer.wte.": "tokens.", "transformer.wpe.": "positions."},
    layer="transformer.h.{i}.",
    head={"transformer.ln_f.": "norm.", "lm_head.": "lm_head."},
    tied={"lm_head.weight": "transformer.wte.weight"},
    build_embed=_embed,
    build_head=_head,
    # The original checkpoints store the base model without the "transformer." prefix.
    rename=((r"^(?!transformer\.|lm_head\.)", "transformer."),),
    ignore=(r"\.attn\.(masked_)?bias$",),
    conv1d=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
    learned_positions="n_positions",
)
