"""Tests of assy.evaluate against brute-force computations with a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from assy.data import MCExample
from assy.errors import UsageError
from assy.evaluate import (
    choice_logliks,
    encode_pair,
    mc_metrics,
    multiple_choice,
    perplexity,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "a small model reads a short text and predicts the next token.",
    "Question: which animal is quick?\nAnswer: the fox",
    "blocks of pre-trained models are assembled into new models.",
]
TEXT = " ".join(CORPUS * 3)


def _tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline on CORPUS; adds BOS by default, has no pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer()


@pytest.fixture(scope="module")
def hf_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random predictions so choices differ clearly
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def model(hf_model: LlamaForCausalLM):
    return lambda ids, mask: hf_model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def examples() -> list[MCExample]:
    return [
        MCExample("Question: which animal is quick?\nAnswer:", (" the fox", " a dog"), 0),
        MCExample("the quick brown", (" fox", " model jumps over", " dog."), 1),
        MCExample("blocks of pre-trained models are ", ("assembled", "read"), 0),
        MCExample("a", (" small model reads a short text", " b"), 1),
        MCExample("", (" the lazy dog", " the fox"), 0),
    ]


# --------------------------------------------------------------------------- perplexity


def _brute_force_perplexity(hf_model, ids: list[int], window: int) -> tuple[float, int]:
    """Mean NLL and scored tokens from the HF model's own loss, one window at a time."""
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = hf_model(input_ids=chunk, labels=chunk).loss.item()
        total += loss * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return total / count, count


@pytest.mark.parametrize(("max_tokens", "window"), [(50, 16), (49, 16), (40, 64)])
def test_perplexity_matches_hf_loss(hf_model, model, tokenizer, max_tokens, window):
    ids = tokenizer(TEXT).input_ids
    assert len(ids) > max_tokens
    result = perplexity(
        model, tokenizer, TEXT, max_tokens=max_tokens, window=window, progress=False
    )
    nll, count = _brute_force_perplexity(hf_model, ids[:max_tokens], window)
    assert result["windows"] == math.ceil(max_tokens / window)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(nll, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_counts_follow_protocol(model, tokenizer):
    result = perplexity(model, tokenizer, TEXT, max_tokens=49, window=16, progress=False)
    # windows 16, 16, 16, 1: the last one scores nothing
    assert (result["windows"], result["tokens"]) == (4, 45)
    result = perplexity(model, tokenizer, TEXT, max_tokens=50, window=16, progress=False)
    assert (result["windows"], result["tokens"]) == (4, 46)


def test_perplexity_too_short_or_bad_window(model, tokenizer):
    with pytest.raises(UsageError, match="too short"):
        perplexity(model, tokenizer, "", progress=False)  # only BOS
    with pytest.raises(UsageError, match="window"):
        perplexity(model, tokenizer, TEXT, window=1, progress=False)


# --------------------------------------------------------------------------- multiple choice


def _brute_force_loglik(hf_model, tokenizer, context: str, choice: str) -> float:
    """Summed log p(choice | context) with one unpadded forward pass."""
    ctx = tokenizer(context).input_ids if context else [tokenizer.bos_token_id]
    cont = tokenizer(choice, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits[0, len(ctx) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()


def test_padding_does_not_change_logliks(model, tokenizer, examples):
    one = choice_logliks(model, tokenizer, examples, batch_size=1, progress=False)
    eight = choice_logliks(model, tokenizer, examples, batch_size=8, progress=False)
    for row_one, row_eight in zip(one, eight, strict=True):
        assert row_one == pytest.approx(row_eight, abs=1e-5)
    metrics_one = multiple_choice(model, tokenizer, examples, batch_size=1, progress=False)
    metrics_eight = multiple_choice(model, tokenizer, examples, batch_size=8, progress=False)
    assert metrics_one == metrics_eight


def test_logliks_match_brute_force_and_argmax_wins(hf_model, model, tokenizer, examples):
    # a context ending in a space hands it to the continuation (lm-eval convention)
    moved = [ex.context[len(ex.context.rstrip()) :] for ex in examples]
    brute = [
        [_brute_force_loglik(hf_model, tokenizer, ex.context.rstrip(), m + c) for c in ex.choices]
        for ex, m in zip(examples, moved, strict=True)
    ]
    got = choice_logliks(model, tokenizer, examples, batch_size=3, progress=False)
    for row_got, row_brute in zip(got, brute, strict=True):
        assert row_got == pytest.approx(row_brute, abs=1e-4)
    best = [
        MCExample(ex.context, ex.choices, max(range(len(b)), key=b.__getitem__))
        for ex, b in zip(examples, brute, strict=True)
    ]
    worst = [
        MCExample(ex.context, ex.choices, min(range(len(b)), key=b.__getitem__))
        for ex, b in zip(examples, brute, strict=True)
    ]
    assert multiple_choice(model, tokenizer, best, progress=False)["acc"] == 1.0
    assert multiple_choice(model, tokenizer, worst, progress=False)["acc"] == 0.0


def test_encode_pair_moves_trailing_whitespace(tokenizer):
    assert encode_pair(tokenizer, "the quick ", "fox") == encode_pair(
        tokenizer, "the quick", " fox"
    )
    ctx, cont = encode_pair(tokenizer, "the quick", " fox")
    assert ctx[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in cont


def test_left_truncation_keeps_continuation(hf_model, model, tokenizer):
    context, choice = TEXT[:200], " the lazy dog"
    ctx = tokenizer(context).input_ids
    cont = tokenizer(choice, add_special_tokens=False).input_ids
    max_length = 12
    tokens = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([tokens[:-1]])).logits[0, -len(cont) :]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum()
    got = choice_logliks(
        model, tokenizer, [MCExample(context, (choice,), 0)], max_length=max_length, progress=False
    )
    assert got[0][0] == pytest.approx(expected.item(), abs=1e-4)
    with pytest.raises(UsageError, match="max_length"):
        choice_logliks(
            model, tokenizer, [MCExample(context, (choice,), 0)], max_length=2, progress=False
        )


def test_mc_metrics_acc_norm_and_stderr():
    examples = [
        MCExample("c", (" a", " bbbbbbb"), 1),  # acc picks 0, length-normalised picks 1
        MCExample("c", (" a", " b"), 0),
        MCExample("c", (" a", " b"), 0),
    ]
    logliks = [[-2.0, -3.0], [-1.0, -2.0], [-3.0, -1.0]]
    metrics = mc_metrics(logliks, examples)
    assert metrics["n"] == 3
    assert metrics["acc"] == pytest.approx(1 / 3)
    assert metrics["acc_norm"] == pytest.approx(2 / 3)
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))
    assert math.isnan(mc_metrics(logliks[:1], examples[:1])["acc_stderr"])


def test_multiple_choice_rejects_empty_and_bad_output(tokenizer, examples):
    with pytest.raises(UsageError, match="no examples"):
        multiple_choice(lambda i, m: i, tokenizer, [], progress=False)
    with pytest.raises(TypeError, match="logits"):
        multiple_choice(lambda i, m: i.float(), tokenizer, examples, progress=False)
