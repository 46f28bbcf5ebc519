"""``--device cpu`` and ``--threads`` on every command that runs blocks: explicit equals default."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from tiny_models import char_tokenizer

from assy.cli import cli
from blockpool import Pool, build_pool

TEXT = " ".join(f"the {w} sat on the mat and looked at the {w}." for w in "cat dog owl fox" * 40)


@pytest.fixture(scope="module")
def pool_dir(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    sources = []
    for family in ("llama", "gemma3"):
        shutil.copytree(tiny_dirs[family], root / family)
        char_tokenizer().save_pretrained(root / family)
        sources.append(f"{family}={root / family}")
    build_pool(sources, root / "pool", dtype="fp32")
    (root / "text.txt").write_text(TEXT)
    return root / "pool"


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _json(args):
    return json.loads(_run(args).strip().splitlines()[-1])


def test_eval_and_generate(pool_dir):
    text = str(pool_dir.parent / "text.txt")
    base = ["eval", str(pool_dir), "--model", "gemma3", "--task", "perplexity", "--data", text]
    base += ["--max-tokens", "200", "--window", "64", "--json"]
    default = _json(base)
    explicit = _json([*base, "--device", "cpu", "--threads", "1"])
    assert explicit["perplexity"] == default["perplexity"]
    assert explicit["threads"] == 1 and explicit["device"] == "cpu" and default["threads"] >= 1
    gen = ["generate", str(pool_dir), "--model", "llama", "--prompt", "the cat", "--json"]
    gen += ["--max-new-tokens", "6"]
    assert _json(gen)["text"] == _json([*gen, "--device", "cpu", "--threads", "1"])["text"]


def test_compare(pool_dir, tmp_path):
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(TEXT.split(".")[:12]))
    base = ["compare", str(pool_dir), "--data", str(data), "--samples", "8", "--json"]
    a = _json([*base, "--out", str(tmp_path / "a")])
    b = _json([*base, "--out", str(tmp_path / "b"), "--device", "cpu", "--threads", "1"])
    assert a["top_seams"] == b["top_seams"] and b["threads"] == 1


def test_prune_and_quantize(pool_dir, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(pool_dir, pool)
    text = str(pool_dir.parent / "text.txt")
    base = ["prune", str(pool), "--model", "llama", "--method", "wanda", "--sparsity", "0.5"]
    base += ["--calib-data", text, "--samples", "4", "--seq-len", "32", "--json"]
    _run([*base, "--as", "p-default"])
    report = _json([*base, "--as", "p-cpu", "--device", "cpu", "--threads", "1"])
    assert report["threads"] == 1
    opened = Pool(pool)
    for a, b in zip(opened.model("p-default").blocks, opened.model("p-cpu").blocks, strict=True):
        for name, tensor in opened.load_tensors(a).items():
            assert torch.equal(tensor, opened.load_tensors(b)[name]), (a, name)

    base = ["quantize", str(pool_dir), "--auto", "--target-bits", "14", "--model", "gemma3"]
    base += ["--calib-data", text, "--calib-samples", "4", "--calib-seq-len", "16", "--json"]
    a = _json([*base, "--out", str(tmp_path / "qa")])
    b = _json([*base, "--out", str(tmp_path / "qb"), "--device", "cpu", "--threads", "1"])
    assert a["plan"]["precisions"] == b["plan"]["precisions"] and b["threads"] == 1


def test_a_device_that_is_not_here_is_a_usage_error(pool_dir):
    result = CliRunner().invoke(
        cli, ["generate", str(pool_dir), "--model", "llama", "--prompt", "a", "--device", "cuda:3"]
    )
    assert result.exit_code == 2 and "device" in result.output
    result = CliRunner().invoke(
        cli, ["generate", str(pool_dir), "--model", "llama", "--prompt", "a", "--device", "tpu"]
    )
    assert result.exit_code == 2 and "tpu" in result.output
