"""The first test of every family: blocks through the pool reproduce transformers."""

import pytest
import torch
import transformers as tf
from tiny_models import TINY, V

import blockpool
from blockpool import BlockRunner, Pool, build_pool


def test_every_family_has_a_tiny_model():
    assert set(TINY) == set(blockpool.REGISTRY)


def _reference(path, causal):
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    return auto.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", sorted(TINY))
def test_blocks_reproduce_the_transformers_forward(family, tiny_dirs, tmp_path):
    build_pool([f"m={tiny_dirs[family]}"], tmp_path, dtype="fp32")
    runner = BlockRunner(Pool(tmp_path), "m")
    hf = _reference(tiny_dirs[family], runner.is_causal)
    torch.manual_seed(1)
    ids = torch.randint(2, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row

    with torch.inference_mode():
        ours = runner.forward(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask)

    if runner.is_causal:
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
    else:
        keep = mask.bool()
        torch.testing.assert_close(
            ours.hidden[keep], theirs.last_hidden_state[keep], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(ours.pooled, theirs.pooler_output, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(f for f in TINY if f not in ("bert", "roberta")))
def test_kv_cache_decoding_matches_full_forward(family, tiny_dirs, tmp_path):
    build_pool([f"m={tiny_dirs[family]}"], tmp_path, dtype="fp32")
    runner = BlockRunner(Pool(tmp_path), "m")
    ids = torch.randint(2, V, (1, 10), generator=torch.Generator().manual_seed(2))

    full = runner.forward(ids).logits
    step = runner.forward(ids[:, :6], use_cache=True)
    logits = [step.logits]
    for t in range(6, 10):
        step = runner.forward(
            ids[:, t : t + 1], past_key_values=step.past_key_values, use_cache=True
        )
        logits.append(step.logits)

    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-4, rtol=0)
