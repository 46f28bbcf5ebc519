"""RoBERTa family: BERT layers with padding-offset positions."""

from blockpool.families import FamilySpec, import_object
from blockpool.families._modules import EncoderEmbed, Pooler

_M = "transformers.models.roberta.modeling_roberta."

SPEC = FamilySpec(
    name="roberta",
    model_types=("roberta",),
    layer_class=_M + "RobertaLayer",
    embed={"embeddings.": "embeddings."},
    layer="encoder.layer.{i}.",
    head={"pooler.": "pooler."},
    build_embed=lambda config: EncoderEmbed(import_object(_M + "RobertaEmbeddings")(config)),
    build_head=lambda config: Pooler(import_object(_M + "RobertaPooler")(config)),
    causal=False,
    norm="post",
    rename=((r"^roberta\.", ""),),
    ignore=(r"position_ids$", r"^lm_head\."),
    learned_positions="max_position_embeddings",
    position_offset="pad_token_id",
)
