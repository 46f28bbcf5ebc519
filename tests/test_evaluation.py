"""The scoring engine on pool runners: shared contexts, chunked head, metrics, CLI."""

import json
import math
import shutil

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from tiny_models import char_tokenizer

from assy.cli import cli
from assy.data import MCExample
from assy.errors import UsageError
from assy.evaluation import (
    Request,
    Score,
    choice_requests,
    choice_scores,
    mc_metrics,
    perplexity,
    sample_records,
    score,
    scored_bytes,
)
from blockpool import (
    BlockRunner,
    ChainRunner,
    Pool,
    RunOptions,
    build_pool,
    open_runner,
)

FAMILIES = ("llama", "gemma3", "qwen2", "gpt2")  # rotary (tied, sliding), untied, absolute

EXAMPLES = [
    MCExample("Question: which animal is quick?\nAnswer:", (" the fox", " a dog", " b"), 0),
    MCExample("the quick brown", (" fox", " model jumps over the lazy dog", " d"), 1),
    MCExample("blocks of pre-trained models are ", ("assembled", "read"), 0),
    MCExample("a", (" small model reads a short text", " b"), 1),
    MCExample("", (" the lazy dog", " the fox"), 0),
    MCExample("Question: which animal is quick?\nAnswer:", (" x", " y"), 1),  # same context
    MCExample("x" * 40 + " long context then", (" yes", " no"), 0),
]


@pytest.fixture(scope="module")
def pool_dir(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    sources = []
    for family in FAMILIES:
        shutil.copytree(tiny_dirs[family], root / family)
        char_tokenizer().save_pretrained(root / family)
        sources.append(f"{family}={root / family}")
    build_pool(sources, root / "pool", dtype="fp32")
    return root / "pool"


def _hf(tiny_dirs, family):
    return tf.AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()


def _brute(hf, request: Request, max_length: int) -> tuple[float, bool]:
    """One unpadded full pass of the lm-eval input: (summed log-prob, greedy)."""
    tokens = list(request.context + request.continuation)[-(max_length + 1) :]
    n = len(request.continuation)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([tokens[:-1]])).logits[0, -n:].float()
    target = torch.tensor(request.continuation)
    lp = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
    return lp, bool((logits.argmax(-1) == target).all())


@pytest.mark.parametrize(
    ("family", "batch_size", "batch_tokens", "max_length"),
    [(f, 8, 1024, 60) for f in FAMILIES] + [("gemma3", 3, 16, 32), ("gpt2", 3, 16, 32)],
)
def test_runner_scores_equal_one_full_pass_per_request(
    family, batch_size, batch_tokens, max_length, pool_dir, tiny_dirs
):
    # Prepare: contexts shared by several choices, one-token and long choices, a context
    # longer than the sliding window (gemma3: 4) and inputs cut by max_length
    pool = Pool(pool_dir)
    tok = pool.tokenizer(family)
    requests = [r for row in choice_requests(tok, EXAMPLES) for r in row]
    hf = _hf(tiny_dirs, family)

    # Execute: tiny head_bytes so the vocabulary goes in chunks, tiny batch_tokens so
    # inputs go in pieces through the KV cache
    got = score(
        BlockRunner(pool, family),
        requests,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        head_bytes=4 * 128 * 3,
        max_length=max_length,
        progress=False,
    )

    # Assert
    for request, s in zip(requests, got, strict=True):
        expected, greedy = _brute(hf, request, max_length)
        assert s.loglik == pytest.approx(expected, rel=1e-6, abs=1e-5)
        assert s.greedy == greedy


def test_runner_never_computes_logits_for_unscored_positions(pool_dir, monkeypatch):
    pool = Pool(pool_dir)
    runner = BlockRunner(pool, "llama")
    tok = pool.tokenizer("llama")
    rows, heads = [], []
    fetch = runner.fetch

    def recording(bid):
        module = fetch(bid)
        if bid != runner.block_ids[-1]:
            return module
        return lambda hidden: rows.append(hidden.shape) or module(hidden)

    monkeypatch.setattr(runner, "fetch", recording)
    forward = runner.forward
    monkeypatch.setattr(
        runner, "forward", lambda *a, **k: heads.append(k.get("head")) or forward(*a, **k)
    )

    scores = choice_scores(runner, tok, EXAMPLES, head_bytes=4 * 128 * 5, progress=False)

    assert heads and not any(heads)  # the layers run headless
    requests = [r for row in choice_requests(tok, EXAMPLES) for r in row]
    scored = len({r.context for r in requests}) + sum(len(r.continuation) - 1 for r in requests)
    assert sum(shape[0] for shape in rows) == scored  # each context's last position once
    assert max(shape[0] for shape in rows) == 5  # groups of head_bytes / (4 V) positions
    assert len(scores) == len(EXAMPLES)


def test_context_is_run_once_and_one_token_choices_need_no_pass(pool_dir, monkeypatch):
    pool = Pool(pool_dir)
    runner = BlockRunner(pool, "llama")
    tok = pool.tokenizer("llama")
    boolq = [MCExample(f"passage {i} " + "z" * 30 + "\nAnswer:", ("n", "y"), 1) for i in range(4)]
    tokens = []
    forward = runner.forward
    monkeypatch.setattr(
        runner, "forward", lambda ids, *a, **k: tokens.append(ids.shape) or forward(ids, *a, **k)
    )

    choice_scores(runner, tok, boolq, batch_size=8, progress=False)

    # one prefill of the four contexts; the one-token choices are scored from it
    assert tokens == [torch.Size([4, len(tok(boolq[0].context).input_ids)])]


def test_tied_head_shares_the_embedding_table(pool_dir, tiny_dirs):
    pool = Pool(pool_dir)
    runner = BlockRunner(pool, "llama")  # tie_word_embeddings=True
    ids = torch.tensor([[1, 5, 9, 11]])
    logits = runner(ids)
    embed, head = (runner.build(b) for b in (runner.block_ids[0], runner.block_ids[-1]))
    assert head.lm_head.weight.data_ptr() == embed.tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(logits, _hf(tiny_dirs, "llama")(ids).logits)
    untied = BlockRunner(pool, "qwen2")
    untied(ids)
    q_embed, q_head = (untied.build(b) for b in (untied.block_ids[0], untied.block_ids[-1]))
    assert q_head.lm_head.weight.data_ptr() != q_embed.tokens.weight.data_ptr()


def test_a_chain_with_a_stateful_seam_scores_whole_inputs(pool_dir, tiny_dirs):
    from blockpool import Seam

    class Keep(Seam):
        def forward(self, hidden, context):
            return hidden

    pool = Pool(pool_dir)
    blocks = pool.model("llama").blocks
    chain = ChainRunner(pool, [*blocks[:2], Keep(), *blocks[2:]])
    tok = pool.tokenizer("llama")
    requests = [r for row in choice_requests(tok, EXAMPLES[:3]) for r in row]
    got = score(chain, requests, progress=False)
    hf = _hf(tiny_dirs, "llama")
    for request, s in zip(requests, got, strict=True):
        assert s.loglik == pytest.approx(_brute(hf, request, 2048)[0], abs=1e-5)


def test_acc_norm_divides_by_the_choice_without_its_delimiter():
    # lm-eval: " no"/" yes" count 2/3 characters; counting the space (3/4) flips this one
    boolq = [MCExample("c", (" no", " yes"), 1)]
    assert mc_metrics([[-4.1, -6.0]], boolq)["acc_norm"] == 1.0
    assert -4.1 / 3 > -6.0 / 4  # what the old definition picked
    # bytes: "é" is two bytes, one character
    ex = [MCExample("c", (" éé", " abc"), 0)]
    metrics = mc_metrics([[-5.0, -6.5]], ex)  # per char -2.5 < -2.17, per byte -1.25 > -2.17
    assert (metrics["acc_norm"], metrics["acc_bytes"]) == (0.0, 1.0)
    three = mc_metrics([[-1.0, -2.0]] * 2 + [[-2.0, -1.0]], [MCExample("c", (" a", " b"), 0)] * 3)
    assert three["acc_bytes_stderr"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 2))


def test_sample_records_carry_lm_eval_fields():
    ex = [MCExample("ctx", (" a", " bb"), 1)]
    (record,) = sample_records(ex, [[Score(-1.0, True), Score(-1.5, False)]])
    assert record == {
        "doc_id": 0,
        "target": 1,
        "arguments": [["ctx", " a"], ["ctx", " bb"]],
        "resps": [[-1.0, True], [-1.5, False]],
        "acc": 0.0,
        "acc_norm": 1.0,
        "acc_bytes": 1.0,
        "pred": 0,
        "pred_norm": 1,
        "pred_bytes": 1,
    }


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_perplexity_on_a_runner_equals_the_hf_loss(family, pool_dir, tiny_dirs):
    pool = Pool(pool_dir)
    tok = pool.tokenizer(family)
    text = "the quick brown fox jumps over the lazy dog. " * 6
    ids = tok(text).input_ids[:200]
    hf = _hf(tiny_dirs, family)
    total, count = 0.0, 0
    for start in range(0, len(ids), 64):
        chunk = torch.tensor([ids[start : start + 64]])
        with torch.no_grad():
            total += hf(input_ids=chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1

    result = perplexity(
        BlockRunner(pool, family), tok, text, max_tokens=200, window=64, progress=False
    )

    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, abs=1e-5)
    nbytes = scored_bytes(tok, text, max_tokens=200, window=64)
    assert nbytes == result["bytes"] == count  # one ASCII character per token
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / nbytes, rel=1e-6)
    assert 0 < result["nll_stderr"] < result["nll"]
    assert result["perplexity_stderr"] == pytest.approx(result["perplexity"] * result["nll_stderr"])


def test_score_refuses_bad_requests(pool_dir):
    runner = BlockRunner(Pool(pool_dir), "llama")
    with pytest.raises(UsageError, match="non-empty"):
        score(runner, [Request((), (1,))], progress=False)
    with pytest.raises(UsageError, match="max_length"):
        score(runner, [Request((1,), (2, 3, 4))], max_length=2, progress=False)


# --------------------------------------------------------------------------- assy eval


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_cli_logs_samples_and_names_the_split(pool_dir, tmp_path):
    data = _jsonl(
        tmp_path / "mc.jsonl",
        [
            {"context": ex.context, "choices": list(ex.choices), "label": ex.label}
            for ex in EXAMPLES
        ],
    )
    samples = tmp_path / "samples.jsonl"
    args = ["eval", str(pool_dir), "--model", "gemma3", "--task", "piqa", "--data", str(data)]
    result = CliRunner().invoke(
        cli, [*args, "--log-samples", str(samples), "--json", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["data"] == str(data) and out["n"] == len(EXAMPLES)
    assert {"acc_stderr", "acc_norm_stderr", "acc_bytes", "acc_bytes_stderr"} <= set(out)
    assert out["max_length"] == Pool(pool_dir).config("gemma3").max_position_embeddings
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["doc_id"] for r in records] == list(range(len(EXAMPLES)))
    assert sum(r["acc"] for r in records) / len(records) == out["acc"]

    result = CliRunner().invoke(cli, [*args, "--max-length", "40", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_length"] == 40
    result = CliRunner().invoke(cli, [*args, "--max-length", "8"])
    assert result.exit_code == 2 and "exceeds --max-length 8" in result.output


def test_eval_cli_refuses_unknown_tasks_and_splits(pool_dir):
    result = CliRunner().invoke(cli, ["eval", str(pool_dir), "--model", "llama", "--task", "nope"])
    assert result.exit_code == 2 and "unknown task 'nope'" in result.output
    result = CliRunner().invoke(
        cli, ["eval", str(pool_dir), "--model", "llama", "--task", "piqa", "--split", "test"]
    )
    assert result.exit_code == 2 and "--split" in result.output


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_budgeted_run_scores_equal_resident(family, pool_dir):
    """Within a budget (the swapper, a tied head served in pieces) the scores are the
    resident run's."""
    from blockpool.offload import min_budget

    pool = Pool(pool_dir)
    tok = pool.tokenizer(family)
    rows = choice_requests(tok, EXAMPLES)
    budget = 2 * min_budget(pool, family, batch=8, tokens=64, cache=True)
    scores = {}
    for label, options in (("resident", RunOptions()), ("budget", RunOptions(budget=budget))):
        with open_runner(pool, family, options) as run:
            scores[label] = score(run.runner, [r for row in rows for r in row], progress=False)
    for a, b in zip(scores["resident"], scores["budget"], strict=True):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-5) and a.greedy == b.greedy
