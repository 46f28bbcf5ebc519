"""The swapper: same outputs under any budget, the budget holds under races, clean failure."""

import faulthandler
import json
import random
import threading
import time

import pytest
import torch
from tiny_models import V

from blockpool import Pool, build_pool, offload
from blockpool.errors import IntegrityError, UsageError
from blockpool.offload import ChunkedHead, GatheredEmbed, block_nbytes, budgeted_runner, min_budget
from blockpool.sizes import parse_size
from blockpool.swapper import POLICIES, BlockSwapper

DECODERS = ["llama", "gemma3", "gpt2", "opt", "gpt_neox"]


@pytest.fixture(autouse=True)
def _no_hang():
    faulthandler.dump_traceback_later(120, exit=True)  # a deadlock fails the run, not CI
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def tiny_pool(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("swap") / "pool"
    build_pool([f"{f}={tiny_dirs[f]}" for f in DECODERS + ["bert"]], root, dtype="fp32")
    return root


def _total(pool, model):
    return sum(block_nbytes(pool, b, torch.float32) for b in pool.model(model).blocks)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_outputs_are_bit_identical_under_any_budget(family, policy, tiny_pool):
    pool = Pool(tiny_pool)
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(0))
    reference, _ = budgeted_runner(pool, family, budget=None)
    expected = reference(ids)
    floor = min_budget(pool, family, batch=2, tokens=9)  # weights in pieces + working memory
    for budget in (_total(pool, family) + floor, floor):
        runner, swapper = budgeted_runner(pool, family, budget=budget, policy=policy)
        with swapper:
            for _ in range(2):  # the second pass runs with a warm, partly evicted cache
                assert torch.equal(runner(ids), expected)
            assert swapper.stats.weights_resident_peak_bytes <= budget


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kv_cache_decoding_under_a_budget(family, tiny_pool):
    pool = Pool(tiny_pool)
    ids = torch.randint(2, V, (1, 8), generator=torch.Generator().manual_seed(1))
    floor = min_budget(pool, family, tokens=10, cache=True)
    runner, swapper = budgeted_runner(pool, family, budget=floor)
    with swapper:
        step = runner.forward(ids[:, :5], use_cache=True)
        logits = [step.logits]
        for t in range(5, 8):
            step = runner.forward(
                ids[:, t : t + 1], past_key_values=step.past_key_values, use_cache=True
            )
            logits.append(step.logits)
    full, _ = budgeted_runner(pool, family, budget=None)
    torch.testing.assert_close(torch.cat(logits, 1), full(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_embedding_and_head_served_in_pieces_give_the_same_logits(family, tiny_pool):
    pool = Pool(tiny_pool)
    runner, swapper = budgeted_runner(
        pool, family, budget=min_budget(pool, family, batch=2, tokens=6), piece_fraction=0.0
    )
    assert isinstance(runner.fetch(runner.block_ids[0]), GatheredEmbed)
    assert isinstance(runner.fetch(runner.block_ids[-1]), ChunkedHead)
    ids = torch.randint(2, V, (2, 6), generator=torch.Generator().manual_seed(2))
    expected = budgeted_runner(pool, family, budget=None)[0](ids)
    with swapper:
        torch.testing.assert_close(runner(ids), expected, atol=1e-5, rtol=1e-5)
        assert swapper.stats.weights_resident_peak_bytes <= swapper.budget


def _module_bytes(module):
    return sum(t.nbytes for t in module.state_dict().values())


def test_the_budget_holds_at_every_load_under_a_preloading_race():
    """Random load latencies and compute times; actual resident tensors checked at each load."""
    order = [f"b{i}" for i in range(12)]
    sizes = {b: 1000 * (1 + i % 3) for i, b in enumerate(order)}
    budget = 6500
    rng = random.Random(0)
    swapper_ref: list[BlockSwapper] = []
    violations = []

    def load(bid):
        time.sleep(rng.random() * 0.003)
        module = torch.nn.Linear(1, sizes[bid] // 4 - 1, bias=False)  # (n-1)*4+... bytes
        sw = swapper_ref[0]
        with sw._cond:
            resident = sum(sizes[b] for b in sw._resident) + sizes[bid]
            if sw._used > budget or resident > budget:
                violations.append((bid, sw._used, resident))
        return module

    for policy in POLICIES:
        swapper = BlockSwapper(
            load, sizes, dict.fromkeys(order, 1), order, budget=budget, policy=policy, depth=3
        )
        swapper_ref[:] = [swapper]
        with swapper:
            for _ in range(20):
                for b in order:
                    swapper.fetch(b)
                    time.sleep(rng.random() * 0.002)
        assert swapper.stats.weights_resident_peak_bytes <= budget
    assert violations == []
    assert not [t for t in threading.enumerate() if t.name.startswith("assy-preload")]


def test_preloader_error_reaches_the_compute_thread_and_the_thread_stops():
    order = ["a", "b", "c"]

    def load(bid):
        if bid == "c":
            raise IntegrityError("block c: sha256 mismatch")
        return torch.nn.Identity()

    swapper = BlockSwapper(
        load,
        dict.fromkeys(order, 10),
        dict.fromkeys(order, 1),
        order,
        budget=100,
        policy="prefetch+preswap",
    )
    with pytest.raises(IntegrityError, match="block c"), swapper:
        for b in order:
            swapper.fetch(b)
    assert not [t for t in threading.enumerate() if t.name.startswith("assy-preload")]


def test_ctrl_c_during_compute_shuts_the_preloader_down(tiny_pool):
    pool = Pool(tiny_pool)
    runner, swapper = budgeted_runner(pool, "llama", budget=min_budget(pool, "llama", tokens=4))
    inner = runner.fetch

    def interrupted(bid):
        if pool.blocks[bid].kind == "head":
            raise KeyboardInterrupt
        return inner(bid)

    runner.fetch = interrupted
    with pytest.raises(KeyboardInterrupt), swapper:
        runner(torch.ones(1, 4, dtype=torch.long))
    assert not [t for t in threading.enumerate() if t.name.startswith("assy-preload")]


def test_block_corrupted_during_a_run_is_a_clear_error(tiny_pool, tmp_path):
    import shutil

    root = tmp_path / "pool"
    shutil.copytree(tiny_pool, root)
    pool = Pool(root)
    # on-demand re-loads every block at every pass (a Belady cache might keep layer 1)
    runner, swapper = budgeted_runner(
        pool, "llama", budget=min_budget(pool, "llama", tokens=4), policy="on-demand"
    )
    ids = torch.ones(1, 4, dtype=torch.long)
    with swapper:
        runner(ids)  # every block verified and loaded once
        entry = json.loads((root / "pool.json").read_text())["blocks"]["llama/layer/1"]
        data = bytearray((root / entry["file"]).read_bytes())
        data[-1] ^= 0xFF
        (root / entry["file"]).write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match="llama/layer/1"):
            for _ in range(3):
                runner(ids)


def test_budget_below_the_minimum_names_it(tiny_pool):
    pool = Pool(tiny_pool)
    with pytest.raises(UsageError, match="smallest working set of llama .*use budget"):
        budgeted_runner(pool, "llama", budget=1000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4 * 10**9),
        ("512MB", 512 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("2 kib", 2048),
        ("123", 123),
        (" 1gb ", 10**9),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "4XB", "0", "1.2.3MB"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="size"):
        parse_size(text)


def test_budget_allowance_is_the_budget_and_max_10_percent_or_32_mib():
    from blockpool import budget_allowance

    assert budget_allowance(100 * 10**6) == 100 * 10**6 + (32 << 20)  # small: 32 MiB
    assert budget_allowance(4 * 10**9) == 4 * 10**9 + 4 * 10**8  # large: 10%


def test_one_buffer_reads_equal_tensor_by_tensor_reads(tmp_path):
    """The swapper's loads read a block file with one read into one buffer: the same
    tensors and the same sum as a read per tensor, a misaligned tensor copied out, and a
    header whose tensors overlap refused."""
    import hashlib
    import json as _json
    import struct

    from safetensors.torch import save_file

    from blockpool.reads import read_tensors

    path = tmp_path / "b.safetensors"
    tensors = {
        "a": torch.randn(3, 5),
        "odd": torch.arange(3, dtype=torch.int8),
        "b": torch.randn(4, dtype=torch.float64),
        "empty": torch.zeros(0, 2),
    }
    save_file(tensors, path)
    sums = [hashlib.sha256(), hashlib.sha256()]
    plain = read_tensors(path, hasher=sums[0])
    whole = read_tensors(path, hasher=sums[1], one_buffer=True)
    assert (
        sums[0].hexdigest() == sums[1].hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert whole.keys() == plain.keys() == tensors.keys()
    for name, t in tensors.items():
        assert whole[name].dtype == t.dtype and torch.equal(whole[name], t), name

    # safetensors sorts tensors so that each is aligned; another writer need not
    odd, f = torch.arange(3, dtype=torch.int8), torch.randn(4)
    head = {"odd": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]}}
    head["f"] = {"dtype": "F32", "shape": [4], "data_offsets": [3, 19]}
    text = _json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    loose = tmp_path / "loose.safetensors"
    data = odd.numpy().tobytes() + f.numpy().tobytes()
    loose.write_bytes(struct.pack("<Q", len(text)) + text + data)
    got = read_tensors(loose, one_buffer=True)
    assert torch.equal(got["odd"], odd) and torch.equal(got["f"], f)

    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = _json.loads(raw[8 : 8 + size])
    start = header["b"]["data_offsets"][0]
    header["a"]["data_offsets"] = [start, start + 60]  # over "b"
    text = _json.dumps(header, separators=(",", ":")).encode().ljust(size)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:8] + text + raw[8 + size :])
    with pytest.raises(IntegrityError, match="overlapping"):
        read_tensors(bad, one_buffer=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_in_many_chunks_and_a_partial_last_one(dtype, tiny_pool, monkeypatch):
    """Chunks share one read buffer (and one cast buffer when the pool's dtype is not the
    compute dtype); the last chunk is shorter than the others."""
    monkeypatch.setattr(offload, "_MIN_CHUNK_ROWS", 7)
    pool, family = Pool(tiny_pool), "llama"
    floor = min_budget(pool, family, dtype, batch=2, tokens=6)
    runner, swapper = budgeted_runner(
        pool, family, budget=2 * floor, dtype=dtype, piece_fraction=0.0
    )
    head = runner.fetch(runner.block_ids[-1])
    assert isinstance(head, ChunkedHead)
    ids = torch.randint(2, V, (2, 6), generator=torch.Generator().manual_seed(3))
    expected = budgeted_runner(pool, family, budget=None, dtype=dtype)[0](ids)
    # room for 10 rows: 13 chunks, the last of 8
    monkeypatch.setattr(swapper, "free", lambda: 10 * head.row_cost() + 1)
    with swapper:
        torch.testing.assert_close(runner(ids), expected, atol=1e-5, rtol=1e-5)
        assert swapper.stats.budget_used_peak_bytes <= swapper.budget


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_chunked_heads_first_rows_are_a_block_of_the_swappers_cycle(
    family, tiny_pool, monkeypatch
):
    """A quarter of the room above the smallest working set holds the head's first rows,
    cached or pre-loaded like layers; the logits stay those of the resident model."""
    monkeypatch.setattr(offload, "_MIN_CHUNK_ROWS", 4)
    pool = Pool(tiny_pool)
    head_id = pool.model(family).blocks[-1]
    head_bytes = block_nbytes(pool, head_id, torch.float32)
    # the piece decision's floor: one token's working set
    runner, swapper = budgeted_runner(pool, family, budget=min_budget(pool, family) + head_bytes)
    head = runner.fetch(head_id)
    assert isinstance(head, ChunkedHead) and 4 <= head.prefix_rows < V
    parts = [offload.prefix_id(head_id, i) for i in range(len(head.prefix))]
    assert swapper.order[-len(parts) :] == parts
    # no part is larger than the largest layer: the room for working memory is unchanged
    layers = [b for b in swapper.order if b not in parts]
    assert max(swapper.sizes[b] for b in parts) <= max(swapper.sizes[b] for b in layers)
    ids = torch.randint(2, V, (1, 4), generator=torch.Generator().manual_seed(4))
    expected = budgeted_runner(pool, family, budget=None)[0](ids)
    with swapper:
        for _ in range(3):
            torch.testing.assert_close(runner(ids), expected, atol=1e-5, rtol=1e-5)
        assert swapper.stats.budget_used_peak_bytes <= swapper.budget
        assert swapper.stats.hits + swapper.stats.misses >= 3 * len(swapper.order)
