"""The budget is the whole process's: peak RSS over the warm floor stays within
budget + max(10%, 32 MB) for a tiny model whose vocabulary dominates its bytes (fresh
subprocesses, so nothing else this test session holds is counted)."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

from blockpool import Pool, build_pool

VOCAB, WIDTH = 262_144, 128  # a Gemma-sized vocabulary: 134 MB of fp32 embedding, tied
MB = 1 << 20

WORKER = r"""
import json, sys
from pathlib import Path

import torch
import transformers

import assy  # noqa: F401 - part of the warm floor
from blockpool import Pool, RunOptions, open_runner


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024


torch.set_num_threads(1)
pool, budget = Pool(sys.argv[1]), None if sys.argv[2] == "none" else int(sys.argv[2])
# the warm floor (DESIGN.md "Budget"): imports and one tiny forward of the same family
tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1))
with torch.inference_mode():
    tiny(input_ids=torch.ones(1, 4, dtype=torch.long))
del tiny
floor = status("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from here
with open_runner(pool, "big", RunOptions(budget=budget, threads=1)) as run:
    runner = run.runner
    ids = torch.randint(0, 262144, (1, 32), generator=torch.Generator().manual_seed(0))
    last = torch.zeros_like(ids, dtype=torch.bool)
    last[:, -1] = True
    out = runner.forward(ids, use_cache=True, logits_at=last)  # prefill
    for _ in range(4):  # decode
        token = out.logits[-1:].argmax(-1).view(1, 1)
        out = runner.forward(token, past_key_values=out.past_key_values, use_cache=True,
                             logits_at=torch.ones_like(token, dtype=torch.bool))
print(json.dumps({"over_floor": status("VmHWM:") - floor, "report": run.report}))
"""


@pytest.fixture(scope="module")
def big_vocab_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigvocab")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=4,
            tie_word_embeddings=True,
        )
    )
    model.save_pretrained(root / "src")
    del model
    build_pool([f"big={root / 'src'}"], root / "pool", dtype="fp32")
    return root / "pool"


def _run(pool, budget) -> dict:
    arg = "none" if budget is None else str(budget)
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(pool), arg], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_rss_of_a_budgeted_run_stays_within_its_budget(big_vocab_pool):
    pool = Pool(big_vocab_pool)
    # an fp32 pool stores what memory holds, the tied table once
    model_bytes = sum(pool.blocks[b].bytes for b in pool.model("big").blocks)
    assert 128 * MB < model_bytes < 140 * MB
    unbudgeted = _run(big_vocab_pool, None)["over_floor"]
    for fraction in (0.25, 0.35):  # at 50% the slack would cover the whole model
        budget = int(model_bytes * fraction)
        bound = budget + max(budget // 10, 32 * MB)
        # the check can fail: all weights resident exceed the bound
        assert unbudgeted > bound, (unbudgeted, bound)
        measured = _run(big_vocab_pool, budget)
        assert measured["over_floor"] <= bound, (fraction, measured)
