"""The pool never lies and never loses data (issue 11): one test per finding, then the
guarantees around them (permissions, format 1 pools, shapes, the lock's message)."""

import json
import os
import shutil
import stat
import threading

import pytest
import torch
from click.testing import CliRunner
from pool_faults import assert_intact, at_write, make_sources, pool_state
from safetensors.torch import load_file, save_file

from assy.cli import cli
from blockpool import BlockRunner, Pool, build_pool, pool_lock, write_variant_model
from blockpool.errors import IntegrityError, ManifestError, UsageError
from blockpool.sources import open_source


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *words):
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: "), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    for word in words:
        assert word in result.output, result.output


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_sources(tmp_path_factory.mktemp("src"))


@pytest.fixture
def pool(sources, tmp_path):
    root = tmp_path / "pool"
    build_pool([f"m={sources['llama']}", f"g={sources['gpt2']}"], root, dtype="fp32")
    return root


def identity(bid, state):
    return state, {}


# ---------------------------------------------------------------------- 1. path traversal


def test_1_model_names_cannot_leave_the_pool(pool, sources, tmp_path):
    before = pool_state(pool)
    result = run(
        *("prune", pool, "--model", "m", "--method", "magnitude", "--sparsity", "0.5"),
        *("--as", "../../escaped"),
    )
    assert_user_error(result, "--as '../../escaped'", "not a usable model name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]
    assert_intact(pool, before)
    assert run("verify-pool", pool).exit_code == 0
    # every writer goes through the one validator
    for bad in ("../x", "a/b", ".hidden", "x" * 65, "M"):  # "M": differs from "m" by case only
        with pytest.raises(UsageError, match="name"):
            write_variant_model(Pool(pool), "m", identity, name=bad)
        if "/" not in bad:  # with a "/", NAME=SOURCE reads as a path
            with pytest.raises(UsageError, match="name"):
                build_pool([f"{bad}={sources['llama']}"], pool)
    assert_intact(pool, before)


def test_1_a_manifest_naming_a_model_outside_the_pool_is_refused(pool):
    doc = json.loads((pool / "pool.json").read_text())
    doc["models"]["../evil"] = doc["models"].pop("g")
    (pool / "pool.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="not a plain name"):
        Pool(pool)


# ------------------------------------------------------- 2. stale weights under a new origin


def test_2_rebuild_from_other_weights_with_equal_headers_is_refused(pool, sources, tmp_path):
    before = pool_state(pool)
    src = tmp_path / "changed"
    shutil.copytree(sources["llama"], src)
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] += 1.0  # changed in place: same shapes, dtypes
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert open_source(str(src)).fingerprint == open_source(str(sources["llama"])).fingerprint

    assert_user_error(
        run("build-pool", f"m={src}", "--out", pool, "--dtype", "fp32"),
        "already holds a model named 'm' built from other weights",
        "m/layer/1",
    )
    assert_user_error(  # another checkpoint of the same architecture and config
        run("build-pool", f"m={sources['llama_b']}", "--out", pool, "--dtype", "fp32"),
        "built from other weights",
    )
    assert_intact(pool, before)
    assert run("verify-pool", pool).exit_code == 0


def test_2_the_same_weights_from_elsewhere_are_reused_and_the_origin_updated(
    pool, sources, tmp_path
):
    before = pool_state(pool)
    moved = tmp_path / "moved"
    shutil.copytree(sources["llama"], moved)
    assert run("build-pool", f"m={moved}", "--out", pool, "--dtype", "fp32").exit_code == 0
    after = pool_state(pool)
    for what in ("blocks", "tokenizer"):  # every file reused: same files, same sums
        assert after["m"][what] == before["m"][what]
    assert Pool(pool).model("m").origin == str(moved)


def test_2_a_killed_build_resumes_only_blocks_made_from_the_weights_read(sources, tmp_path):
    root, src = tmp_path / "pool", tmp_path / "src"
    shutil.copytree(sources["llama"], src)
    with (
        at_write(3, lambda: (_ for _ in ()).throw(KeyboardInterrupt)),
        pytest.raises(KeyboardInterrupt),
    ):
        build_pool([f"m={src}"], root, dtype="fp32")
    assert not (root / "pool.json").exists()
    state = load_file(src / "model.safetensors")
    state["model.embed_tokens.weight"] += 1.0  # the source changes before the rerun
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    build_pool([f"m={src}"], root, dtype="fp32")
    embed = Pool(root).load_tensors("m/embed/0")["tokens.weight"]
    torch.testing.assert_close(embed, state["model.embed_tokens.weight"], atol=0, rtol=0)
    assert Pool(root).verify() == []


# ----------------------------------------------------------------- 3. deleting user files


def test_3_build_into_an_existing_directory_keeps_the_users_files(sources, tmp_path):
    out = tmp_path / "work"
    mine = [out / ".draft.tmp", out / "notes" / ".x.tmp", out / "blocks" / ".y.tmp"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    leftover = out / "blocks" / "m" / ".layer.000.safetensors.0123abcd.assy-tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"a killed writer's")
    assert run("build-pool", f"m={sources['llama']}", "--out", out).exit_code == 0
    assert all(p.read_text() == "mine" for p in mine)
    assert not leftover.exists()


# ----------------------------------------------------------------------- 4. lost updates


def _hold(root, ready, release):
    with pool_lock(root):
        ready.set()
        release.wait(30)


def test_4_a_second_writer_is_refused_at_once_naming_the_holder(pool, sources):
    before = pool_state(pool)
    ready, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(pool, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        words = ["is being written by", f"pid {os.getpid()}", "--wait"]
        assert_user_error(run("build-pool", f"b={sources['llama_b']}", "--out", pool), *words)
        prune = ("prune", pool, "--model", "m", "--method", "magnitude", "--sparsity", "0.5")
        assert_user_error(run(*prune, "--as", "m50"), *words)
        assert_user_error(run("quantize", sources["llama"].parent, "--out", pool), "--precision")
    finally:
        release.set()
        holder.join()
    assert_intact(pool, before)


def test_4_wait_waits_for_the_holder_and_loses_nothing(pool, sources):
    before = pool_state(pool)
    ready, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(pool, ready, release))
    holder.start()
    assert ready.wait(30)
    threading.Timer(0.5, release.set).start()
    result = run("build-pool", f"b={sources['llama_b']}", "--out", pool, "--wait")
    holder.join()
    assert result.exit_code == 0, result.output
    after = assert_intact(pool, before)
    assert set(after) == {"m", "g", "b"}


# --------------------------------------------------------------- 5. silent replacement


def test_5_quantize_refuses_to_replace_a_different_model_of_the_same_name(sources, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_pool([f"m={sources['llama']}"], a, dtype="fp32")
    build_pool([f"m={sources['llama_b']}"], b, dtype="fp32")
    before = pool_state(b)
    assert_user_error(
        run("quantize", a, "--out", b, "--precision", "int8"),
        "--out",
        "already holds a different model named 'm'",
    )
    assert_intact(b, before)
    # a variant of the same source blocks may be written again (another precision)
    c = tmp_path / "c"
    assert run("quantize", a, "--out", c, "--precision", "int8").exit_code == 0
    assert run("quantize", a, "--out", c, "--precision", "nf4").exit_code == 0
    assert {e.precision for e in Pool(c).blocks.values()} == {"nf4"}
    assert Pool(c).verify() == []


def test_5_prune_and_merge_refuse_a_taken_name(pool):
    before = pool_state(pool)
    from assy.lego import parse_sparsity, prune_pool_model

    with pytest.raises(UsageError, match="already"):
        prune_pool_model(Pool(pool), "m", "magnitude", parse_sparsity("0.5"), "g")
    with pytest.raises(UsageError, match="already"):
        write_variant_model(Pool(pool), "m", identity, name="g")
    assert_intact(pool, before)


# ------------------------------------------------------- 6. half-written in-place rebuild


def test_6_an_interrupted_rebuild_leaves_the_old_model_valid(pool, sources, tmp_path):
    ids = torch.arange(2, 12).unsqueeze(0)
    logits = BlockRunner(Pool(pool), "m")(ids)
    for step in (1, 3, 5):  # the 2nd block, the last layer, a tokenizer file
        copy = tmp_path / f"copy{step}"
        shutil.copytree(pool, copy)
        before = pool_state(copy)
        with (
            at_write(step, lambda: (_ for _ in ()).throw(KeyboardInterrupt)),
            pytest.raises(KeyboardInterrupt),
        ):
            build_pool([f"m={sources['llama']}"], copy, dtype="fp16")
        assert_intact(copy, before)
        assert Pool(copy).verify() == []
        torch.testing.assert_close(BlockRunner(Pool(copy), "m")(ids), logits, atol=0, rtol=0)
        build_pool([f"m={sources['llama']}"], copy, dtype="fp16")  # the rerun completes
        after = Pool(copy)
        assert {after.blocks[b].precision for b in after.model("m").blocks} == {"fp16"}
        assert after.verify() == [] and pool_state(copy)["g"] == before["g"]
        files = list((copy / "blocks" / "m").iterdir())
        assert len(files) == len(before["m"]["blocks"])  # the old version was removed


# ------------------------------------------ 7. verify-pool covers what a run depends on


def test_7_verify_pool_names_a_tampered_tokenizer_and_config(pool):
    rel = next(r for r in Pool(pool).model("m").tokenizer if r.endswith("tokenizer.json"))
    original = (pool / rel).read_bytes()
    (pool / rel).write_bytes(original.replace(b'"[UNK]"', b'"[UNX]"'))
    result = run("verify-pool", pool)
    assert result.exit_code == 1
    assert f"BAD m/tokenizer {rel}: sha256 mismatch" in result.output
    with pytest.raises(IntegrityError, match="tokenizer"):
        Pool(pool).tokenizer("m")
    (pool / rel).write_bytes(original)

    doc = json.loads((pool / "pool.json").read_text())
    doc["models"]["m"]["config"]["rope_theta"] = 500000.0
    (pool / "pool.json").write_text(json.dumps(doc))
    result = run("verify-pool", pool)
    assert result.exit_code == 1
    assert "BAD m/config pool.json: config does not match its sum" in result.output
    with pytest.raises(IntegrityError, match="config"):
        BlockRunner(Pool(pool), "m")


def test_7_a_block_that_does_not_fit_its_config_is_named_before_loading(pool):
    from blockpool.entries import config_digest

    doc = json.loads((pool / "pool.json").read_text())
    config = doc["models"]["m"]["config"]
    config["intermediate_size"] = 40  # consistent with its sum: only the shapes disagree
    doc["models"]["m"]["config_sha256"] = config_digest(config)
    (pool / "pool.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=r"block m/layer/0: tensor mlp\.\w+_proj\.weight"):
        Pool(pool).build_module("m/layer/0")


def _as_format_1(root):
    """Rewrite a pool the way format 1 laid it out: plain file names, no new sums."""
    doc = json.loads((root / "pool.json").read_text())
    doc["format_version"] = 1
    for entry in doc["blocks"].values():
        entry.pop("source_sha256", None)
        old = root / entry["file"]
        stem = old.name.rsplit("-", 1)[0]
        entry["file"] = f"blocks/{entry['model']}/{stem}.safetensors"
        old.rename(root / entry["file"])
    for name, model in doc["models"].items():
        model.pop("config_sha256", None)
        model["source"].pop("sha256", None)
        files = {}
        for rel, digest in model["tokenizer"].items():
            new = f"tokenizers/{name}/{rel.rsplit('/', 1)[1]}"
            (root / rel).rename(root / new)
            files[new] = digest
        model["tokenizer"] = files
    (root / "pool.json").write_text(json.dumps(doc))


def test_7_a_format_1_pool_opens_verifies_and_gains_the_new_sums(pool, sources):
    _as_format_1(pool)
    result = CliRunner().invoke(cli, ["verify-pool", str(pool)])
    assert result.exit_code == 0 and "--rehash" in result.output
    assert Pool(pool).tokenizer("m") is not None
    ids = torch.arange(2, 12).unsqueeze(0)
    logits = BlockRunner(Pool(pool), "m")(ids)
    # a rebuild from other weights is refused by comparing the tensors themselves
    assert_user_error(
        run("build-pool", f"m={sources['llama_b']}", "--out", pool, "--dtype", "fp32"),
        "other weights",
    )
    assert run("verify-pool", pool, "--rehash").exit_code == 0
    doc = json.loads((pool / "pool.json").read_text())
    assert doc["format_version"] == 2
    assert all("config_sha256" in m for m in doc["models"].values())
    torch.testing.assert_close(BlockRunner(Pool(pool), "m")(ids), logits, atol=0, rtol=0)
    # the same weights rebuild (checked against the format-1 blocks) and gain source sums
    assert (
        run("build-pool", f"m={sources['llama']}", "--out", pool, "--dtype", "fp16").exit_code == 0
    )
    assert all(Pool(pool).blocks[b].source_sha256 for b in Pool(pool).model("m").blocks)
    assert Pool(pool).verify() == []


# ------------------------------------------------------------------------ the general rule


def test_pool_files_get_ordinary_permissions(sources, tmp_path):
    old = os.umask(0o022)
    try:
        build_pool([f"m={sources['llama']}"], tmp_path / "pool", dtype="fp32")
    finally:
        os.umask(old)
    for path in (tmp_path / "pool").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_a_writer_that_fails_early_leaves_no_directory(sources, tmp_path):
    out = tmp_path / "new" / "pool"
    assert_user_error(run("build-pool", f"m={tmp_path / 'missing'}", "--out", out))
    with at_write(1, lambda: (_ for _ in ()).throw(OSError(28, "No space left on device"))):
        result = run("build-pool", f"m={sources['llama']}", "--out", out)
    assert_user_error(result, "disk is full")
    assert not (out / "pool.json").exists()


def test_a_block_file_is_decided_by_its_content_alone(tmp_path):
    """The same tensors and metadata give the same bytes, so the same sum and name:
    safetensors writes its metadata map in no fixed order, the pool sorts it."""
    from safetensors import safe_open

    from blockpool.reads import read_header
    from blockpool.storage import write_tensors

    torch.manual_seed(0)
    state = {"w.weight": torch.randn(3, 4), "a.bias": torch.randn(4).half()}
    meta = {k: f"value-{k}" for k in ("kind", "block_id", "precision", "index", "family", "z", "a")}
    written = [write_tensors(tmp_path / str(i), "layer.003", state, meta) for i in range(3)]

    assert len({digest for _, digest in written}) == 1
    path = written[0][0]
    assert list(read_header(path)[2]) == sorted(meta)
    with safe_open(str(path), "pt") as f:  # still a valid file holding what was given
        assert f.metadata() == meta
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
