"""Block quantizer: formats, quantized pools, the mixed-precision planner."""

import itertools
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from assy.cli import cli
from blockpool import BlockRunner, Pool, build_pool
from blockpool.errors import IntegrityError, UsageError
from blockpool.pool import summarize
from blockpool.quant.formats import (
    bnb_linear,
    dequantize,
    dequantize_block,
    quantize,
    quantize_block,
)
from blockpool.quant.plan import Option, allocate, candidates, plan_precisions, weight_stats
from blockpool.quant.sensitivity import capture_inputs, measure_blocks
from blockpool.quant.write import quantize_pool

# Relative Frobenius error bounds on Gaussian matrices (measured: int8 0.006, nf4 0.092,
# fp4 0.12, bf16 0.0017, fp16 0.0002).
BOUNDS = {"int8": 0.01, "nf4": 0.11, "fp4": 0.14}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def tiny_pool(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("qpool") / "pool"
    build_pool([f"{f}={d}" for f, d in sorted(tiny_dirs.items())], root, dtype="fp32")
    return root


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("precision", sorted(BOUNDS))
@pytest.mark.parametrize("shape", [(128, 64), (96, 32), (48, 160)])
def test_round_trip_error_is_bounded(precision, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)

    back = dequantize(quantize(w, precision), torch.float32)

    assert back.shape == w.shape
    assert _rel(back, w) < BOUNDS[precision]
    if precision == "int8":  # row-wise absmax: half a step of 1/127 of the row's max
        step = w.abs().amax(1, keepdim=True) / 127
        assert ((back - w).abs() <= step / 2 + 1e-6).all()
    else:  # 4-bit blockwise: no weight moves by more than its block's absmax
        blocks = w.flatten().view(-1, 64)
        err = (back - w).flatten().view(-1, 64).abs()
        assert (err <= blocks.abs().amax(1, keepdim=True) + 1e-6).all()


def test_float_precisions_cast_every_floating_tensor():
    state = {"a.weight": torch.randn(32, 32), "n.weight": torch.ones(32)}
    for precision, tol in (("fp16", 1e-3), ("bf16", 1e-2)):
        stored, quant = quantize_block(state, precision)
        assert quant is None
        assert all(t.dtype != torch.float32 for t in stored.values())
        assert _rel(stored["a.weight"], state["a.weight"]) < tol


def test_block_layout_is_bitsandbytes_and_small_tensors_stay():
    torch.manual_seed(0)
    state = {
        "mlp.c_fc.weight": torch.randn(32, 128),  # Conv1D: [in, out]
        "mlp.c_fc.bias": torch.randn(128),
        "ln.weight": torch.randn(32),
        "token_type.weight": torch.randn(2, 32),
    }

    q8, info8 = quantize_block(state, "int8", conv1d=("mlp.c_fc.weight",))
    q4, info4 = quantize_block(state, "int4", conv1d=("mlp.c_fc.weight",))

    assert q8["mlp.c_fc.weight"].dtype == torch.int8 and q8["mlp.c_fc.weight"].shape == (128, 32)
    assert q8["mlp.c_fc.SCB"].shape == (128,)  # one scale per output feature
    assert info4["precision"] == "nf4" and "mlp.c_fc.weight.quant_state.bitsandbytes__nf4" in q4
    for stored, info in ((q8, info8), (q4, info4)):
        assert info["tensors"] == ["mlp.c_fc.weight"] and info["transposed"] == ["mlp.c_fc.weight"]
        for name in ("mlp.c_fc.bias", "ln.weight", "token_type.weight"):
            assert torch.equal(stored[name], state[name])
        back = dequantize_block(stored, info)
        assert set(back) == set(state) and back["mlp.c_fc.weight"].shape == (32, 128)
        assert _rel(back["mlp.c_fc.weight"], state["mlp.c_fc.weight"]) < 0.11


def test_missing_quant_state_is_an_integrity_error():
    stored, info = quantize_block({"a.weight": torch.randn(32, 64)}, "nf4")
    with pytest.raises(IntegrityError, match="quantization state"):
        dequantize_block({"a.weight": stored["a.weight"]}, info)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_bitsandbytes_runs_a_stored_matrix(precision):
    torch.manual_seed(0)
    w, bias, x = torch.randn(128, 64), torch.randn(128), torch.randn(4, 64)
    stored = quantize(w, precision)

    out = bnb_linear(stored, precision, bias=bias)(x)

    expected = x @ dequantize(stored, torch.float32).T + bias
    # int8: bitsandbytes also quantizes the activations (LLM.int8 without outliers).
    assert _rel(out, expected) < (0.02 if precision == "int8" else 0.01)


# --------------------------------------------------------------------------- pools


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_pool_runs_every_family_and_verifies(tiny_pool, tmp_path, precision):
    source = Pool(tiny_pool)
    ids = torch.randint(0, 128, (2, 10))

    quantize_pool(source, tmp_path / precision, precision)
    result = CliRunner().invoke(cli, ["verify-pool", str(tmp_path / precision)])

    assert result.exit_code == 0, result.output
    pool = Pool(tmp_path / precision)
    for model in source.models:
        ours, ref = BlockRunner(pool, model)(ids), BlockRunner(source, model)(ids)
        assert _rel(ours, ref) < (0.05 if precision == "int8" else 0.6), model
    for bid, entry in pool.blocks.items():
        assert entry.precision == precision and entry.parent.block == bid
        with safe_open(pool.path(bid), "pt") as f:
            assert f.metadata()["precision"] == precision


def test_tied_head_dequantizes_the_embedding(tiny_pool, tmp_path):
    quantize_pool(Pool(tiny_pool), tmp_path / "q", "nf4", models=["llama"])
    pool, source = Pool(tmp_path / "q"), Pool(tiny_pool)

    head = pool.load_tensors("llama/head/0")["lm_head.weight"]

    assert pool.blocks["llama/head/0"].tied == {"lm_head.weight": "llama/embed/0:tokens.weight"}
    assert torch.equal(head, pool.load_tensors("llama/embed/0")["tokens.weight"])
    assert 0 < _rel(head, source.load_tensors("llama/head/0")["lm_head.weight"]) < 0.11


def test_build_pool_precision_and_bits(tiny_dirs, tmp_path):
    runner = CliRunner()
    args = ["build-pool", f"llama={tiny_dirs['llama']}", f"gpt2={tiny_dirs['gpt2']}"]

    first = runner.invoke(cli, [*args, "--out", str(tmp_path / "p"), "--precision", "int4"])
    sums = {b: e.sha256 for b, e in Pool(tmp_path / "p").blocks.items()}
    again = runner.invoke(cli, [*args, "--out", str(tmp_path / "p"), "--precision", "int4"])
    shown = runner.invoke(cli, ["inspect", str(tmp_path / "p"), "--json"])

    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    pool = Pool(tmp_path / "p")
    assert {b: e.sha256 for b, e in pool.blocks.items()} == sums  # resumed, not rewritten
    assert {e.precision for e in pool.blocks.values()} == {"nf4"}
    info = json.loads(shown.stdout)
    assert 4 < info["bits"] < 16 and info["models"]["gpt2"]["blocks"][1]["bits"] < 16
    assert not pool.verify()
    ids = torch.randint(0, 128, (1, 8))
    assert BlockRunner(pool, "gpt2")(ids).shape == (1, 8, 128)


def test_summarize_counts_bits_per_weight(tiny_pool, tmp_path):
    quantize_pool(Pool(tiny_pool), tmp_path / "q8", "int8", models=["qwen2"])

    fp32 = summarize(Pool(tiny_pool))["models"]["qwen2"]
    int8 = summarize(Pool(tmp_path / "q8"))["models"]["qwen2"]

    assert fp32["params"] == int8["params"]
    assert 32 <= fp32["bits"] < 34 and 8 <= int8["bits"] < 12


# --------------------------------------------------------------------------- planner


def test_allocate_is_optimal_and_within_budget():
    torch.manual_seed(0)
    options = {
        f"u{i}": [
            Option(p, int(b), float(loss))
            for p, b, loss in zip(
                ("nf4", "int8", "fp16"),
                sorted(torch.randint(1000, 9000, (3,)).tolist()),
                sorted(torch.rand(3).tolist(), reverse=True),
                strict=True,
            )
        ]
        for i in range(6)
    }
    combos = list(itertools.product(*options.values()))
    low = sum(o[0].bytes for o in options.values())
    high = sum(o[-1].bytes for o in options.values())
    for budget in [low + (high - low) * k // 6 for k in range(7)]:
        feasible = [c for c in combos if sum(o.bytes for o in c) <= budget]

        plan = allocate(options, budget)

        assert sum(o.bytes for o in plan.values()) <= budget
        best = min(sum(o.loss for o in c) for c in feasible)
        assert sum(o.loss for o in plan.values()) == pytest.approx(best, abs=1e-9)


def test_allocate_names_the_minimum_budget():
    options = {"a": [Option("nf4", 100, 1.0)], "b": [Option("nf4", 50, 1.0)]}
    with pytest.raises(UsageError, match="150 bytes"):
        allocate(options, 149)


def test_weight_filter_skips_sparse_and_ranks_outliers():
    torch.manual_seed(0)
    dense, sparse, spiky = torch.randn(64, 64), torch.randn(64, 64), torch.randn(64, 64)
    sparse[:, :48] = 0
    spiky[::16, ::16] = 50.0
    stats = {
        n: weight_stats({"w.weight": w})
        for n, w in (("dense", dense), ("sparse", sparse), ("spiky", spiky))
    }

    assert stats["sparse"]["sparsity"] == pytest.approx(0.75)
    assert stats["spiky"]["outliers"] > stats["dense"]["outliers"]
    assert candidates(stats) == ["dense", "spiky"]
    assert candidates(stats, screen=0.5) == ["spiky"]


@pytest.fixture(scope="module")
def sensitive_pool(tmp_path_factory):
    """A small llama pool (256-wide, so 4-bit is cheaper than int8) whose layer 1 is made
    sensitive to 4-bit quantization by outliers."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        tie_word_embeddings=True,
    )
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # one outlier per 64 weights: 4-bit blocks flush the rest to 0
        for w in model.model.layers[1].parameters():
            if w.ndim == 2:
                w[:, ::64] = 20 * w.std() * torch.sign(w[:, ::64])
    src = tmp_path_factory.mktemp("sensitive")
    model.save_pretrained(src / "llama")
    build_pool([f"llama={src / 'llama'}"], src / "pool", dtype="fp32")
    return src / "pool"


def test_planner_prefers_the_sensitive_block_and_meets_its_budget(sensitive_pool, tmp_path):
    pool = Pool(sensitive_pool)
    ids = {"llama": torch.randint(0, 128, (16, 12))}
    measured = measure_blocks(pool, "llama", ids["llama"], ["nf4", "int8"], data_key="rand")
    nf4 = sum(m["nf4"]["bytes"] for m in measured.values())
    upgrade = {b: m["int8"]["bytes"] - m["nf4"]["bytes"] for b, m in measured.items()}
    budget = nf4 + upgrade["llama/layer/1"] + min(upgrade.values()) // 2  # one upgrade fits

    plan = plan_precisions(pool, ids, data_key="rand", choices=("nf4", "int8"), budget=budget)
    quantize_pool(pool, tmp_path / "auto", plan.precisions)

    assert measured["llama/layer/1"]["nf4"]["loss"] > 2 * measured["llama/layer/0"]["nf4"]["loss"]
    assert plan.precisions["llama/layer/1"] == "int8"
    assert plan.precisions["llama/layer/0"] == "nf4"
    written = summarize(Pool(tmp_path / "auto"))["bytes"]
    assert written == plan.bytes <= budget  # the plan's sizes are the files' sizes


def test_sensitivity_replays_the_model_and_caches(tiny_pool, tmp_path, monkeypatch):
    pool = Pool(tiny_pool)
    ids = torch.randint(0, 128, (6, 10))
    blocks = pool.model("gemma3").blocks

    inputs = capture_inputs(pool, "gemma3", ids, data_key="k", cache_dir=tmp_path)
    first = measure_blocks(pool, "gemma3", ids, ["fp32", "nf4"], data_key="k", cache_dir=tmp_path)
    monkeypatch.setattr("blockpool.quant.sensitivity._measure_block", pytest.fail)
    again = measure_blocks(pool, "gemma3", ids, ["fp32", "nf4"], data_key="k", cache_dir=tmp_path)

    assert set(inputs) == set(blocks) and torch.equal(inputs[blocks[0]], ids)
    assert inputs[blocks[1]].shape == (6, 10, 32)
    assert again == first
    assert all(first[b]["fp32"]["loss"] == 0 for b in blocks)  # the source precision
    assert all(first[b]["nf4"]["loss"] > 0 for b in blocks)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --precision P, or --auto"),
        (["--precision", "int8", "--auto", "--target-bits", "5"], "give --precision P"),
        (["--auto"], "exactly one of"),
        (["--auto", "--pool-budget", "lots"], "cannot read size"),
        (["--auto", "--target-bits", "1"], "(2, 32]"),
    ],
)
def test_quantize_cli_bad_input(tiny_pool, tmp_path, args, message):
    result = CliRunner().invoke(
        cli, ["quantize", str(tiny_pool), "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2
    assert message in result.stderr


# --------------------------------------------------------------------------- real checkpoints


@pytest.mark.real
@pytest.mark.slow
def test_real_int8_pool_keeps_perplexity(real_pool, heldout_file, tmp_path):
    from assy.evaluate import evaluate_pool_model

    quantize_pool(Pool(real_pool), tmp_path / "int8", "int8", models=["smollm2-135m"])
    scores = [
        evaluate_pool_model(
            root,
            "smollm2-135m",
            "perplexity",
            data=heldout_file,
            max_tokens=512,
            window=256,
            progress=False,
        )["perplexity"]
        for root in (real_pool, tmp_path / "int8")
    ]

    fp32 = summarize(Pool(real_pool))["models"]["smollm2-135m"]["bytes"]
    int8 = summarize(Pool(tmp_path / "int8"))["models"]["smollm2-135m"]["bytes"]
    assert int8 / (fp32 / 2) <= 0.52  # against the fp16 size
    assert abs(scores[1] / scores[0] - 1) < 0.01


@pytest.mark.real
@pytest.mark.slow
def test_real_auto_quantize_cli_meets_target_bits(real_pool, heldout_file, tmp_path):
    out = tmp_path / "auto"
    args = [
        "quantize",
        str(real_pool),
        "--out",
        str(out),
        "--auto",
        "--target-bits",
        "5",
        "--model",
        "smollm2-135m",
        "--calib-data",
        str(heldout_file),
        "--calib-samples",
        "4",
        "--choices",
        "nf4,int8",
        "--calib-seq-len",
        "32",
        "--json",
    ]

    result = CliRunner().invoke(cli, args)
    verified = CliRunner().invoke(cli, ["verify-pool", str(out)])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model = report["summary"]["models"]["smollm2-135m"]
    assert model["bits"] <= 5 and set(model["precisions"]) >= {"nf4", "int8"}
    assert report["plan"]["bytes"] == model["bytes"] <= report["plan"]["budget"]
    assert verified.exit_code == 0 and (out / "plan.json").is_file()
    assert any(p.suffix == ".safetensors" for p in (out / "calibration").iterdir())


def test_bitsandbytes_optional_kernel_warning_is_dropped_and_nothing_else(caplog):
    """On CPUs with AVX512-BF16 bitsandbytes' CPU backend warns, at load, that it could
    not fetch an optional kernel from a model hub; blockpool drops that one message."""
    import logging

    import blockpool  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make "
            "sure you already `pip install kernels` and the kernels >= 0.11.1",
            "No module named 'kernels'",
        )
        logger.warning("something new")
    assert [r.getMessage() for r in caplog.records] == ["something new"]
