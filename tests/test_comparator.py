"""Comparator: CKA and KL properties, activation capture, ``assy compare`` end to end."""

import json
import math
import shutil

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from assy.cli import cli
from assy.comparator import CompareOptions, compare_activations, compare_pool
from assy.comparator.capture import cached_capture, calibration_texts, capture_model, pool_tokens
from assy.comparator.metrics import (
    CKAAccumulator,
    cka_matrix,
    clip_outlier_features,
    compatibility,
    kl_divergence,
    kl_matrix,
    linear_cka,
    standardize_features,
)
from blockpool import BlockRunner, Pool, RunOptions, build_pool

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _related(n=60, d1=24, d2=16, seed=0):
    """Two representations of the same examples that share some structure."""
    g = _gen(seed)
    x = torch.randn(n, d1, generator=g, dtype=F64) + 2.0
    y = torch.tanh(x @ torch.randn(d1, d2, generator=g, dtype=F64) / 4)
    return x, y + 0.5 * torch.randn(n, d2, generator=g, dtype=F64)


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=F64))
    return q


# ------------------------------------------------------------------ CKA: brute force reference


def _hsic1_gram(k, lg):
    """Song et al. 2012 eq. 5, literally: Grams with zeroed diagonals, n×n products."""
    n = k.shape[0]
    k, lg = k.clone().fill_diagonal_(0), lg.clone().fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=k.dtype)
    term2 = (one.T @ k @ one) * (one.T @ lg @ one) / ((n - 1) * (n - 2))
    term3 = 2 / (n - 2) * (one.T @ k @ lg @ one)
    return ((torch.trace(k @ lg) + term2 - term3) / (n * (n - 3))).item()


def _cka_gram(x, y, unbiased=True):
    k, lg = x @ x.T, y @ y.T
    if not unbiased:
        h = torch.eye(x.shape[0], dtype=x.dtype) - 1 / x.shape[0]
        k, lg = h @ k @ h, h @ lg @ h
        return ((k * lg).sum() / torch.sqrt((k * k).sum() * (lg * lg).sum())).item()
    return _hsic1_gram(k, lg) / math.sqrt(_hsic1_gram(k, k) * _hsic1_gram(lg, lg))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_agrees_with_brute_force_gram_formula(seed, unbiased):
    x, y = _related(n=30, seed=seed)
    assert linear_cka(x, y, unbiased) == pytest.approx(_cka_gram(x, y, unbiased), abs=1e-5)
    # float32 inputs accumulate in float64 just as well
    assert linear_cka(x.float(), y.float(), unbiased) == pytest.approx(
        _cka_gram(x, y, unbiased), abs=1e-5
    )


@pytest.mark.parametrize("batch_size", [1, 7, 32, 1000])
def test_minibatch_accumulation_equals_full_computation(batch_size):
    x, y = _related(n=101, seed=3)
    full = _cka_gram(x, y)
    assert linear_cka(x, y, batch_size=batch_size) == pytest.approx(full, abs=1e-10)
    acc = CKAAccumulator()
    for chunk in torch.arange(101).split(batch_size):
        acc.update(x[chunk], y[chunk])
    assert acc.n == 101
    assert acc.value() == pytest.approx(full, abs=1e-10)
    assert acc.value(unbiased=False) == pytest.approx(_cka_gram(x, y, False), abs=1e-10)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_of_a_representation_with_itself_is_one(unbiased):
    x, _ = _related(seed=4)
    assert linear_cka(x, x, unbiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x.clone(), unbiased, batch_size=5) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_invariant_to_orthogonal_transforms_and_isotropic_scaling(unbiased):
    x, y = _related(seed=5)
    base = linear_cka(x, y, unbiased)
    moved = 3.7 * x @ _orthogonal(x.shape[1], 6)
    assert linear_cka(moved, y, unbiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 0.01 * y @ _orthogonal(y.shape[1], 7), unbiased) == pytest.approx(
        base, abs=1e-10
    )
    assert linear_cka(x, moved + 5.0, unbiased) == pytest.approx(1.0, abs=1e-10)


def test_cka_not_invariant_to_arbitrary_linear_maps():
    x = torch.randn(200, 10, generator=_gen(8), dtype=F64)
    stretch = torch.diag(torch.tensor([30.0] + [1.0] * 9, dtype=F64))
    assert linear_cka(x, x @ stretch) < 0.5
    mixed = x @ torch.randn(10, 10, generator=_gen(9), dtype=F64)
    assert linear_cka(x, mixed) < 0.95


def test_cka_near_zero_for_independent_data_and_unbiased_where_biased_is_not():
    g = _gen(10)
    x, y = torch.randn(2000, 40, generator=g), torch.randn(2000, 40, generator=g)
    assert abs(linear_cka(x, y)) < 0.03
    # hidden size > sample count: the biased estimator drifts far from 0, HSIC_1 does not
    x, y = torch.randn(64, 600, generator=g), torch.randn(64, 600, generator=g)
    assert linear_cka(x, y, unbiased=False) > 0.5
    assert abs(linear_cka(x, y)) < 0.1


def test_cka_matrix_equals_pairwise_and_is_tile_independent():
    x, y = _related(n=50, seed=11)
    reps = [x, y, x[:, :5], torch.randn(50, 3, generator=_gen(12), dtype=F64)]
    pairwise = torch.tensor([[linear_cka(a, b) for b in reps] for a in reps], dtype=F64)
    torch.testing.assert_close(cka_matrix(reps, tile=7), pairwise, atol=1e-10, rtol=0)
    torch.testing.assert_close(cka_matrix(reps, tile=500), pairwise, atol=1e-10, rtol=0)
    biased = torch.tensor([[linear_cka(a, b, False) for b in reps] for a in reps], dtype=F64)
    torch.testing.assert_close(cka_matrix(reps, False, tile=16), biased, atol=1e-10, rtol=0)


def test_cka_bad_inputs():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="pair examples by row"):
        linear_cka(x, torch.randn(9, 3))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3])
    assert math.isnan(linear_cka(x, torch.ones(10, 2)))  # no variance: undefined


# ------------------------------------------------------------------ preprocessing


def test_standardize_and_clip_tame_massive_activation_dimensions():
    g = _gen(13)
    shared = torch.randn(300, 20, generator=g)
    x = torch.cat([shared, torch.randn(300, 2, generator=g) * 200], 1)  # 2 massive dims
    y = shared @ _orthogonal(20, 14).float()
    assert linear_cka(x, y) < 0.1
    z = standardize_features(x)
    torch.testing.assert_close(z.std(0), torch.ones(22), atol=1e-4, rtol=0)
    assert linear_cka(z, y) > 0.85
    clipped = clip_outlier_features(x, k=2.0)
    assert clipped.std(0).max() <= 2.0 * x.std(0).median() * 1.0001
    torch.testing.assert_close(clipped[:, :20], x[:, :20])
    assert linear_cka(clipped, y) > 0.5


# ------------------------------------------------------------------ KL and compatibility


def test_kl_zero_for_identical_and_grows_with_shift():
    x = torch.randn(400, 16, generator=_gen(15))
    assert kl_divergence(x, x) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(x, x.clone(), standardize=False) == pytest.approx(0.0, abs=1e-12)
    shifts = [kl_divergence(x, x + s, standardize=False) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts) and shifts[-1] > 1.0
    # standardized (the default): affine changes do not count, shape changes do
    assert kl_divergence(x, 5 * x + 3) == pytest.approx(0.0, abs=1e-3)
    heavy = x * torch.where(torch.rand(x.shape, generator=_gen(16)) < 0.05, 8.0, 1.0)
    assert kl_divergence(x, heavy) > 0.1


def test_kl_finite_for_disjoint_values_and_symmetric_option():
    x, y = torch.zeros(100, 4), torch.ones(100, 4) * 10
    assert math.isfinite(kl_divergence(x, y, standardize=False))
    a, b = torch.randn(300, 8, generator=_gen(17)), torch.rand(300, 8, generator=_gen(18))
    sym = kl_divergence(a, b, symmetric=True)
    assert sym == pytest.approx(kl_divergence(b, a, symmetric=True), abs=1e-12)
    expected = (kl_divergence(a, b) + kl_divergence(b, a)) / 2
    assert sym == pytest.approx(expected, abs=1e-12)
    matrix = kl_matrix([a, b], [b, a])
    assert matrix[0, 0].item() == pytest.approx(kl_divergence(a, b), abs=1e-12)
    assert matrix[0, 1].item() == pytest.approx(0.0, abs=1e-12)


def test_compatibility_combines_cka_and_kl():
    cka, kl = torch.tensor([1.0, 0.2]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(
        compatibility(cka, kl), torch.tensor([1.0, 0.1 + 0.5 * math.exp(-1)])
    )
    torch.testing.assert_close(compatibility(cka, kl, weight=1.0), cka)
    with pytest.raises(ValueError, match="weight"):
        compatibility(cka, kl, weight=1.5)


# ------------------------------------------------------------------ token pooling


def test_pool_tokens_is_mask_aware():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    mean = pool_tokens(hidden, mask)
    torch.testing.assert_close(mean[1], hidden[1, :2].mean(0))
    torch.testing.assert_close(pool_tokens(hidden, mask, skip_first=1)[1], hidden[1, 1])
    torch.testing.assert_close(pool_tokens(hidden, mask, "last")[1], hidden[1, 1])
    torch.testing.assert_close(pool_tokens(hidden, mask, "last")[0], hidden[0, 3])


# ------------------------------------------------------------------ capture on tiny pools

WORDS = ["the", "a", "cat", "dog", "runs", "sleeps", "on", "mat", "big", "red", "sun", "sky"]


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 2)]
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]"
    )


def _texts(n, seed=0):
    g = _gen(seed)
    lengths = torch.randint(2, 12, (n,), generator=g).tolist()
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g)) for k in lengths
    ]


@pytest.fixture(scope="module")
def tiny_pool(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    sources = []
    for family in ("llama", "gemma3", "bert"):
        src = root / family
        shutil.copytree(tiny_dirs[family], src)
        _tokenizer().save_pretrained(src)
        sources.append(f"{family}={src}")
    build_pool(sources, root / "pool", dtype="fp32")
    return root / "pool"


def test_capture_matches_transformers_hidden_states(tiny_pool, tiny_dirs):
    texts = _texts(9)
    acts = capture_model(Pool(tiny_pool), "llama", texts, batch_size=4, progress=False)
    assert acts.inputs.shape == acts.outputs.shape == (2, 9, 32)
    torch.testing.assert_close(acts.inputs[1], acts.outputs[0], atol=0, rtol=0)
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    tok = _tokenizer()
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")
        with torch.inference_mode():
            states = hf(**ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(acts.inputs[0, i], states[0][0, 1:].mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(acts.outputs[0, i], states[1][0, 1:].mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["gemma3", "bert"])
def test_capture_is_independent_of_batching_and_padding(tiny_pool, model):
    pool, texts = Pool(tiny_pool), _texts(7, seed=1)
    one = capture_model(pool, model, texts, batch_size=1, progress=False)
    many = capture_model(pool, model, texts, batch_size=4, pooling="mean", progress=False)
    torch.testing.assert_close(one.outputs, many.outputs, atol=1e-5, rtol=1e-5)
    last = capture_model(pool, model, texts[2:4], batch_size=2, pooling="last", progress=False)
    alone = capture_model(pool, model, texts[3:4], pooling="last", progress=False)
    torch.testing.assert_close(last.outputs[:, 1], alone.outputs[:, 0], atol=1e-5, rtol=1e-5)


def test_capture_fetch_passes_through_and_skips_the_head(tiny_pool):
    pool, fetched = Pool(tiny_pool), []

    def fetch(bid):
        fetched.append(bid)
        return pool.build_module(bid)

    runner = BlockRunner(pool, "llama", fetch=fetch)
    capture_model(pool, "llama", _texts(3), runner=runner, progress=False)
    kinds = {pool.blocks[b].kind for b in fetched}
    assert kinds == {"embed", "layer"}


def test_cache_is_reused_and_keyed_by_samples(tiny_pool, tmp_path):
    pool, texts = Pool(tiny_pool), _texts(6)
    first, path, reused = cached_capture(pool, "bert", texts, tmp_path, progress=False)
    assert not reused and path.is_file()
    again, path2, reused2 = cached_capture(pool, "bert", texts, tmp_path, progress=False)
    assert reused2 and path2 == path
    torch.testing.assert_close(again.outputs, first.outputs, atol=0, rtol=0)
    _, path3, reused3 = cached_capture(pool, "bert", texts[:5], tmp_path, progress=False)
    assert not reused3 and path3 != path


def test_compare_pool_writes_matrices_heatmaps_and_seams(tiny_pool, tmp_path):
    result = compare_pool(tiny_pool, tmp_path, _texts(12), top=5, progress=False)
    assert result["layer_blocks"] == 2 + 3 + 2
    assert len(result["files"]["heatmaps"]) == 6  # 3 models: 3 self pairs + 3 cross pairs
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert doc["options"]["preprocess"] == "none" and doc["options"]["skip_first"] == 1
    tensors = load_file(tmp_path / "matrices.safetensors")
    assert tensors["compatibility"].shape == (7, 7)
    blocks = doc["blocks"]
    a, b = blocks.index("gemma3/layer/0"), blocks.index("gemma3/layer/1")
    assert doc["cka"][a][b] == pytest.approx(1.0) and doc["kl"][a][b] == pytest.approx(0.0)
    assert doc["compatibility"][a][b] == pytest.approx(1.0)
    for seam in result["top_seams"]:
        assert seam["from"].split("/")[0] != seam["to"].split("/")[0]
    scores = [s["compatibility"] for s in result["top_seams"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    again = compare_pool(tiny_pool, tmp_path, _texts(12), progress=False)
    assert all(c["reused"] for c in again["cache"])


def test_compare_under_a_budget_matches_resident_run(tiny_pool, tmp_path):
    from blockpool.offload import min_budget

    pool, texts = Pool(tiny_pool), _texts(8)
    budget = max(min_budget(pool, m, batch=8, tokens=16) for m in ("llama", "bert"))
    kw = dict(models=["llama", "bert"], progress=False)
    free = compare_pool(tiny_pool, tmp_path / "free", texts, **kw)
    tight_run = RunOptions(budget=budget, policy="lru")
    tight = compare_pool(tiny_pool, tmp_path / "tight", texts, run=tight_run, **kw)
    for entry in tight["cache"]:
        assert entry["swap"]["weights_resident_peak_bytes"] <= budget
    a = load_file(tmp_path / "free" / "matrices.safetensors")
    b = load_file(tmp_path / "tight" / "matrices.safetensors")
    torch.testing.assert_close(a["cka"], b["cka"], atol=1e-6, rtol=0)
    assert free["budget"] is None and tight["budget"] == budget


def test_compare_activations_records_preprocessing(tiny_pool):
    pool, texts = Pool(tiny_pool), _texts(10)
    acts = [capture_model(pool, m, texts, progress=False) for m in ("llama", "bert")]
    plain = compare_activations(acts, CompareOptions())
    std = compare_activations(acts, CompareOptions(preprocess="standardize", weight=1.0))
    assert std.options.preprocess == "standardize"
    torch.testing.assert_close(std.compatibility, std.cka)
    assert not torch.allclose(plain.cka, std.cka)


# ------------------------------------------------------------------ the command


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_compare_command_json(tiny_pool, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(_texts(10)) + "\n\n")
    result = _run(
        "compare",
        tiny_pool,
        "--models",
        "llama,gemma3",
        "--data",
        data,
        "--out",
        tmp_path / "o",
        "--top",
        "3",
        "--preprocess",
        "clip",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["models"] == ["llama", "gemma3"] and summary["samples"] == 10
    assert summary["options"]["preprocess"] == "clip" and len(summary["top_seams"]) == 3
    text = _run("compare", tiny_pool, "--data", data, "--out", tmp_path / "o", "--samples", "8")
    assert text.exit_code == 0, text.output
    assert "most compatible cross-model seams" in text.output


@pytest.mark.parametrize(
    "args, words",
    [
        ((), ["--task", "--data"]),
        (("--task", "piqa", "--data", "x.txt"), ["exactly one"]),
        (("--data", "{texts}", "--models", "nope"), ["nope", "llama"]),
        (("--data", "{texts}", "--weight", "2"), ["--weight"]),
        (("--data", "{texts}", "--samples", "2"), ["--samples"]),
        (("--data", "{missing}"), ["no such file"]),
        (("--data", "{texts}", "--skip-first", "20"), ["none left after --skip-first"]),
    ],
)
def test_compare_command_user_errors(tiny_pool, tmp_path, args, words):
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(_texts(8)))
    args = [a.format(texts=texts, missing=tmp_path / "missing.txt") for a in args]
    result = _run("compare", tiny_pool, *args, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    for word in words:
        assert word in result.output


def test_calibration_texts_from_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b"}\n{"context": "c d", "choices": ["x"], "label": 0}\n')
    assert calibration_texts(data=path, samples=10) == ["a b", "c d"]
    path.write_text('{"other": 1}\n')
    with pytest.raises(Exception, match='"text"'):
        calibration_texts(data=path)


# ------------------------------------------------------------------ the real checkpoints


@pytest.mark.real
@pytest.mark.slow
def test_real_pool_structure(real_pool, tmp_path):
    texts = calibration_texts(task="piqa", samples=32)
    result = compare_pool(
        real_pool,
        tmp_path,
        texts,
        models=["smollm2-135m", "gemma3-270m"],
        max_tokens=32,
        progress=False,
    )
    doc = json.loads((tmp_path / "compare.json").read_text())
    cka = torch.tensor(doc["cka"], dtype=F64)
    smol = [i for i, m in enumerate(doc["models"]) if m == "smollm2-135m"]
    gemma = [i for i, m in enumerate(doc["models"]) if m == "gemma3-270m"]
    for rows in (smol, gemma):
        own = cka[rows][:, rows]  # own[a, b] = CKA(h[a + 1], h[b]): depth gap |a + 1 - b|
        gap = (torch.arange(len(rows))[:, None] + 1 - torch.arange(len(rows))[None]).abs()
        assert own[gap == 1].mean() > own[gap >= len(rows) // 2].mean() + 0.1
    cross = cka[smol][:, gemma]
    assert cross.max() - cross.min() > 0.5 and cross.std() > 0.1  # structure, not flat
    # DESIGN: SmolLM2's hidden states 3–9 (inputs of layers 3–9) form a block of their own
    block = cka[smol][2:9][:, smol][:, 3:10]
    assert block.min() > 0.85 and cka[smol][2:9][:, gemma].max() < 0.5
    assert len(result["files"]["heatmaps"]) == 3
