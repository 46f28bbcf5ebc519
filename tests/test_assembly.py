"""Assemblies: recipes, closed-form fits along the chain, adapters, training, CLI, bad input.

Tiny random models (see tiny_models.py): a 48-wide Llama anchor ``wide`` and 32-wide
Llama, Gemma3 (with a word-level tokenizer, so seams into it align tokens by character)
and BERT; a char-level tokenizer elsewhere.
"""

import json
import shutil

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from tiny_models import V, char_tokenizer
from torch import nn

from assy.assembly import (
    ElasticAdapter,
    FitOptions,
    Recipe,
    SeamSpec,
    Slice,
    fit_assembly,
    load_assembly,
    load_recipe,
    plan_replacements,
    stitch,
    write_assembly,
)
from assy.assembly.calibration import FitData, align_by_characters, token_windows
from assy.assembly.fit import PairStats, fit_seam_map, prediction_mse, ridge_map
from assy.assembly.recipe import dump_recipe, recipe_from_dict
from assy.cli import cli
from assy.errors import UsageError
from blockpool import ChainRunner, Pool, RunOptions, Seam, build_pool, open_runner

WORDS = [
    "the",
    "a",
    "quick",
    "brown",
    "lazy",
    "fox",
    "dog",
    "cat",
    "jumps",
    "runs",
    "over",
    "under",
    "near",
    "far",
    "and",
    "then",
]


def _sentences(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n, 7), generator=g).tolist()
    return " ".join(" ".join(WORDS[i] for i in row) + "." for row in picks)


def _word_tokenizer():
    """Whitespace words (and '.') as tokens: another segmentation than the char tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "[BOS]": 1, ".": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", pad_token="[UNK]"
    )


def _wide(hidden=48, layers=4, seed=1):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        tie_word_embeddings=True,
    )
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def asm_pool(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("asm")
    sources = []
    for family in ("llama", "gemma3", "bert"):
        src = root / family
        shutil.copytree(tiny_dirs[family], src)
        (_word_tokenizer() if family == "gemma3" else char_tokenizer()).save_pretrained(src)
        sources.append(f"{family}={src}")
    _wide().save_pretrained(root / "wide")
    char_tokenizer().save_pretrained(root / "wide")
    sources.append(f"wide={root / 'wide'}")
    build_pool(sources, root / "pool", dtype="fp32")
    (root / "fit.txt").write_text(_sentences(400, seed=0))
    (root / "heldout.txt").write_text(_sentences(60, seed=99))
    return root


def _data(asm_pool):
    return FitData((asm_pool / "fit.txt").read_text(), source={"format": "text"})


FAST = FitOptions(samples=12, seq_len=48)


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --------------------------------------------------------------------------- recipes


def test_plan_replacements_makes_slices_and_seams(asm_pool):
    pool = Pool(asm_pool / "pool")
    recipe = plan_replacements(pool, "wide", [((1, 2), "llama:0-1")])
    assert [str(s) for s in recipe.slices] == ["wide 0-0", "llama 0-1", "wide 3-3"]
    assert [(s.before, s.kind) for s in recipe.seams] == [(1, "affine"), (2, "affine")]
    drop = plan_replacements(pool, "wide", [((1, 2), "")])
    assert [str(s) for s in drop.slices] == ["wide 0-0", "wide 3-3"]
    assert [(s.before, s.kind) for s in drop.seams] == [(1, "diagonal")]
    linear = plan_replacements(pool, "wide", [((0, 1), "linear"), ((3, 3), "gemma3:2-2")])
    assert [(s.before, s.kind) for s in linear.seams] == [
        (0, "affine"),
        (1, "affine"),
        (2, "affine"),
    ]
    # the YAML round trip keeps everything, and the fingerprint ignores adapter files
    again = recipe_from_dict(__import__("yaml").safe_load(dump_recipe(recipe)))
    assert again == recipe and again.fingerprint() == recipe.fingerprint()


@pytest.mark.parametrize(
    ("replacements", "message"),
    [
        ([((1, 9), "llama:0-1")], r"--replace 1-9: wide has 4 layers"),
        ([((1, 2), "llama 0-1")], r"expected MODEL:A-B"),
        ([((1, 2), "llama:0-1"), ((2, 3), "")], r"overlaps"),
    ],
)
def test_plan_replacements_refuses_bad_requests(asm_pool, replacements, message):
    with pytest.raises(UsageError, match=message):
        plan_replacements(Pool(asm_pool / "pool"), "wide", replacements)


# --------------------------------------------------------------------------- pure fits


def test_ridge_recovers_an_affine_map_and_its_error_from_the_sums():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g) * torch.tensor([1.0, 10, 0.1, 1, 1, 50])
    w_true = torch.randn(5, 6, generator=g, dtype=torch.float64)
    y = x.double() @ w_true.T + 3.0 + 0.001 * torch.randn(4000, 5, generator=g, dtype=torch.float64)
    stats = PairStats(6, 5)
    stats.add(x[:2000], y[:2000])
    stats.add(x[2000:], y[2000:])
    w, b = ridge_map(stats, 1e-8)
    torch.testing.assert_close(w, w_true, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b, torch.full((5,), 3.0, dtype=torch.float64), atol=1e-3, rtol=0)
    direct = ((x.double() @ w.T + b - y) ** 2).mean(0)
    torch.testing.assert_close(prediction_mse(stats, w, b), direct, atol=1e-6, rtol=1e-4)


def test_massive_unpredictable_dimensions_are_held_and_the_scale_matched():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 8, generator=g)
    y = x @ torch.randn(8, 8, generator=g) * 0.3 + 0.7 * torch.randn(3000, 8, generator=g)
    y[:, 3] = 500.0 + 5 * torch.randn(3000, generator=g)  # massive, not predictable from x
    train, val = PairStats(8, 8), PairStats(8, 8)
    train.add(x[:2500], y[:2500])
    val.add(x[2500:], y[2500:])
    fit = fit_seam_map(train, val, rms_match=True)
    assert fit.report["held_dims"] == [3] and fit.report["massive_dims"] == [3]
    assert fit.held_value[3] == pytest.approx(500.0, abs=1.0)
    assert fit.report["rms_gain"] > 1.0  # ridge shrinks toward the mean; the gain undoes it
    free = torch.arange(8) != 3
    pred = x @ fit.weight.T + fit.bias
    ratio = pred[:, free].std(0).pow(2).sum() / y[:, free].std(0).pow(2).sum()
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_windows_are_disjoint_seeded_and_refuse_short_data():
    tok = char_tokenizer()
    text = _sentences(50, seed=3)
    w = token_windows(tok, text, 6, 32, seed=0)
    assert w.ids.shape == (6, 32) and (w.ids[:, 0] == 1).all()  # BOS first, as the tokenizer does
    spans = sorted(w.span(i) for i in range(6))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert torch.equal(w.ids, token_windows(tok, text, 6, 32, seed=0).ids)
    with pytest.raises(UsageError, match="data too short to fit"):
        token_windows(tok, text, 500, 32)
    with pytest.raises(UsageError, match="--samples must be at least 1"):
        token_windows(tok, text, 0, 32)


def test_alignment_pairs_tokens_ending_on_the_same_character():
    text = "the fox. a dog"
    chars = char_tokenizer()(text, return_offsets_mapping=True)
    words = _word_tokenizer()(text, return_offsets_mapping=True)
    ends_a = torch.tensor([e if e > s else -1 for s, e in chars.offset_mapping])
    ends_b = torch.tensor([e if e > s else -1 for s, e in words.offset_mapping])
    pa, pb = align_by_characters(ends_a, ends_b)
    got = [(text[: int(ends_a[i])], int(j)) for i, j in zip(pa, pb, strict=True)]
    assert got == [("the", 1), ("the fox", 2), ("the fox.", 3), ("the fox. a", 4), (text, 5)]


# --------------------------------------------------------------------------- fitting


class _Rotated(Seam):
    """A fixed rotation of the stream, then the adapter (which must undo it)."""

    def __init__(self, q, inner):
        super().__init__()
        self.register_buffer("q", q)
        self.inner = inner

    def forward(self, hidden, context):
        return self.inner(hidden @ self.q.T, context)


def test_self_stitch_through_a_fitted_adapter_undoes_a_rotation(asm_pool):
    from assy.assembly.assemble import fit_seam, seam_targets
    from assy.assembly.chain import build_items, new_adapters
    from assy.assembly.states import own_states

    pool = Pool(asm_pool / "pool")
    recipe = Recipe("wide", (Slice("wide", (0, 1)), Slice("wide", (2, 3))), (SeamSpec(1),))
    fit = FitOptions(samples=16, seq_len=48)
    fitted = fit_assembly(pool, recipe, _data(asm_pool), fit)
    assert fitted.report["seams"][0]["validation_r2"] > 0.999
    ids = token_windows(char_tokenizer(), (asm_pool / "heldout.txt").read_text(), 4, 40).ids
    whole = ChainRunner(pool, pool.model("wide").blocks)(ids)
    items = build_items(fitted.recipe, pool, fitted.adapters)
    torch.testing.assert_close(ChainRunner(pool, items)(ids), whole, atol=2e-3, rtol=0)

    windows = token_windows(char_tokenizer(), _data(asm_pool).text, 16, 48)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(0)))
    x = own_states(pool, "wide", windows.ids, None, [2])[2]
    adapter = new_adapters(fitted.recipe, pool, 0)[1]
    pairs, first, _ = seam_targets(pool, fitted.recipe, "wide", 2, windows, RunOptions(), None)
    fit_seam(adapter, x @ q.T, pairs, first, windows.validation, fit)
    rotated = [_Rotated(q, adapter) if isinstance(i, nn.Module) else i for i in items]
    torch.testing.assert_close(ChainRunner(pool, rotated)(ids), whole, atol=2e-3, rtol=0)
    unfitted = [
        _Rotated(q, ElasticAdapter(48, 48)) if isinstance(i, nn.Module) else i for i in items
    ]
    assert (ChainRunner(pool, unfitted)(ids) - whole).abs().max() > 0.1  # the control


def test_foreign_span_is_fitted_in_order_and_runs_token_by_token(asm_pool, tmp_path):
    pool = Pool(asm_pool / "pool")
    recipe = plan_replacements(pool, "wide", [((1, 2), "gemma3:0-2")], cross_attention=(2, 16))
    fitted = fit_assembly(pool, recipe, _data(asm_pool), FAST)
    seams = fitted.report["seams"]
    assert seams[0]["aligned"] == "tokens ending on the same character"  # word tokenizer
    assert seams[1]["aligned"] == "same tokens" and seams[1]["into"] == "wide depth 3"
    assert seams[0]["validation_r2"] is not None and seams[0]["sink_norm"] > 0
    write_assembly(tmp_path / "asm", fitted)
    # the gate opened: cross-attention contributes, and a KV-cached pass equals the full one
    for adapter in fitted.adapters.values():
        adapter.cross_attention.gate.data.fill_(0.5)
    runner = ChainRunner(pool, build_items_(fitted, pool))
    ids = token_windows(char_tokenizer(), (asm_pool / "heldout.txt").read_text(), 2, 20).ids
    full = runner(ids)
    step = runner.forward(ids[:, :7], use_cache=True)
    logits = [step.logits]
    for t in range(7, ids.shape[1]):
        step = runner.forward(
            ids[:, t : t + 1], past_key_values=step.past_key_values, use_cache=True
        )
        logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)


def test_chain_module_scores_only_the_positions_asked_for(asm_pool):
    from blockpool import ChainModule

    pool = Pool(asm_pool / "pool")
    module = ChainModule(ChainRunner(pool, pool.model("wide").blocks))
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(0))
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[0, 3], at[1, 5:] = True, True
    full = module(ids)
    torch.testing.assert_close(module(ids, None, logits_at=at), full[at], atol=1e-6, rtol=0)


def test_cross_attention_starts_as_the_plain_projection():
    adapter = ElasticAdapter(8, 12, cross_attention=(2, 8))
    plain = ElasticAdapter(8, 12)
    plain.load_state_dict({k: v for k, v in adapter.state_dict().items() if "cross" not in k})
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(adapter(x), plain(x))
    assert adapter.trainable_parameters() > plain.trainable_parameters()


def test_an_encoder_slice_runs_causally_in_the_assembly(asm_pool):
    pool = Pool(asm_pool / "pool")
    recipe = plan_replacements(pool, "wide", [((1, 2), "bert:0-1")])
    fitted = fit_assembly(pool, recipe, _data(asm_pool), FAST)
    runner = ChainRunner(pool, build_items_(fitted, pool))
    ids = token_windows(char_tokenizer(), (asm_pool / "heldout.txt").read_text(), 1, 24).ids
    torch.testing.assert_close(runner(ids)[:, :10], runner(ids[:, :10]), atol=1e-5, rtol=0)


def build_items_(fitted, pool):
    from assy.assembly.chain import build_items

    return build_items(fitted.recipe, pool, fitted.adapters)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("objective", ["hidden", "kl"])
def test_training_objectives_train_adapters_only(asm_pool, objective):
    pool = Pool(asm_pool / "pool")
    recipe = plan_replacements(pool, "wide", [((1, 1), "llama:0-1")])
    fit = FitOptions(
        samples=24, seq_len=48, objective=objective, steps=30, lr=3e-5, hidden_offset=1
    )
    closed = fit_assembly(pool, recipe, _data(asm_pool), FitOptions(samples=24, seq_len=48))
    trained = fit_assembly(pool, recipe, _data(asm_pool), fit)
    report = trained.report["training"][0]
    expected = ["llama/layer/0", "llama/layer/1", "wide/layer/2"]
    if objective == "kl":
        expected += ["wide/layer/3", "wide/head/0"]
    assert report["blocks_gradients_pass_through"] == expected
    assert report["trainable_parameters"] == sum(
        a.trainable_parameters() for a in trained.adapters.values()
    )
    assert report["held_out_loss_after"] < report["held_out_loss_before"]
    assert report["saved_for_backward_bytes"] > 0
    moved = [not torch.equal(closed.adapters[b].weight, trained.adapters[b].weight) for b in (1, 2)]
    assert all(moved)


def test_task_objective_trains_on_multiple_choice_examples(asm_pool, tmp_path):
    rows = [
        {"context": f"the {w} and the", "choices": [" fox", " dog", " cat"], "label": i % 3}
        for i, w in enumerate(WORDS)
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 20))
    from assy.assembly import load_fit_data

    data = load_fit_data(path)
    pool = Pool(asm_pool / "pool")
    recipe = plan_replacements(pool, "wide", [((1, 2), "llama:0-1")])
    fit = FitOptions(samples=4, seq_len=48, objective="task", steps=3, train_batch=2)
    report = fit_assembly(pool, recipe, data, fit).report["training"][0]
    assert report["blocks_gradients_pass_through"][-1] == "wide/head/0"
    assert report["steps"] == 3 and report["first_loss"] > 0


# --------------------------------------------------------------------------- the CLI


def test_stitch_eval_generate_inspect_from_the_command_line(asm_pool, tmp_path):
    pool, out = asm_pool / "pool", tmp_path / "asm"
    result = _cli(
        "stitch",
        pool,
        "--anchor",
        "wide",
        "--replace",
        "1-2",
        "--insert",
        "llama:0-1",
        "--data",
        asm_pool / "fit.txt",
        "--samples",
        12,
        "--seq-len",
        48,
        "--out",
        out,
        "--threads",
        1,
    )
    assert result.exit_code == 0, result.output
    assert "3 slices (wide 0-0, llama 0-1, wide 3-3), 2 adapters" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "fit.json", "recipe.yaml"]
    fit = json.loads((out / "fit.json").read_text())
    assert fit["data"]["path"].endswith("fit.txt") and len(fit["data"]["sha256"]) == 64

    result = _cli(
        "eval",
        pool,
        "--assembly",
        out,
        "--task",
        "perplexity",
        "--data",
        asm_pool / "heldout.txt",
        "--json",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["model"] == "wide" and metrics["assembly"] == str(out)
    assert metrics["perplexity"] > 1 and 0 < metrics["bits_per_byte"] < 10
    result = _cli("generate", pool, "--assembly", out, "--prompt", "the fox", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    result = _cli("inspect", pool, "--assembly", out)
    assert result.exit_code == 0, result.output
    assert "llama" in result.output and "affine" in result.output and "held-out R2" in result.output
    assert (
        _cli("eval", pool, "--task", "perplexity", "--data", asm_pool / "heldout.txt").exit_code
        == 2
    )


def test_an_assembly_under_a_budget_gives_the_same_logits(asm_pool, tmp_path):
    from blockpool.offload import min_budget

    pool = Pool(asm_pool / "pool")
    recipe = plan_replacements(pool, "wide", [((1, 2), "gemma3:0-2")])
    stitch(pool, recipe, _data(asm_pool), tmp_path / "asm", FAST)
    assembly = load_assembly(pool, tmp_path / "asm")
    ids = token_windows(char_tokenizer(), (asm_pool / "heldout.txt").read_text(), 2, 30).ids
    expected = ChainRunner(pool, assembly.chain)(ids)
    budget = min_budget(pool, assembly.chain, batch=2, tokens=30)  # adapters included
    with open_runner(pool, assembly.chain, RunOptions(budget=budget)) as run:
        got = run.runner(ids)
    assert run.report["weights_resident_peak_bytes"] <= budget
    assert run.report["misses"] > 0
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_adapter_gradients_through_swapped_blocks_equal_plain_backprop(asm_pool, tmp_path):
    """``refetching``: under a budget that holds one layer at a time, the backward pass
    re-reads the evicted blocks and recomputes them; the adapters' gradients are those of
    plain backpropagation through resident blocks, and no frozen block gets a gradient."""
    from assy.assembly.train import freeze_blocks, refetching, step_bytes
    from blockpool.offload import min_budget

    pool = Pool(asm_pool / "pool")
    recipe = plan_replacements(pool, "wide", [((1, 2), "gemma3:0-2")])
    stitch(pool, recipe, _data(asm_pool), tmp_path / "asm", FAST)
    assembly = load_assembly(pool, tmp_path / "asm")
    ids = token_windows(char_tokenizer(), (asm_pool / "heldout.txt").read_text(), 2, 30).ids
    params = [p for a in assembly.adapters.values() for p in a.parameters()]

    fetched: list[str] = []

    def grads(run, get):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            logits = run.runner.walk(get, ids, None).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
            )
            fetched.clear()
            loss.backward()
        return [p.grad.clone() for p in params]

    def counted(fetch):
        return lambda b: fetched.append(b) or fetch(b)

    with open_runner(pool, assembly.chain, RunOptions()) as run:
        freeze_blocks(run.runner)
        expected = grads(run, run.runner.fetch)
    budget = min_budget(pool, assembly.chain)  # room for one layer at a time
    with open_runner(pool, assembly.chain, RunOptions(budget=budget)) as run:
        held = step_bytes(run.runner, 2, 30, 60)
    budget += held  # the training step's working memory, held out of the budget
    with open_runner(pool, assembly.chain, RunOptions(budget=budget)) as run:
        run.swapper.hold("step", held)
        got = grads(run, refetching(counted(run.runner.fetch)))
        frozen = [p.grad for b in run.runner.block_ids for p in run.runner.fetch(b).parameters()]
    assert run.report["weights_resident_peak_bytes"] <= budget
    assert run.report["evictions"] > 0
    # the backward pass fetched every block after the first adapter again, last first
    assert fetched == ["wide/head/0", "wide/layer/3", *(f"gemma3/layer/{i}" for i in (2, 1, 0))]
    assert all(g is None for g in frozen)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_an_assemblys_logits_are_sized_by_its_heads_vocabulary(asm_pool, tmp_path):
    """A budget reserves logits for the head's vocabulary, not the largest in the chain
    (Gemma3's 262,144 layers in a SmolLM2 assembly of 49,152 asked for 5x the room)."""
    pool = Pool(asm_pool / "pool")
    recipe = plan_replacements(pool, "wide", [((1, 2), "gemma3:0-2")])
    stitch(pool, recipe, _data(asm_pool), tmp_path / "asm", FAST)
    runner = ChainRunner(pool, load_assembly(pool, tmp_path / "asm").chain)
    runner._configs["gemma3"].vocab_size = 100 * V  # a foreign middle with a huge vocabulary
    logits = runner.working_bytes(1, 8, 0, 8) - runner.working_bytes(1, 8, 0, 0)
    assert logits == 2 * 8 * V * 4


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def made(asm_pool, tmp_path_factory):
    """One stitched assembly (read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("made") / "asm"
    pool = Pool(asm_pool / "pool")
    stitch(
        pool, plan_replacements(pool, "wide", [((1, 2), "llama:0-1")]), _data(asm_pool), out, FAST
    )
    return out


def _edit_recipe(asm, change):
    text = (asm / "recipe.yaml").read_text()
    (asm / "recipe.yaml").write_text(change(text))


def _eval(asm_pool, asm):
    return _cli(
        "eval",
        asm_pool / "pool",
        "--assembly",
        asm,
        "--task",
        "perplexity",
        "--data",
        asm_pool / "heldout.txt",
    )


def _one_line_error(result, pattern):
    import re

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (
            lambda t: t.replace("{model: llama,", "{model: nosuch,"),
            r"slices\[1\]: no model 'nosuch'",
        ),
        (
            lambda t: t.replace("layers: [0, 1]", "layers: [0, 5]"),
            r"slices\[1\]: llama has 2 layers, asked for 0-5",
        ),
        (
            lambda t: t.replace("{model: llama,", "{model: llama, variant: ghost,"),
            r"slices\[1\]: no variant 'ghost' of llama",
        ),
        (
            lambda t: t.replace("{model: llama,", "{model: llama, variant: wide,"),
            r"slices\[1\]: wide is not a variant of llama",
        ),
        (
            lambda t: t.split("seams:")[0] + "seams: []\nblocks:" + t.split("blocks:")[1],
            r"widths differ and no adapter",
        ),
        (lambda t: t.replace("anchor: wide", "anchor: bert"), r"anchor: bert is an encoder"),
        (lambda t: t.replace("layers: [", "layers: x[", 1), r"not valid YAML|layers must be"),
    ],
)
def test_bad_recipes_are_refused_naming_the_slot(asm_pool, made, tmp_path, change, pattern):
    asm = tmp_path / "asm"
    shutil.copytree(made, asm)
    _edit_recipe(asm, change)
    _one_line_error(_eval(asm_pool, asm), pattern)


@pytest.mark.parametrize("damage", ["flip", "truncate", "grow"])
def test_corrupted_or_resized_adapter_is_named(asm_pool, made, tmp_path, damage):
    asm = tmp_path / "asm"
    shutil.copytree(made, asm)
    path = asm / "adapters" / "seam-2.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
    elif damage == "truncate":
        data = data[:-16]
    else:
        data += b"\0" * 64
    path.write_bytes(bytes(data))
    _one_line_error(_eval(asm_pool, asm), r"asm/adapters/seam-2.safetensors: sha256 mismatch")


def test_an_adapter_fitted_for_another_recipe_is_refused(asm_pool, made, tmp_path):
    import hashlib

    pool = Pool(asm_pool / "pool")
    other = tmp_path / "other"
    stitch(
        pool,
        plan_replacements(pool, "wide", [((1, 2), "gemma3:1-2")]),
        _data(asm_pool),
        other,
        FAST,
    )
    asm = tmp_path / "asm"
    shutil.copytree(made, asm)
    foreign = (other / "adapters" / "seam-2.safetensors").read_bytes()
    (asm / "adapters" / "seam-2.safetensors").write_bytes(foreign)
    mine = load_recipe(made / "recipe.yaml").seams[1].sha256
    _edit_recipe(asm, lambda t: t.replace(mine, hashlib.sha256(foreign).hexdigest()))
    _one_line_error(
        _eval(asm_pool, asm), r"seam-2.safetensors: this adapter was fitted for another recipe"
    )


def test_a_changed_pool_block_is_refused(asm_pool, made, tmp_path):
    pool_copy = tmp_path / "pool"
    shutil.copytree(asm_pool / "pool", pool_copy)
    manifest = json.loads((pool_copy / "pool.json").read_text())
    manifest["blocks"]["llama/layer/1"]["sha256"] = "0" * 64
    (pool_copy / "pool.json").write_text(json.dumps(manifest))
    result = _cli(
        "eval",
        pool_copy,
        "--assembly",
        made,
        "--task",
        "perplexity",
        "--data",
        asm_pool / "heldout.txt",
    )
    _one_line_error(result, r"block llama/layer/1: changed since the assembly was stitched")


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--samples", 0], r"--samples must be at least 1"),
        (["--samples", 5000], r"data too short to fit"),
        (["--objective", "task"], r"--objective task needs multiple-choice examples"),
        (["--fit", "train"], r"--fit train needs --objective"),
    ],
)
def test_stitch_refuses_bad_options_and_writes_nothing(asm_pool, tmp_path, args, pattern):
    out = tmp_path / "asm"
    result = _cli(
        "stitch",
        asm_pool / "pool",
        "--anchor",
        "wide",
        "--replace",
        "1-2",
        "--insert",
        "llama:0-1",
        "--data",
        asm_pool / "fit.txt",
        "--seq-len",
        48,
        "--out",
        out,
        *args,
    )
    _one_line_error(result, pattern)
    assert list(tmp_path.iterdir()) == []  # no directory, no temporary left behind


def test_stitch_is_all_or_nothing_when_interrupted(asm_pool, tmp_path, monkeypatch):
    import assy.assembly.assemble as stitch_module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stitch_module, "dump_recipe", fail)
    pool = Pool(asm_pool / "pool")
    with pytest.raises(KeyboardInterrupt):
        stitch(
            pool,
            plan_replacements(pool, "wide", [((1, 2), "llama:0-1")]),
            _data(asm_pool),
            tmp_path / "asm",
            FAST,
        )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- finetune


def _instructions(path, n=40):
    rows = [
        {"instruction": f"say {w}", "context": "", "response": f"the {w} {w}.", "category": "x"}
        for w in WORDS
    ] * (n // len(WORDS) + 1)
    path.write_text(json.dumps(rows[:n]))
    return path


def test_finetune_registers_a_relative_and_resumes_after_an_interruption(
    asm_pool, tmp_path, monkeypatch
):
    from assy.assembly import load_fit_data
    from assy.assembly.finetune import FinetuneOptions, finetune_pool_model

    pool_dir = tmp_path / "pool"
    shutil.copytree(asm_pool / "pool", pool_dir)
    data = load_fit_data(_instructions(tmp_path / "dolly.json"))
    options = FinetuneOptions(
        rank=2, steps=6, batch_size=2, seq_len=32, lr=1e-2, checkpoint_every=2
    )
    straight = finetune_pool_model(Pool(pool_dir), "wide", data, "wide-a", options)
    assert straight["trainable_parameters"] > 0 and straight["resumed_from"] == 0

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        finetune_pool_model(Pool(pool_dir), "wide", data, "wide-b", options)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert "wide-b" not in Pool(pool_dir).models  # nothing registered half-way
    resumed = finetune_pool_model(Pool(pool_dir), "wide", data, "wide-b", options)
    assert resumed["resumed_from"] == 4

    pool = Pool(pool_dir)
    for a, b, parent in zip(
        pool.model("wide-a").blocks,
        pool.model("wide-b").blocks,
        pool.model("wide").blocks,
        strict=True,
    ):
        assert pool.blocks[b].parent.block == parent
        for name, t in pool.load_tensors(a).items():
            torch.testing.assert_close(pool.load_tensors(b)[name], t, atol=1e-6, rtol=0)
    changed = pool.load_tensors("wide-a/layer/0")["self_attn.q_proj.weight"]
    assert not torch.equal(changed, pool.load_tensors("wide/layer/0")["self_attn.q_proj.weight"])
    # a relative of the anchor joins it with no adapter (same residual space)
    recipe = plan_replacements(pool, "wide", [((1, 2), "wide-a:1-2")])
    assert recipe.seams == () and recipe.slices[1].variant == "wide-a"
    result = _cli(
        "finetune", pool_dir, "--model", "wide", "--data", tmp_path / "dolly.json", "--as", "wide-a"
    )
    _one_line_error(result, r"model 'wide-a' exists in pool")


def test_train_loop_accumulates_parts_to_the_whole_batchs_step():
    """``loss_at`` may yield parts of a step's loss (micro-batches, each backward before the
    next is computed): the step is the one the whole loss takes."""
    from assy.assembly.train import train_loop

    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    start = torch.randn(5, 3)
    whole, parts = nn.Parameter(start.clone()), nn.Parameter(start.clone())

    def loss(w, rows):
        return ((x[rows] @ w - y[rows]) ** 2).sum() / 6

    train_loop([whole], lambda _s: loss(whole, slice(0, 6)), steps=3, lr=0.1, desc="whole")
    report = train_loop(
        [parts], lambda _s: (loss(parts, slice(i, i + 2)) for i in (0, 2, 4)), steps=3, lr=0.1
    )
    torch.testing.assert_close(parts.detach(), whole.detach())
    assert report["first_loss"] == pytest.approx(float(loss(start, slice(0, 6))), rel=1e-6)
