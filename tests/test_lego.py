"""LEGO building blocks: pruning into pool variants, sparsity-preserving LoRA, HeteAgg."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig
from safetensors.torch import save_file
from tiny_models import TINY

from assy.cli import cli
from assy.errors import UsageError
from assy.lego import (
    fedavg,
    heteagg,
    heteagg_exact,
    heteagg_write_back,
    magnitude_mask,
    parse_sparsity,
    prune_pool_model,
    sparsegpt_prune,
    wanda_mask,
)
from assy.lego.heteagg import lora_pairs, svd_refactor
from assy.lego.lora import (
    PoolModule,
    apply_sparse_lora,
    load_sparse_lora,
    masked_delta,
    write_merged_model,
)
from assy.lego.pruning import _inverse_hessian_chol, _keep_lowest_dropped, _nm_keep
from assy.lego.sequential import prunable_linears
from blockpool import BlockRunner, Pool, build_pool

FAMILIES = sorted(TINY)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spinning costs 3-10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _char_tokenizer():
    """A character-level tokenizer within the tiny models' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(i): i - 31 for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tiny_pool_src(tiny_dirs, tmp_path_factory):
    """A read-only fp32 pool of every tiny family plus an outlier-feature Llama."""
    root = tmp_path_factory.mktemp("lego") / "pool"
    torch.manual_seed(0)
    model = TINY["llama"]().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # real LLMs have a few large input features: give them some
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.exp(torch.randn(norm.weight.shape, generator=g)))
    model.save_pretrained(root.parent / "outlier")
    _char_tokenizer().save_pretrained(root.parent / "outlier")
    sources = [f"{f}={d}" for f, d in tiny_dirs.items()] + [f"outlier={root.parent / 'outlier'}"]
    build_pool(sources, root, dtype="fp32")
    return root


@pytest.fixture
def tiny_pool(tiny_pool_src, tmp_path):
    shutil.copytree(tiny_pool_src, tmp_path / "pool")
    return tmp_path / "pool"


def _calib(n=16, t=24, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _layer_weights(pool, model):
    """``(block id, name, [out, in]-or-stored weight)`` of every prunable matrix."""
    for bid in pool.model(model).blocks:
        if pool.blocks[bid].kind != "layer":
            continue
        layer = pool.build_module(bid)
        for name, mod in prunable_linears(layer).items():
            yield bid, name, mod.weight.detach()


# --------------------------------------------------------------------------- sparsity spec


def test_parse_sparsity():
    assert parse_sparsity("0.5").fraction == 0.5 and parse_sparsity("0.5").nm is None
    t = parse_sparsity("2:4")
    assert t.nm == (2, 4) and t.fraction == 0.5 and str(t) == "2:4"
    for bad in ("1.0", "-0.1", "4:2", "0:4", "half"):
        with pytest.raises(UsageError):
            parse_sparsity(bad)


# --------------------------------------------------------------------------- pure masks


def test_masks_on_a_hand_example():
    w = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    half = parse_sparsity("0.5")
    # magnitude: the two smallest |w| of the whole matrix go
    assert magnitude_mask(w, half).tolist() == [[False, True], [True, False]]
    # Wanda: |w| * ||x|| = [[3, 2], [9, 1]], the smaller of each row goes
    assert wanda_mask(w, torch.tensor([3.0, 1.0]), half).tolist() == [[True, False], [True, False]]


def test_lowest_dropped_is_exact_with_ties():
    scores = torch.tensor([[0.0, 0, 0, 1, 2], [3, 1, 1, 1, 0]])
    keep = _keep_lowest_dropped(scores, 2)
    assert keep.tolist() == [[False, False, True, True, True], [True, False, True, True, False]]
    assert (~_keep_lowest_dropped(scores, 4)).sum(1).tolist() == [4, 4]


@pytest.mark.parametrize("sparsity", ["0.25", "0.5", "0.75", "2:4", "1:4"])
def test_masks_reach_the_requested_sparsity(sparsity):
    torch.manual_seed(0)
    w, norms = torch.randn(48, 64), torch.rand(64)
    target = parse_sparsity(sparsity)
    x = torch.randn(256, 64)
    keeps = [
        magnitude_mask(w, target),
        wanda_mask(w, norms, target),
        sparsegpt_prune(w, x.T @ x, target)[1],
    ]
    for keep in keeps:
        assert abs((~keep).float().mean().item() - target.fraction) < 1e-9
        if target.nm:
            n, m = target.nm
            assert (keep.reshape(48, -1, m).sum(-1) == n).all()


def _sparsegpt_reference(w, h, target, blocksize=128, damp=0.01):
    """The reference ``SparseGPT.fasterprune`` loop, transcribed (exact-k mask selection)."""
    w, h = w.clone().float(), h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_hessian_chol(h, damp)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if target.nm is None:
            tmp = w1**2 / torch.diag(hinv1).reshape(1, -1) ** 2
            k = round(target.fraction * tmp.numel())
            mask1 = ~_keep_lowest_dropped(tmp.reshape(1, -1), k).reshape(tmp.shape)
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            if target.nm and i % target.nm[1] == 0:
                m = target.nm[1]
                tmp = w1[:, i : i + m] ** 2 / torch.diag(hinv1)[i : i + m].reshape(1, -1) ** 2
                mask1[:, i : i + m] = ~_nm_keep(tmp, target.nm)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


@pytest.mark.parametrize("sparsity", ["0.5", "0.75", "2:4"])
def test_sparsegpt_matches_the_reference_loop(sparsity):
    torch.manual_seed(0)
    w = torch.randn(40, 160)
    x = torch.randn(512, 160) * torch.rand(160) * 3
    target = parse_sparsity(sparsity)
    ours, keep = sparsegpt_prune(w, x.T @ x, target, block_size=64)
    ref = _sparsegpt_reference(w, x.T @ x, target, blocksize=64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours == 0, ~keep)


def test_sparsegpt_stacked_rows_equal_separate_matrices():
    torch.manual_seed(0)
    a, b, x = torch.randn(24, 64), torch.randn(8, 64), torch.randn(256, 64)
    h = x.T @ x
    target = parse_sparsity("0.5")
    stacked = sparsegpt_prune(torch.cat([a, b]), h, target, row_groups=(24, 8))[0]
    torch.testing.assert_close(stacked[:24], sparsegpt_prune(a, h, target)[0])
    torch.testing.assert_close(stacked[24:], sparsegpt_prune(b, h, target)[0])


def test_layer_reconstruction_error_orders_the_methods():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(1024, 128) * torch.exp(torch.randn(128))  # heterogeneous feature scales
    target = parse_sparsity("0.5")

    def err(pruned):
        return ((x @ w.T - x @ pruned.T).norm() / (x @ w.T).norm()).item()

    e_mag = err(w * magnitude_mask(w, target))
    e_wanda = err(w * wanda_mask(w, x.norm(dim=0), target))
    e_sgpt = err(sparsegpt_prune(w, x.T @ x, target)[0])
    assert e_sgpt < e_wanda < e_mag


# --------------------------------------------------------------------------- pool pruning


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_every_family_reaches_the_sparsity(tiny_pool, family, method):
    pool = Pool(tiny_pool)
    target = parse_sparsity("0.5")

    ids = None if method == "magnitude" else _calib()

    report = prune_pool_model(pool, family, method, target, "pruned", calib_ids=ids)

    pool = Pool(tiny_pool)
    assert pool.verify() == []
    matrices = list(_layer_weights(pool, "pruned"))
    assert len(matrices) == sum(r["matrices"] for r in report.layers) > 0
    for _, _, w in matrices:
        assert abs((w == 0).float().mean().item() - 0.5) <= 0.005
    for src, bid in zip(pool.model(family).blocks, pool.model("pruned").blocks, strict=True):
        entry = pool.blocks[bid]
        assert entry.parent.block == src
        expected = 0.5 if entry.kind == "layer" else 0.0
        assert entry.sparsity == pytest.approx(expected, abs=0.005)
    assert pool.model("pruned").parent_model == family
    runner = BlockRunner(pool, "pruned")
    assert torch.isfinite(runner.forward(_calib(2, 8)).hidden).all()


@pytest.mark.parametrize("sparsity", ["0.25", "0.75", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_any_sparsity(tiny_pool, method, sparsity):
    pool = Pool(tiny_pool)
    target = parse_sparsity(sparsity)
    ids = None if method == "magnitude" else _calib()
    prune_pool_model(pool, "llama", method, target, "pruned", calib_ids=ids)
    for _, _, w in _layer_weights(Pool(tiny_pool), "pruned"):
        assert abs((w == 0).float().mean().item() - target.fraction) <= 0.005
        if target.nm:
            n, m = target.nm
            assert ((w != 0).reshape(w.shape[0], -1, m).sum(-1) == n).all()


def test_wanda_calibrates_on_the_pruned_layers_before(tiny_pool):
    pool = Pool(tiny_pool)
    ids = _calib()
    prune_pool_model(pool, "outlier", "wanda", parse_sparsity("0.5"), "w", calib_ids=ids)
    pool = Pool(tiny_pool)
    runner = BlockRunner(pool, "w")  # layer 1's inputs: through the *pruned* layer 0
    blocks = pool.model("w").blocks
    seen = {}
    dense1 = pool.build_module(pool.model("outlier").blocks[2])

    def keep_input(name):
        def hook(_mod, args, _out):
            seen.setdefault(name, args[0])

        return hook

    hooks = [m.register_forward_hook(keep_input(n)) for n, m in prunable_linears(dense1).items()]
    with torch.no_grad():
        h = runner.run_block(blocks[0], ids)
        h = runner.run_block(blocks[1], h)
        dense1(h, **runner.layer_kwargs(blocks[1], h))
    for hook in hooks:
        hook.remove()
    pruned1 = dict(prunable_linears(pool.build_module(blocks[2])).items())
    for name, mod in prunable_linears(dense1).items():
        x = seen[name].reshape(-1, seen[name].shape[-1])
        keep = wanda_mask(mod.weight, x.norm(dim=0), parse_sparsity("0.5"))
        assert torch.equal(keep, pruned1[name].weight != 0), name


def test_wanda_and_sparsegpt_beat_magnitude_on_a_tiny_model(tiny_pool):
    pool = Pool(tiny_pool)
    test_ids = _calib(8, 24, seed=5)
    dense = BlockRunner(pool, "outlier").forward(test_ids).hidden
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        ids = None if method == "magnitude" else _calib()
        prune_pool_model(pool, "outlier", method, parse_sparsity("0.5"), method, calib_ids=ids)
        hidden = BlockRunner(Pool(tiny_pool), method).forward(test_ids).hidden
        errors[method] = ((hidden - dense).norm() / dense.norm()).item()
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["wanda"] < errors["magnitude"]


def test_prune_user_errors(tiny_pool):
    pool = Pool(tiny_pool)
    half = parse_sparsity("0.5")
    with pytest.raises(UsageError, match="calibration"):
        prune_pool_model(pool, "llama", "wanda", half, "x")
    ignored = prune_pool_model(pool, "llama", "magnitude", half, "m0", calib_ids=_calib())
    assert ignored.calibration_tokens == 0  # magnitude pruning ignores calibration
    with pytest.raises(UsageError, match="already has a model"):
        prune_pool_model(pool, "llama", "magnitude", half, "gpt2")
    with pytest.raises(UsageError, match="unknown pruning method"):
        prune_pool_model(pool, "llama", "random", half, "x")
    with pytest.raises(UsageError, match="budget"):
        prune_pool_model(
            pool, "llama", "wanda", half, "x", calib_ids=_calib(), activation_budget_bytes=100
        )
    with pytest.raises(UsageError, match="divisible"):
        prune_pool_model(pool, "llama", "magnitude", parse_sparsity("2:5"), "x")
    manifest = json.loads((tiny_pool / "pool.json").read_text())
    for bid in manifest["models"]["llama"]["blocks"]:
        manifest["blocks"][bid]["precision"] = "int8"
    (tiny_pool / "pool.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="full-precision"):
        prune_pool_model(Pool(tiny_pool), "llama", "magnitude", half, "x")


def test_prune_cli(tiny_pool, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 20)
    args = ["prune", str(tiny_pool), "--model", "outlier", "--method", "sparsegpt"]
    args += ["--sparsity", "2:4", "--calib-data", str(text), "--samples", "8", "--seq-len", "32"]
    args += ["--as", "o24"]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    assert "o24: sparsegpt 2:4 of 14 matrices in 2 layers, sparsity 0.5000" in result.output
    assert "256 calibration tokens" in result.output
    info = CliRunner().invoke(cli, ["inspect", str(tiny_pool)])
    assert "o24" in info.output


def test_prune_cli_calibration_defaults_and_notes(tiny_pool):
    base = ["prune", str(tiny_pool), "--model", "outlier", "--sparsity", "0.5"]
    base += ["--samples", "4", "--seq-len", "16"]
    wanda = CliRunner().invoke(cli, [*base, "--method", "wanda", "--as", "w"])
    assert wanda.exit_code == 0, wanda.output
    assert "64 calibration tokens of task sciq (default)" in wanda.output
    magnitude = [*base, "--method", "magnitude", "--as", "m", "--calib-file", __file__]
    result = CliRunner().invoke(cli, magnitude)
    assert result.exit_code == 0, result.output
    assert "uses no calibration" in result.stderr and "no calibration" in result.stdout
    assert "--calib-file is deprecated, use --calib-data" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "magnitude", "--sparsity", "1.5"], "fraction"),
        (["--method", "magnitude", "--sparsity", "0.5", "--model", "nope"], "no model 'nope'"),
    ],
)
def test_prune_cli_errors(tiny_pool, args, message):
    base = ["prune", str(tiny_pool), "--as", "x"]
    if "--model" not in args:
        base += ["--model", "llama"]
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code == 2
    assert message in result.output and "error:" in result.output


def test_prune_cli_magnitude_json(tiny_pool):
    result = CliRunner().invoke(
        cli,
        [
            "prune",
            str(tiny_pool),
            "--model",
            "llama",
            "--method",
            "magnitude",
            "--sparsity",
            "0.75",
            "--as",
            "m75",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sparsity"] == pytest.approx(0.75, abs=0.005)
    info = CliRunner().invoke(cli, ["inspect", str(tiny_pool), "--json"])
    blocks = json.loads(info.output)["models"]["m75"]["blocks"]
    assert [b["sparsity"] for b in blocks if b["kind"] == "layer"] == pytest.approx([0.75, 0.75])


# --------------------------------------------------------------------------- sparse LoRA


def _lm_steps(model, steps=4, seed=0):
    """A few AdamW steps of next-token loss on random tokens."""
    ids = _calib(4, 16, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    model.train()
    for _ in range(steps):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _matrices(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.dim() == 2}


def test_masked_delta_is_zero_where_masked():
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    mask = torch.rand(5, 6) > 0.5
    delta = masked_delta(a, b, mask, 2.0)
    assert torch.equal(delta == 0, ~mask | (b @ a == 0))
    torch.testing.assert_close(delta[mask], (2.0 * b @ a)[mask])


@pytest.mark.parametrize(
    ("family", "targets"),
    [
        ("outlier", ["q_proj", "v_proj", "down_proj"]),
        ("gpt2", ["c_attn", "c_fc"]),  # Conv1D: weights stored [in, out] (fan_in_fan_out)
    ],
)
def test_sparse_lora_training_and_merge_keep_the_zeros(tiny_pool, tmp_path, family, targets):
    pool = Pool(tiny_pool)
    prune_pool_model(pool, family, "wanda", parse_sparsity("0.5"), "sparse", calib_ids=_calib())
    pool = Pool(tiny_pool)
    model = PoolModule(pool, "sparse")
    before = _matrices(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1)
    config.fan_in_fan_out = family == "gpt2"
    peft_model = apply_sparse_lora(model, config)

    _lm_steps(peft_model)
    ids = _calib(2, 12, seed=9)
    with torch.no_grad():
        trained = peft_model(ids)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()

    after = _matrices(merged)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "training must change some weights"
    for name in before:
        assert torch.equal(before[name] == 0, after[name] == 0), name
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), trained, atol=1e-5, rtol=1e-5)
    reloaded = load_sparse_lora(PoolModule(pool, "sparse"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), trained, atol=1e-5, rtol=1e-5)
    write_merged_model(pool, "sparse", merged, "tuned")
    pool = Pool(tiny_pool)
    for src, new in zip(pool.model("sparse").blocks, pool.model("tuned").blocks, strict=True):
        assert pool.blocks[new].sparsity == pytest.approx(pool.blocks[src].sparsity)
        assert pool.blocks[new].parent.block == src


def test_vanilla_lora_would_densify(tiny_pool):
    """The control: without the mask, a merged LoRA update fills the pruned zeros."""
    from peft import get_peft_model

    pool = Pool(tiny_pool)
    prune_pool_model(pool, "llama", "magnitude", parse_sparsity("0.5"), "sparse")
    model = PoolModule(Pool(tiny_pool), "sparse")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    _lm_steps(peft_model, steps=2)
    merged = peft_model.merge_and_unload()
    q = merged.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean() < 0.01


def test_sparse_lora_refuses_dora(tiny_pool):
    model = PoolModule(Pool(tiny_pool), "llama")
    with pytest.raises(UsageError, match="use_dora"):
        apply_sparse_lora(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))


# --------------------------------------------------------------------------- HeteAgg


def test_heteagg_hand_computed_example():
    g = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    c1 = {"w": torch.tensor([2.0, 0.0, 4.0, 0.0]), "extra": torch.tensor([7.0])}
    c2 = {"w": torch.tensor([4.0, 0.0, 0.0, 0.0])}

    new_g, (n1, n2) = heteagg(g, [c1, c2])

    # sums [6, 0, 4, 0], counts [2, 0, 1, 0]: entries 1 and 3 keep the global's 2 and 4
    assert new_g["w"].tolist() == [3.0, 2.0, 4.0, 4.0]
    assert n1["w"].tolist() == [3.0, 0.0, 4.0, 0.0] and n1["extra"].tolist() == [7.0]
    assert n2["w"].tolist() == [3.0, 0.0, 0.0, 0.0]


def _algorithm2(g, clients):
    """Algorithm 2 of the LEGO paper, line by line (global kept where no client counts)."""
    sums = {p: torch.zeros_like(v) for p, v in g.items()}
    counts = {p: torch.zeros_like(v) for p, v in g.items()}
    for s_i in clients:
        for p in g:
            m_i = s_i[p] != 0
            sums[p] = sums[p] + torch.where(m_i, s_i[p], torch.zeros_like(s_i[p]))
            counts[p] = counts[p] + m_i
    avg = {p: sums[p] / torch.clamp(counts[p], min=1) for p in g}
    new_g = {p: torch.where(counts[p] > 0, avg[p], g[p]) for p in g}
    new_c = [{p: torch.where(s[p] != 0, avg[p], s[p]) for p in g} for s in clients]
    return new_g, new_c


def _sparse_clients(n, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(n):
        keep = 1 - 0.25 * (i % 4)  # 0/25/50/75% sparsity, as LEGO's four SLM sizes
        clients.append(
            {
                k: torch.randn(s, generator=gen) * (torch.rand(s, generator=gen) < keep)
                for k, s in shapes.items()
            }
        )
    return clients


def test_heteagg_equals_algorithm2_on_random_sparse_tensors(tmp_path):
    shapes = {"a.lora_A.weight": (4, 12), "a.lora_B.weight": (10, 4), "b": (7,)}
    gen = torch.Generator().manual_seed(1)
    g = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    clients = _sparse_clients(6, shapes)
    clients[3]["b"][:3] = 0.0
    clients[1]["b"][:3] = 0.0  # clients 1, 3 (and 5 maybe) zero: some entries with no count
    for c in clients:
        c["b"][:2] = 0.0  # no client counts there: the global keeps its value

    new_g, new_c = heteagg(g, clients)
    ref_g, ref_c = _algorithm2(g, clients)

    for p in g:
        torch.testing.assert_close(new_g[p], ref_g[p])
        for ours, ref in zip(new_c, ref_c, strict=True):
            torch.testing.assert_close(ours[p], ref[p])
            assert torch.equal(ours[p] == 0, ref[p] == 0)
    assert torch.equal(new_g["b"][:2], g["b"][:2])
    # the same from files, one client at a time
    paths = []
    for i, c in enumerate(clients):
        save_file(c, tmp_path / f"client{i}.safetensors")
        paths.append(tmp_path / f"client{i}.safetensors")
    file_g, file_c = heteagg(g, paths, out_dir=tmp_path / "out")
    for p in g:
        torch.testing.assert_close(file_g[p], new_g[p])
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(file_c[2])["b"], new_c[2]["b"])


def test_heteagg_errors(tmp_path):
    g = {"w": torch.ones(3)}
    with pytest.raises(UsageError, match="no parameter"):
        heteagg(g, [{"v": torch.ones(3)}])
    with pytest.raises(UsageError, match="shape"):
        heteagg(g, [{"w": torch.ones(4)}])
    with pytest.raises(UsageError, match="out_dir"):
        save_file({"w": torch.ones(3)}, tmp_path / "c.safetensors")
        heteagg(g, [tmp_path / "c.safetensors"])
    with pytest.raises(UsageError, match="at least one"):
        heteagg(g, [])


def test_fedavg_weights_and_files(tmp_path):
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 2.0])}
    assert fedavg([a, b])["w"].tolist() == [2.0, 1.0]
    save_file(b, tmp_path / "b.safetensors")
    assert fedavg([a, tmp_path / "b.safetensors"], weights=[3, 1])["w"].tolist() == [1.5, 0.5]
    with pytest.raises(UsageError):
        fedavg([a, b], weights=[1])


def _lora_client(gen, rank, out=10, inn=12):
    return {
        "m.lora_A.weight": torch.randn(rank, inn, generator=gen),
        "m.lora_B.weight": torch.randn(out, rank, generator=gen),
    }


def test_exact_aggregation_reproduces_the_mean_product_when_ranks_allow():
    gen = torch.Generator().manual_seed(0)
    clients = [_lora_client(gen, 2) for _ in range(3)]
    g2, g6 = _lora_client(gen, 2), _lora_client(gen, 6)
    products = [c["m.lora_B.weight"] @ c["m.lora_A.weight"] for c in clients]
    mean = sum(products) / 3

    def error(state):
        return (state["m.lora_B.weight"] @ state["m.lora_A.weight"] - mean).norm() / mean.norm()

    exact6, clients6 = heteagg_exact(g6, clients)  # rank 6 >= 3 clients x rank 2
    exact2, _ = heteagg_exact(g2, clients)
    factorwise, _ = heteagg(g2, clients)  # LEGO as published: A and B averaged apart

    assert error(exact6) < 1e-5
    assert error(factorwise) > 0.3  # sum A x sum B != sum (A x B), section 7
    assert error(exact2) < error(factorwise)  # the best rank-2 approximation of the mean
    b, a = svd_refactor(mean, 2)
    got = clients6[0]["m.lora_B.weight"] @ clients6[0]["m.lora_A.weight"]
    torch.testing.assert_close(got, b @ a)  # each client at its own rank 2


def test_exact_aggregation_with_masks_counts_per_entry():
    gen = torch.Generator().manual_seed(0)
    clients = [_lora_client(gen, 2) for _ in range(3)]
    g = _lora_client(gen, 8)
    # row masks (whole output rows pruned) keep every masked product at rank <= 2
    rows = [
        torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0]),
        torch.tensor([1] * 5 + [0] * 5),
        torch.tensor([0] * 10),
    ]
    rows[2][0] = 1
    masks = [{"m": r.bool().unsqueeze(1).expand(10, 12)} for r in rows]
    products = [c["m.lora_B.weight"] @ c["m.lora_A.weight"] for c in clients]

    new_g, _ = heteagg_exact(g, clients, masks)

    total = sum(p * m["m"] for p, m in zip(products, masks, strict=True))
    count = sum(m["m"].int() for m in masks)
    g_product = g["m.lora_B.weight"] @ g["m.lora_A.weight"]
    expected = torch.where(count > 0, total / count.clamp_min(1), g_product)
    got = new_g["m.lora_B.weight"] @ new_g["m.lora_A.weight"]
    # rows 0..7 are counted (rank <= 3 x 2 there); rows 8, 9 keep the global's product
    assert torch.linalg.matrix_rank(expected) <= 8
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_lora_pairs():
    names = [
        "x.q.lora_A.weight",
        "x.q.lora_B.weight",
        "y.lora_A.default.weight",
        "y.lora_B.default.weight",
        "norm.weight",
    ]
    assert lora_pairs(names) == {
        "x.q": ("x.q.lora_A.weight", "x.q.lora_B.weight"),
        "y.default": ("y.lora_A.default.weight", "y.lora_B.default.weight"),
    }
    with pytest.raises(UsageError, match="lacks"):
        lora_pairs(["x.lora_A.weight"])


def test_heteagg_write_back_on_the_client_side_is_the_same():
    g = {"w": torch.randn(5, 3)}
    clients = _sparse_clients(4, {"w": (5, 3)})

    new_g, new_c = heteagg(g, clients)
    global_only, none = heteagg(g, clients, write_back=False)

    assert none == []
    torch.testing.assert_close(global_only["w"], new_g["w"])
    for client, server_side in zip(clients, new_c, strict=True):
        torch.testing.assert_close(heteagg_write_back(client, global_only)["w"], server_side["w"])
    with pytest.raises(UsageError, match="lacks"):
        heteagg_write_back({}, global_only)


# --------------------------------------------------------------------------- real models


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_wanda_beats_magnitude(real_pool, heldout_file, tmp_path):
    """50% on SmolLM2-135M: exact per-matrix sparsity; perplexity dense < Wanda < magnitude."""
    from assy.calibration import calibration_text, calibration_windows
    from assy.evaluate import perplexity

    pool = Pool(real_pool)  # read-only: the variants go to pools of their own
    tokenizer = pool.tokenizer("smollm2-135m")
    ids = calibration_windows(tokenizer, calibration_text(task="arc_easy").text, 8, 64)
    text = heldout_file.read_text()
    ppl = {"dense": (pool, "smollm2-135m")}
    for method in ("wanda", "magnitude"):
        out = tmp_path / method
        report = prune_pool_model(
            pool,
            "smollm2-135m",
            method,
            parse_sparsity("0.5"),
            "p",
            calib_ids=None if method == "magnitude" else ids,
            out=out,
        )
        assert len(report.layers) == 30 and sum(r["matrices"] for r in report.layers) == 210
        assert all(abs(r[k] - 0.5) <= 0.005 for r in report.layers for k in ("min", "max"))
        ppl[method] = (Pool(out), "p")
    for method, (p, name) in ppl.items():
        result = perplexity(BlockRunner(p, name), tokenizer, text, max_tokens=256, progress=False)
        ppl[method] = result["perplexity"]
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"]
    assert ppl["wanda"] < 3 * ppl["dense"]
    sample = next(b for b in Pool(tmp_path / "wanda").model("p").blocks if "layer/7" in b)
    layer = Pool(tmp_path / "wanda").build_module(sample)
    for name, mod in prunable_linears(layer).items():
        assert abs((mod.weight == 0).float().mean().item() - 0.5) <= 0.005, name
