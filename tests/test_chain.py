"""The chain runner: segments of several models, seams, caches, hooks, positions-only head."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from tiny_models import V, char_tokenizer
from torch import nn

from blockpool import (
    BlockRunner,
    ChainModule,
    ChainRunner,
    Pool,
    RunOptions,
    Seam,
    build_pool,
    open_runner,
)
from blockpool.errors import UsageError


@pytest.fixture(scope="module")
def pool_dir(tiny_dirs, tmp_path_factory):
    """Tiny llama and gemma3, each also as a second copy, plus bert; with tokenizers."""
    root = tmp_path_factory.mktemp("chain")
    sources = []
    for family in ("llama", "gemma3", "bert"):
        src = root / family
        shutil.copytree(tiny_dirs[family], src)
        char_tokenizer().save_pretrained(src)
        sources.append(f"{family}={src}")
        if family != "bert":
            sources.append(f"{family}2={src}")
    torch.manual_seed(0)
    wide = tf.GPT2Config(vocab_size=V, n_embd=48, n_layer=1, n_head=4, n_positions=64)
    tf.GPT2LMHeadModel(wide).save_pretrained(root / "wide")
    sources.append(f"wide={root / 'wide'}")
    build_pool(sources, root / "pool", dtype="fp32")
    return root / "pool"


def _blocks(pool, model, kinds=("embed", "layer", "head"), layers=None):
    out = []
    for b in pool.model(model).blocks:
        entry = pool.blocks[b]
        if entry.kind not in kinds:
            continue
        if entry.kind == "layer" and layers is not None and entry.index not in layers:
            continue
        out.append(b)
    return out


def _ids(t=11, b=2, seed=0):
    return torch.randint(2, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _token_by_token(runner, ids, start, mask=None):
    """Logits of ``ids`` from a prefill of ``start`` tokens, then one token per call."""
    piece = (lambda t: mask[:, :t]) if mask is not None else (lambda t: None)
    step = runner.forward(ids[:, :start], piece(start), use_cache=True)
    logits = [step.logits]
    for t in range(start, ids.shape[1]):
        cache = step.past_key_values
        step = runner.forward(
            ids[:, t : t + 1], piece(t + 1), past_key_values=cache, use_cache=True
        )
        logits.append(step.logits)
    return torch.cat(logits, 1), step.past_key_values


def _two_copies(pool, family, cut):
    """``family``'s embed and layers < cut, an identity seam, ``family2``'s layers >= cut and
    ``family``'s head: the same model cut in two and re-joined."""
    n = pool.config(family).num_hidden_layers
    first = _blocks(pool, family, ("embed", "layer"), range(cut))
    second = _blocks(pool, f"{family}2", ("layer",), range(cut, n))
    return [*first, nn.Identity(), *second, _blocks(pool, family, ("head",))[0]]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_identity_seam_between_two_copies_reproduces_the_model(family, pool_dir):
    pool = Pool(pool_dir)
    chain = ChainRunner(pool, _two_copies(pool, family, 1))
    whole = BlockRunner(pool, family)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row

    assert len(chain.segments) == 3 and chain.segments[1].seam is not None
    torch.testing.assert_close(chain(ids, mask), whole(ids, mask), atol=1e-5, rtol=0)

    # token by token, each segment with its own cache (gemma3: sliding window 4 < 11 tokens)
    stepped, _ = _token_by_token(chain, ids, 5, mask)
    torch.testing.assert_close(stepped, whole(ids, mask), atol=1e-5, rtol=0)


class _Scale(Seam):
    """A seam that uses its context: scales by a learned factor, counts tokens seen."""

    def __init__(self, d_in, d_out):
        super().__init__()
        torch.manual_seed(3)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, hidden, context):
        context.state["seen"] = context.past_length + hidden.shape[1]
        assert context.position_ids.shape[-1] == hidden.shape[1]
        return self.proj(hidden)


def test_two_model_chain_runs_forward_and_generates_with_a_cache(pool_dir):
    pool = Pool(pool_dir)
    seam = _Scale(32, 32)
    items = [
        *_blocks(pool, "llama", ("embed", "layer"), [0, 1]),
        seam,
        *_blocks(pool, "gemma3", ("layer",), [1, 2]),
        nn.Linear(32, 32),
        _blocks(pool, "llama", ("head",))[0],
    ]
    runner = ChainRunner(pool, items)
    assert [s.model for s in runner.segments] == ["llama", "gemma3", "llama"]
    ids = _ids(t=10, b=1)

    full = runner(ids)
    assert full.shape == (1, 10, V) and torch.isfinite(full).all()
    stepped, cache = _token_by_token(runner, ids, 4)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert cache.seam_states[1]["seen"] == 10


def test_layers_of_a_model_can_repeat(pool_dir):
    pool = Pool(pool_dir)
    embed, l0, l1, head = _blocks(pool, "llama")
    runner = ChainRunner(pool, [embed, l0, l1, l1, head])  # layer 1 twice: a new segment
    assert len(runner.segments) == 2
    ids = _ids(t=8, b=1)
    stepped, _ = _token_by_token(runner, ids, 3)
    torch.testing.assert_close(stepped, runner(ids), atol=1e-5, rtol=0)


def test_an_encoder_segment_runs_causally_in_a_causal_chain(pool_dir):
    pool = Pool(pool_dir)
    items = [
        *_blocks(pool, "llama", ("embed", "layer"), [0]),
        nn.Identity(),
        *_blocks(pool, "bert", ("layer",), [0]),
        nn.Identity(),
        _blocks(pool, "llama", ("head",))[0],
    ]
    runner = ChainRunner(pool, items)
    ids = _ids(t=9, b=1)
    full = runner(ids)
    prefix = runner(ids[:, :5])
    # causal: the first 5 positions do not see the later tokens
    torch.testing.assert_close(full[:, :5], prefix, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="encoder"):
        runner.forward(ids, use_cache=True)


def test_bad_chains_are_refused_with_the_position(pool_dir):
    pool = Pool(pool_dir)
    llama = _blocks(pool, "llama")
    wide_layer = _blocks(pool, "wide", ("layer",))[0]
    with pytest.raises(UsageError, match=r"chain\[0\]"):
        ChainRunner(pool, llama[1:])
    with pytest.raises(UsageError, match=r"chain\[1\].*must come last"):
        ChainRunner(pool, [llama[0], llama[-1], llama[1]])
    with pytest.raises(UsageError, match=r"chain\[1\]: no block"):
        ChainRunner(pool, [llama[0], "llama/layer/9"])
    with pytest.raises(UsageError, match=r"chain\[1\]: wide \(hidden 48\).*no seam between"):
        ChainRunner(pool, [llama[0], wide_layer])
    ChainRunner(pool, [llama[0], nn.Linear(32, 48), wide_layer])  # with a seam it is fine
    with pytest.raises(UsageError, match="seam must be followed"):
        ChainRunner(pool, [llama[0], nn.Identity()])


def test_positions_only_head_equals_the_full_logits(pool_dir):
    runner = BlockRunner(Pool(pool_dir), "gemma3")
    ids = _ids(t=12)
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[0, [3, 11]] = True
    at[1, 7] = True
    full = runner(ids)
    picked = runner.forward(ids, logits_at=at).logits
    assert picked.shape == (3, V)
    torch.testing.assert_close(picked, full[at], atol=1e-6, rtol=0)  # other matmul shapes


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from blockpool import BlockRunner, Pool

    def status(key):  # kB fields of /proc/self/status
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
        return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    runner = BlockRunner(Pool(sys.argv[1]), "wide")
    runner(torch.ones(1, 8, dtype=torch.long))  # build every block
    ids = torch.randint(0, 65536, (1, 512), generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    if sys.argv[2] == "full":
        out = runner(ids)
    else:
        at = torch.zeros_like(ids, dtype=torch.bool)
        at[0, -4:] = True
        out = runner.forward(ids, logits_at=at).logits
    print(json.dumps({"grew": status("VmHWM:") - before, "shape": list(out.shape)}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_positions_only_head_peak_memory_is_far_below_full_logits(tmp_path):
    config = tf.LlamaConfig(
        vocab_size=65536,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    build_pool([f"wide={tmp_path / 'wide'}"], tmp_path / "pool", dtype="fp32")
    grew = {}
    for mode in ("full", "at"):
        run = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "pool"), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        grew[mode] = json.loads(run.stdout.strip().splitlines()[-1])["grew"]
    full_logits = 512 * 65536 * 4  # 134 MB
    assert grew["full"] >= 0.5 * full_logits, grew  # the control: full logits do show
    assert grew["at"] < full_logits / 8, grew


def test_observe_hook_sees_every_block_in_order(pool_dir):
    pool = Pool(pool_dir)
    runner = ChainRunner(pool, _two_copies(pool, "llama", 1))
    calls = []
    ids = _ids(t=6, b=1)
    with runner.observe(calls.append):
        out = runner.forward(ids)
    runner.forward(ids)  # removed: no more calls
    assert [c.kind for c in calls] == ["embed", "layer", "seam", "layer", "head"]
    assert torch.equal(calls[0].inputs, ids)
    for before, after in zip(calls, calls[1:], strict=False):
        if after.kind != "head":
            assert torch.equal(before.output, after.inputs)
    torch.testing.assert_close(calls[-1].output, out.logits)
    assert "attention_mask" in calls[1].kwargs


def test_run_block_and_layer_kwargs_replay_a_full_pass(pool_dir):
    pool = Pool(pool_dir)
    runner = BlockRunner(pool, "gemma3")
    ids = _ids(t=7)
    hidden = runner.run_block(runner.block_ids[0], ids)
    for bid in runner.block_ids[1:-1]:
        hidden = runner.run_block(bid, hidden)
    logits = runner.run_block(runner.block_ids[-1], hidden)
    torch.testing.assert_close(logits, runner(ids), atol=1e-6, rtol=0)


def test_chain_module_trains_the_seams_only(pool_dir):
    pool = Pool(pool_dir)
    items = _two_copies(pool, "llama", 1)
    items[items.index(next(m for m in items if isinstance(m, nn.Module)))] = nn.Linear(32, 32)
    runner = ChainRunner(pool, items)
    module = ChainModule(runner)
    for name, p in module.named_parameters():
        p.requires_grad_(name.startswith("seams."))
    ids = _ids(t=6, b=2)
    logits = module(ids)
    torch.testing.assert_close(logits.detach(), runner(ids), atol=1e-6, rtol=0)
    logits.logsumexp(-1).mean().backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None}
    assert grads == {"seams.0.weight", "seams.0.bias"}
    assert {n.split(".")[0] for n, _ in module.named_parameters()} >= {"embed", "layers", "head"}


def test_open_runner_reports_the_run(pool_dir):
    options = RunOptions(budget=10**9, policy="lru", threads=1)
    with open_runner(pool_dir, "llama", options) as run:
        run.runner(_ids())
    report = run.report
    assert report["threads"] == 1 and report["device"] == "cpu" and report["swap_policy"] == "lru"
    assert report["misses"] > 0 and report["peak_rss_bytes"] > 0
    assert torch.get_num_threads() == 1
    with (
        pytest.raises(UsageError, match="device"),
        open_runner(pool_dir, "llama", RunOptions(device="cuda:7")),
    ):
        pass


def test_chain_under_a_budget_matches_the_resident_chain(pool_dir):
    from blockpool.offload import min_budget

    pool = Pool(pool_dir)
    items = _two_copies(pool, "gemma3", 2)
    ids = _ids(t=9)
    expected = ChainRunner(pool, items)(ids)
    budget = min_budget(pool, items, batch=2, tokens=9)
    with open_runner(pool, items, RunOptions(budget=budget)) as run:
        got = run.runner(ids)
    assert run.report["weights_resident_peak_bytes"] <= budget
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
