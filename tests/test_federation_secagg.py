"""``assy federate --secagg``: Flower's SecAgg+ on the simulation engine, with tiny models.

A one-round fedit run with ``--secagg`` against the same round without it (same seed, so
every client trains the same update): the global adapters agree within SecAgg+'s
quantization error, and no message a client sent under SecAgg+ carries its adapter in
the clear. Then the
refusals: ``--method local``/``lego`` and fewer than 2 clients per round.
"""

from __future__ import annotations

import base64
import functools
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_federation import _federate, _one_thread, make_tiny_federation  # noqa: F401 (autouse)

from assy.errors import UsageError
from assy.federation.config import FederationConfig

pytestmark = pytest.mark.slow
ARRAYS = "__arrays__"


def capture_mod(msg, context, call_next, *, directory: str):
    """Keep every training reply a client sends (each SecAgg+ stage's too): its arrays as
    safetensors, its config values as JSON (bytes in base64)."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == "train" and reply.has_content():
        arrays, values = {}, {}
        for name, record in reply.content.items():
            if hasattr(record, "to_numpy_ndarrays"):
                for k, a in record.items():
                    arrays[f"{name}/{k}"] = torch.from_numpy(a.numpy().copy())
            else:
                values[name] = {k: _plain(v) for k, v in record.items()}
        pid = int(context.node_config["partition-id"])
        stem = Path(directory) / f"r{msg.metadata.group_id}-p{pid}-{uuid.uuid4().hex}"
        save_file(arrays, f"{stem}.safetensors")
        Path(f"{stem}.json").write_text(json.dumps(values))
    return reply


def _plain(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _unplain(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def _captured(stem: Path) -> dict:
    """A reply kept by :func:`capture_mod`: ``{record: {key: value}}``, an array record as
    ``{ARRAYS: {key: numpy array}}`` (by name, sorted: SecAgg+'s order)."""
    records = {
        name: {k: _unplain(v) for k, v in fields.items()}
        for name, fields in json.loads(stem.with_suffix(".json").read_text()).items()
    }
    for key, tensor in sorted(load_file(stem.with_suffix(".safetensors")).items()):
        name, _, k = key.partition("/")
        records.setdefault(name, {ARRAYS: {}})[ARRAYS][k] = tensor.numpy()
    return records


def _run(root: Path, pool: Path, data: Path, secagg: bool):
    from assy.federation.engine import run_federation

    out, captured = root / ("secagg" if secagg else "plain"), root / f"captured-{secagg}"
    captured.mkdir()
    cfg = FederationConfig(
        pool=str(pool), task="arc_easy", method="fedit", rounds=1, out=str(out),
        data=str(data), clients=4, per_round=3, tiers="none", local_steps=3, test_limit=16,
        secagg=secagg,
    )  # fmt: skip
    lines: list[str] = []
    mods = [functools.partial(capture_mod, directory=str(captured))]
    run_federation(cfg, lines.append, client_mods=mods, cpus=2)
    history = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    final = load_file(out / "state" / "global-r00001.safetensors")
    by_client: dict[int, list[dict]] = {}
    for path in sorted(captured.glob("r1-*.json")):
        stem = path.with_suffix("")
        by_client.setdefault(int(path.stem.split("-")[1][1:]), []).append(_captured(stem))
    return history, final, by_client, lines, cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The ``--secagg`` run on the engine, and the same round without SecAgg+ computed in
    this process (as ``test_federation_engine``'s replay): the sampled clients train with
    the run's own client code (bit for bit what they train on the engine, one thread
    each), the global is their FedAvg."""
    from assy.federation import task
    from assy.federation.strategy import Update, aggregate_adapters
    from blockpool import Pool

    root = tmp_path_factory.mktemp("secagg")
    pool, data = make_tiny_federation(root)
    history, secure, replies, lines, cfg = _run(root, pool, data, secagg=True)
    sizes = [len(c) for c in task.federated_data(cfg).clients]
    initial = task.initial_adapter(Pool(cfg.pool), "llama", cfg)
    updates = {p: task.fedit_round(cfg, p, initial, 1) for p in history[1]["sampled"]}
    plain, _ = aggregate_adapters(
        initial, [Update(p, s, sizes[p], 0, "llama") for p, (s, _) in updates.items()]
    )
    return history, secure, replies, lines, plain, updates


def test_secagg_global_agrees_with_plain_fedavg_within_quantization(runs):
    from assy.federation.secagg import quantization_bound

    history, secure, _, lines, plain, updates = runs
    record = history[1]
    assert record["aggregation"] == "secagg-fedavg" and record["rejected"] == []
    assert record["accepted"] == record["sampled"] == sorted(updates)
    assert "screening is off" in record["secagg"]["screening"]
    group = record["secagg"]["groups"]["llama"]
    assert group["aggregate"] == "ok" and group["summed"] == record["accepted"]
    assert [s["stage"] for s in record["secagg"]["stages"]] == [
        "setup", "share keys", "collect masked vectors", "unmask",
    ]  # fmt: skip
    # every stage's messages are counted: more than the adapters themselves
    adapter_bytes = sum(t.numel() * 4 for s, _ in updates.values() for t in s.values())
    assert record["bytes_up"] > adapter_bytes and record["bytes_down"] > adapter_bytes
    # no value of any client's adapter came near the clipping range (measured here)
    peak = max(float(t.abs().max()) for s, _ in updates.values() for t in s.values())
    assert peak < group["clipping_range"] / 2, (peak, group["clipping_range"])
    counts = [int(m["num-examples"]) for _, m in updates.values()]
    assert group["max_weight"] == max(counts)
    bound = quantization_bound(group["clipping_range"], counts)  # 5e-7 here
    worst = max(float((secure[k].double() - plain[k].double()).abs().max()) for k in plain)
    assert 0 < worst <= bound + 1e-7, (worst, bound)  # + float32 rounding of the two sums
    assert lines[-1].startswith("done: 1 rounds")
    assert not [ln for ln in lines if "warn" in ln.lower() or "secure aggregation" in ln.lower()]


def test_secagg_replies_never_carry_a_clients_adapter_in_the_clear(runs):
    from flwr.common import bytes_to_ndarray

    history, _, secure_replies, _, _, updates = runs
    for p in history[1]["accepted"]:
        state = updates[p][0]  # what p sends without SecAgg+
        update = [state[k].numpy() for k in sorted(state)]
        stages = secure_replies[p]
        assert len(stages) == 4  # public keys, key shares, masked vector, unmask shares
        masked = []
        for reply in stages:
            for name, record in reply.items():
                if ARRAYS in record:  # Flower's mod empties the FitRes parameters
                    assert not any(a.size for a in record[ARRAYS].values()), f"{name}: arrays"
                    continue
                for value in record.values():
                    blobs = value if isinstance(value, list) else [value]
                    for blob in (b for b in blobs if isinstance(b, bytes)):
                        for tensor in update:  # no tensor's float32 bytes, not even a row
                            row = np.ascontiguousarray(tensor.reshape(tensor.shape[0], -1)[0])
                            assert row.tobytes() not in blob, f"client {p}'s adapter sent"
                if "masked_params" in record:
                    masked = [bytes_to_ndarray(b) for b in record["masked_params"]]
        assert len(masked) == 1 + len(update)  # the weight, then one array per tensor
        for plain, sent in zip(update, masked[1:], strict=True):
            assert plain.shape == sent.shape
            if plain.size >= 256 and plain.std() > 0:  # masks look uniform: no correlation
                corr = np.corrcoef(plain.ravel(), sent.ravel().astype(np.float64))[0, 1]
                assert abs(corr) < 0.3, (p, corr)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "local"], "--secagg sums the clients' adapters securely: --method local"),
        (["--method", "fedit", "--per-round", "1"], "--secagg needs at least 2 clients per round"),
        (["--method", "fedit", "--clients", "1", "--per-round", "1"], "--secagg needs at least 2"),
    ],
)
def test_secagg_refusals_exit_2_with_one_line_and_write_nothing(tmp_path, extra, message):
    fed = make_tiny_federation(tmp_path)
    out = tmp_path / "out"
    result = _federate(fed, out, "--secagg", *extra)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


def test_secagg_refuses_lego_and_a_resume_with_the_other_setting(tmp_path):
    from assy.federation.state import ServerState

    with pytest.raises(UsageError, match="--secagg cannot run lego's HeteAgg"):
        FederationConfig(
            pool="p", task="dolly", method="lego", rounds=1, out="o", split="fed10", secagg=True
        )
    fed = make_tiny_federation(tmp_path)
    cfg = FederationConfig(
        pool=str(fed[0]), task="arc_easy", method="fedit", rounds=1, out=str(tmp_path / "o"),
        data=str(fed[1]), clients=4, per_round=2, tiers="none",
    )  # fmt: skip
    ServerState.open(cfg).commit({"round": 1}, {"w": torch.ones(2)})
    again = FederationConfig.from_record(cfg.to_record() | {"secagg": True})
    with pytest.raises(UsageError, match="other settings .*secagg: False -> True"):
        ServerState.open(again)


# --------------------------------------------------------------------------- a dropout


def test_a_client_with_a_nan_adapter_drops_out_and_the_others_are_averaged(tmp_path):
    """In process (the assy tests' grid with the SecAgg+ mod): client 0's adapter holds a
    NaN; it refuses to send it (quantized, a NaN would pass unseen), SecAgg+ unmasks the
    sum of the two others (threshold 2 of 3), and the global stays finite."""
    from flwr.supercore.task_identity import TaskIdentity
    from test_federation_assy import InProcessGrid

    import assy.federation.client_app as client_app
    from assy.federation.server import run_server

    def train_content(content, context):
        reply = plain_train(content, context)
        if int(context.node_config["partition-id"]) == 0:
            state = reply["arrays"].to_torch_state_dict()
            state[sorted(state)[0]][0, 0] = float("nan")
            reply["arrays"] = client_app.arrays_record(state)
        return reply

    plain_train = client_app.train_content
    fed = make_tiny_federation(tmp_path)
    cfg = FederationConfig(
        pool=str(fed[0]), task="arc_easy", method="fedit", rounds=1, out=str(tmp_path / "o"),
        data=str(fed[1]), clients=3, per_round=3, tiers="none", local_steps=2, test_limit=8,
        secagg=True,
    )  # fmt: skip
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    client_app.train_content = train_content
    try:
        state = run_server(InProcessGrid(cfg.clients), cfg, lambda _line: None)
    finally:
        client_app.train_content = plain_train
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
    record = state.history[1]
    assert [f["client"] for f in record["failed"]] == [0], record["failed"]
    assert record["failed"][0]["reason"].startswith("non-finite: 1 NaN/inf value(s)")
    assert record["accepted"] == [1, 2] and record["aggregation"] == "secagg-fedavg"
    assert all(torch.isfinite(t).all() for t in state.global_state.values())
