"""Bad input: every user error exits 2 with a one-line reason and leaves nothing half-written."""

import json

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from safetensors.torch import save_file

import blockpool.build
from assy.cli import cli
from blockpool import Pool, build_pool
from blockpool.errors import IntegrityError, ManifestError


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")
    for word in words:
        assert word in result.output


@pytest.fixture
def pool(tiny_dirs, tmp_path):
    root = tmp_path / "pool"
    build_pool([f"llama={tiny_dirs['llama']}", f"gpt2={tiny_dirs['gpt2']}"], root, dtype="fp32")
    return root


def test_missing_source_path(tmp_path):
    result = run("build-pool", tmp_path / "nope", "--out", tmp_path / "pool")
    assert_user_error(result, "no such file or directory", "smollm2-135m")
    assert not (tmp_path / "pool").exists()


def test_unsupported_architecture_lists_the_families(tmp_path):
    src = tmp_path / "mamba"
    tf.MambaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1).save_pretrained(src)
    save_file({"backbone.embeddings.weight": torch.zeros(16, 8)}, src / "model.safetensors")
    result = run("build-pool", src, "--out", tmp_path / "pool")
    assert_user_error(result, "unsupported architecture", "mamba", "llama", "gemma3", "bert")
    assert not (tmp_path / "pool").exists()


def test_pickle_only_source_is_refused_unless_allowed(tiny_dirs, tmp_path):
    src = tmp_path / "pickled"
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    assert_user_error(run("build-pool", src, "--out", tmp_path / "p1"), "--allow-pickle")
    assert not (tmp_path / "p1").exists()
    result = run("build-pool", src, "--out", tmp_path / "p2", "--dtype", "fp32", "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert run("verify-pool", tmp_path / "p2").exit_code == 0


def test_corrupted_block_is_named_by_verify_and_refused_by_eval(pool, tmp_path):
    manifest = json.loads((pool / "pool.json").read_text())
    entry = manifest["blocks"]["llama/layer/1"]
    data = bytearray((pool / entry["file"]).read_bytes())
    data[-1] ^= 0xFF
    (pool / entry["file"]).write_bytes(bytes(data))

    result = run("verify-pool", pool)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"BAD llama/layer/1 {entry['file']}: sha256 mismatch (file corrupted or modified)"
    ]
    with pytest.raises(IntegrityError, match="llama/layer/1"):
        Pool(pool).build_module("llama/layer/1")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    # eval refuses before it runs anything (the tiny pool has no tokenizer: use the runner)
    from blockpool import BlockRunner

    with pytest.raises(IntegrityError):
        BlockRunner(Pool(pool), "llama")(torch.ones(1, 4, dtype=torch.long))


def test_truncated_manifest(pool):
    text = (pool / "pool.json").read_text()
    (pool / "pool.json").write_text(text[: len(text) // 2])
    assert_user_error(run("inspect", pool), "truncated or not valid JSON", "build-pool")
    assert_user_error(run("verify-pool", pool), "truncated")


def test_manifest_entry_outside_the_pool(pool, tmp_path):
    outside = tmp_path / "evil.safetensors"
    outside.write_bytes(b"x")
    manifest = json.loads((pool / "pool.json").read_text())
    manifest["blocks"]["llama/layer/0"]["file"] = "../evil.safetensors"
    (pool / "pool.json").write_text(json.dumps(manifest))
    assert_user_error(run("verify-pool", pool), "points outside the pool directory")
    with pytest.raises(ManifestError):
        Pool(pool)


def test_missing_pool_and_unknown_model(pool, tmp_path):
    assert_user_error(run("inspect", tmp_path / "none"), "no such pool directory")
    text = tmp_path / "t.txt"
    text.write_text("some text")
    result = run("eval", pool, "--model", "nope", "--task", "perplexity", "--data", text)
    assert_user_error(result, "no model 'nope'", "llama")


def test_killed_build_resumes_to_a_valid_pool(tiny_dirs, tmp_path, monkeypatch):
    root = tmp_path / "pool"
    real_write = blockpool.build.write_tensors
    written = []

    def dying_write(directory, stem, state, meta):
        if len(written) == 2:  # the process dies while writing the third block
            (directory / f".{stem}.safetensors.0123abcd.assy-tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        written.append(real_write(directory, stem, state, meta)[0])
        return written[-1], blockpool.build.sha256_file(written[-1])

    monkeypatch.setattr(blockpool.build, "write_tensors", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build_pool([f"m={tiny_dirs['gemma3']}"], root, dtype="fp32")
    assert not (root / "pool.json").exists()
    first = {p: p.stat().st_mtime_ns for p in written}

    monkeypatch.setattr(blockpool.build, "write_tensors", real_write)
    result = run("build-pool", f"m={tiny_dirs['gemma3']}", "--out", root, "--dtype", "fp32")

    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in first} == first  # complete blocks were kept
    assert not list(root.rglob("*.assy-tmp"))
    assert run("verify-pool", root).exit_code == 0
    assert len(Pool(root).model("m").blocks) == 5


def test_tied_weights_are_stored_once(pool):
    manifest = json.loads((pool / "pool.json").read_text())
    head = manifest["blocks"]["llama/head/0"]
    assert head["tied"] == {"lm_head.weight": "llama/embed/0:tokens.weight"}
    assert "lm_head.weight" not in head["tensors"]
    assert head["bytes"] < 1000  # only the final norm is stored in the head file


def test_inspect_json_and_rebuild_with_other_dtype(pool):
    info = json.loads(run("inspect", pool, "--json").output)
    assert set(info["models"]) == {"llama", "gpt2"}
    assert info["bytes"] == sum(m["bytes"] for m in info["models"].values())
    assert info["models"]["gpt2"]["precisions"] == ["fp32"]


def test_variant_model_records_parents_and_round_trips(pool):
    from blockpool import BlockRunner
    from blockpool.variants import write_variant_model

    def halve(bid, state):
        return {k: v.to(torch.float16) for k, v in state.items()}, {"precision": "fp16"}

    write_variant_model(Pool(pool), "llama", halve, name="llama-half")
    opened = Pool(pool)
    head = opened.blocks["llama-half/head/0"]
    assert head["tied"] == {"lm_head.weight": "llama-half/embed/0:tokens.weight"}
    assert head["parent"]["block"] == "llama/head/0"
    assert opened.verify() == []
    ids = torch.arange(2, 12).unsqueeze(0)
    full = BlockRunner(opened, "llama")(ids)
    half = BlockRunner(opened, "llama-half")(ids)
    torch.testing.assert_close(half, full, atol=1e-2, rtol=0)
