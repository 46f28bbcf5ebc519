"""Tiny randomly initialised models of every supported family, built offline."""

from __future__ import annotations

import transformers as tf

V = 128  # vocabulary of every tiny model


def _llama():
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            tie_word_embeddings=True,
        )
    )


def _gemma3():
    return tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_hidden_layers=3,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=8,
            tie_word_embeddings=True,
        )
    )


def _qwen2():
    return tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            tie_word_embeddings=False,
        )
    )


def _gpt2():
    return tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    )


def _opt():
    # word_embed_proj_dim != hidden_size exercises project_in / project_out (like OPT-350m).
    return tf.OPTForCausalLM(
        tf.OPTConfig(
            vocab_size=V,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
            do_layer_norm_before=False,
        )
    )


def _gpt_neox():
    return tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.25,
            use_parallel_residual=True,
            max_position_embeddings=64,
        )
    )


def _bert():
    return tf.BertModel(
        tf.BertConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )


def _roberta():
    return tf.RobertaModel(
        tf.RobertaConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=70,
            pad_token_id=1,
        )
    )


TINY = {
    "llama": _llama,
    "gemma3": _gemma3,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    "bert": _bert,
    "roberta": _roberta,
}


def char_tokenizer():
    """A character-level tokenizer within the tiny models' 128-token vocabulary (BOS = 1)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "[BOS]": 1, **{chr(i): i - 30 for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", pad_token="[UNK]"
    )
