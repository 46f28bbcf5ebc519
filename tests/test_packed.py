"""Quantized blocks run packed: same logits as dequantizing at load, a fraction of the
memory (by the runner's accounting and by the tensors' real storage), budgets that only
the packed variant fits, and ``assy quantize --as`` adding a variant in place."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from assy.cli import cli
from blockpool import BlockRunner, ChainModule, Pool, build_pool
from blockpool.chain import build_block
from blockpool.offload import budgeted_runner, chain_nbytes, min_budget
from blockpool.quant.packed import PackedWeight
from blockpool.quant.write import add_quantized_variant

FAMILIES = ("llama", "gemma3", "gpt2", "bert", "opt")


@pytest.fixture(scope="module")
def pool_root(tiny_dirs, tmp_path_factory):
    """Tiny models of five families plus a wider Llama (rows of whole 64-weight blocks,
    the bitsandbytes CPU kernel's path), each with int8 and nf4 variants added in place."""
    root = tmp_path_factory.mktemp("packed")
    torch.manual_seed(0)
    wide = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=128,
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            tie_word_embeddings=True,
        )
    ).eval()
    wide.save_pretrained(root / "wide-src")
    sources = [f"{f}={tiny_dirs[f]}" for f in FAMILIES] + [f"wide={root / 'wide-src'}"]
    build_pool(sources, root / "pool", dtype="fp32")
    pool = Pool(root / "pool")
    for model in (*FAMILIES, "wide"):
        for precision in ("int8", "nf4"):
            add_quantized_variant(pool, model, precision, f"{model}-{precision}")
    return root / "pool"


def _dense_runner(pool: Pool, model: str, dtype=torch.float32) -> BlockRunner:
    """The dequantize-at-load path: every block built with its weights dequantized once."""
    runner = BlockRunner(pool, model, dtype=dtype)
    built: dict = {}

    def fetch(bid):
        if bid not in built:
            built[bid] = build_block(pool, bid, runner, built, packed=False)
        return built[bid]

    runner.fetch = fetch
    return runner


def _storage_bytes(modules) -> int:
    """Bytes of the distinct storages behind the weights of ``modules`` (persistent
    buffers included, a storage shared by two modules once)."""
    seen, total = set(), 0
    for module in modules:
        for t in module.state_dict(keep_vars=True).values():
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_packed_logits_equal_dequantize_at_load(pool_root, family, precision):
    pool = Pool(pool_root)
    model = f"{family}-{precision}"
    ids = torch.randint(2, 120, (2, 11), generator=torch.Generator().manual_seed(1))
    packed = BlockRunner(pool, model)
    expected = _dense_runner(pool, model)(ids)
    assert torch.equal(packed(ids), expected)
    # the packed blocks really hold no dense copy of a quantized matrix
    layer = packed.fetch(pool.model(model).blocks[1])
    assert any(isinstance(m, PackedWeight) for m in layer.modules())
    assert all(p.numel() < 16 * 16 for p in layer.parameters())
    # and the budgeted runner, blocks swapped in and out, computes the same
    runner, swapper = budgeted_runner(
        pool, model, budget=min_budget(pool, model, batch=2, tokens=11)
    )
    with swapper:
        assert torch.equal(runner(ids), expected)


def test_packed_bf16_and_generation_with_cache(pool_root):
    pool = Pool(pool_root)
    ids = torch.randint(2, 120, (1, 7), generator=torch.Generator().manual_seed(2))
    for model in ("wide-nf4", "gemma3-int8"):
        packed, dense = BlockRunner(pool, model, dtype=torch.bfloat16), None
        dense = _dense_runner(pool, model, torch.bfloat16)
        assert torch.equal(packed(ids), dense(ids))
        out_p = packed.forward(ids, use_cache=True)
        out_d = dense.forward(ids, use_cache=True)
        step = ids[:, -1:]
        assert torch.equal(
            packed.forward(step, past_key_values=out_p.past_key_values).logits,
            dense.forward(step, past_key_values=out_d.past_key_values).logits,
        )


def test_packed_bytes_by_accounting_and_by_storage(pool_root):
    pool = Pool(pool_root)
    f32 = torch.float32
    fp32 = chain_nbytes(pool, pool.model("wide").blocks, f32)
    int8 = chain_nbytes(pool, pool.model("wide-int8").blocks, f32)
    nf4 = chain_nbytes(pool, pool.model("wide-nf4").blocks, f32)
    assert int8 <= 0.3 * fp32 and nf4 < 0.6 * int8, (fp32, int8, nf4)
    for model, accounted in (("wide", fp32), ("wide-int8", int8), ("wide-nf4", nf4)):
        runner = BlockRunner(pool, model)
        modules = [runner.fetch(b) for b in runner.block_ids]
        assert _storage_bytes(modules) == accounted, model
        # what a budgeted run counts as resident weights is the same packed size
        runner, swapper = budgeted_runner(pool, model, budget=10 * fp32)
        with swapper:
            runner(torch.ones(1, 4, dtype=torch.long))
            assert swapper.stats.weights_resident_peak_bytes == accounted, model


def test_a_budget_only_the_int8_variant_fits(pool_root):
    from blockpool import UsageError

    pool = Pool(pool_root)
    f32 = torch.float32
    ids = torch.randint(2, 120, (1, 16), generator=torch.Generator().manual_seed(3))
    work = BlockRunner(pool, "wide-int8").working_bytes(1, 16, 0, 16)
    budget = chain_nbytes(pool, pool.model("wide-int8").blocks, f32) + work + (16 << 10)
    assert budget < min_budget(pool, "wide", batch=1, tokens=16)
    runner, swapper = budgeted_runner(pool, "wide-int8", budget=budget)
    with swapper:
        runner(ids)
        swapper.reset_stats()
        assert torch.equal(runner(ids), BlockRunner(pool, "wide-int8")(ids))
        # everything stayed resident: the second pass read nothing
        assert swapper.stats.misses == 0 and swapper.stats.evictions == 0
        assert swapper.stats.budget_used_peak_bytes <= budget
    with pytest.raises(UsageError, match="below the smallest working set of wide"):
        budgeted_runner(pool, "wide", budget=budget)


def test_planner_counts_variants_packed(pool_root):
    from assy.assembly.planner import pool_candidates

    pool = Pool(pool_root)
    cands = {c.name: c for c in pool_candidates(pool, tokens=16)}
    size = {n: sum(c.layer_bytes) + c.ends_bytes for n, c in cands.items()}
    assert size["wide-int8"] == chain_nbytes(pool, pool.model("wide-int8").blocks, torch.float32)
    assert size["wide-int8"] <= 0.3 * size["wide"] and size["wide-nf4"] < size["wide-int8"]


def test_training_path_builds_dense_weights(pool_root):
    pool = Pool(pool_root)
    module = ChainModule(BlockRunner(pool, "llama-int8"))
    assert not any(isinstance(m, PackedWeight) for m in module.modules())
    ids = torch.randint(2, 120, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(module(ids), BlockRunner(pool, "llama-int8")(ids))


def test_quantize_as_in_place_round_trip(pool_root, tmp_path):
    import shutil

    root = tmp_path / "pool"
    shutil.copytree(pool_root, root)
    args = ["quantize", str(root), "--model", "gpt2", "--precision", "int4", "--as", "gpt2-q4"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["precision"] == "nf4" and report["name"] == "gpt2-q4"
    assert report["resident_bytes"] < 0.3 * report["source_resident_bytes"]
    pool = Pool(root)
    entry = pool.model("gpt2-q4")
    assert entry.parent_model == "gpt2"
    assert {pool.blocks[b].precision for b in entry.blocks} == {"nf4"}
    parents = [pool.blocks[b].parent for b in entry.blocks]
    assert [p.block for p in parents] == list(pool.model("gpt2").blocks)
    assert {p.pool for p in parents} == {"."}
    verify = CliRunner().invoke(cli, ["verify-pool", str(root)])
    assert verify.exit_code == 0, verify.output
    # the in-place variant computes what the variant written by the fixture computes
    ids = torch.randint(2, 120, (1, 9), generator=torch.Generator().manual_seed(5))
    assert torch.equal(BlockRunner(pool, "gpt2-q4")(ids), BlockRunner(pool, "gpt2-nf4")(ids))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "llama", "--precision", "int8", "--as", "llama-int8"], ["already has"]),
        (["--model", "llama", "--precision", "int3", "--as", "x"], ["unknown precision"]),
        (["--model", "nope", "--precision", "int8", "--as", "x"], ["no model 'nope'"]),
        (["--model", "llama-int8", "--precision", "nf4", "--as", "x"], ["full-precision"]),
        (["--precision", "int8", "--as", "x"], ["exactly one --model"]),
        (["--model", "llama", "--auto", "--target-bits", "6", "--as", "x"], ["--out"]),
        (["--model", "llama", "--precision", "int8", "--as", "a/b"], ["--as", "model name"]),
        (["--model", "llama", "--precision", "int8"], ["--out", "--as"]),
    ],
)
def test_quantize_as_bad_input(pool_root, args, words):
    before = (pool_root / "pool.json").read_bytes()
    files = sorted(p.name for p in (pool_root / "blocks").iterdir())
    result = CliRunner().invoke(cli, ["quantize", str(pool_root), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(w in lines[0] for w in words), lines[0]
    assert (pool_root / "pool.json").read_bytes() == before
    assert sorted(p.name for p in (pool_root / "blocks").iterdir()) == files
