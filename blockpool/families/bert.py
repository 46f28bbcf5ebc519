"""BERT family (BERT, MiniLM): bidirectional post-norm encoder, absolute positions."""

from blockpool.families import FamilySpec, import_object
from blockpool.families._modules import EncoderEmbed, Pooler

_M = "transformers.models.bert.modeling_bert."

SPEC = FamilySpec(
    name="bert",
    model_types=("bert",),
    layer_class=_M + "BertLayer",
    embed={"embeddings.": "embeddings."},
    layer="encoder.layer.{i}.",
    head={"pooler.": "pooler."},
    build_embed=lambda config: EncoderEmbed(import_object(_M + "BertEmbeddings")(config)),
    build_head=lambda config: Pooler(import_object(_M + "BertPooler")(config)),
    causal=False,
    norm="post",
    rename=((r"^bert\.", ""),),
    ignore=(r"position_ids$", r"^cls\."),
    learned_positions="max_position_embeddings",
)
