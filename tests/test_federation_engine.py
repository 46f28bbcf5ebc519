"""Federation on Flower's simulation engine (Ray), with tiny models.

One run with injected faults (Flower mods around the real ClientApp): 20% of the clients
raise, one is slower than the round's timeout, one sends NaNs, one a wrong-shaped update,
one a 100x norm update; a capture mod keeps every message a client sends. Then the CLI:
a run killed with SIGKILL and restarted ends, bit for bit, where the same rounds computed
in one go end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_federation import assert_private, make_tiny_federation

from assy.federation.config import FederationConfig

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    """As in the clients (one thread each): the replay must compute bit for bit alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CLIENTS = 10
FAULTS = {0: "raise", 1: "raise", 2: "slow", 3: "nan", 4: "shape", 5: "norm"}
ROUNDS = 4
ROUND_TIMEOUT = 10.0


def _sleep_until_round_2_is_done(rounds: Path) -> None:
    """Outlast round 1's timeout and all of round 2, whatever the machine's speed."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"round": 2' not in rounds.read_text():
        time.sleep(0.2)


def fault_mod(msg, context, call_next):
    """Misbehave as FAULTS says, on training messages only (discovery works for all)."""
    pid = int(context.node_config["partition-id"])
    fault = FAULTS.get(pid) if msg.metadata.message_type == "train" else None
    if fault == "raise":
        raise RuntimeError(f"injected failure of client {pid}")
    if fault == "slow" and msg.content["config"]["round"] == 1:
        _sleep_until_round_2_is_done(Path(msg.content["config"]["out"]) / "rounds.jsonl")
    reply = call_next(msg, context)
    if fault in ("nan", "shape", "norm"):
        state = reply.content["arrays"].to_torch_state_dict()
        first = sorted(state)[0]
        if fault == "nan":
            state[first][0, 0] = float("nan")
        elif fault == "shape":
            state[first] = state[first][:-1]
        else:
            state = {k: v * 100.0 for k, v in state.items()}
        from assy.federation.records import arrays_record

        reply.content["arrays"] = arrays_record(state)
    return reply


def capture_mod(msg, context, call_next, *, directory: str):
    """Keep everything a client sends: arrays as safetensors, the other records as JSON."""
    reply = call_next(msg, context)
    pid = int(context.node_config["partition-id"])
    config = msg.content.get("config")
    round_ = int(config["round"]) if config is not None and "round" in config else 0
    stem = Path(directory) / f"{msg.metadata.message_type}-r{round_}-p{pid}"
    records = {}
    for name, record in reply.content.items():
        if hasattr(record, "to_torch_state_dict"):
            save_file(record.to_torch_state_dict(), f"{stem}-{name}.safetensors")
            records[name] = "arrays"
        else:
            records[name] = {k: v for k, v in record.items()}
    Path(f"{stem}.json").write_text(json.dumps(records))
    return reply


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    """A fedit run of 4 rounds, every client sampled each round, with the faults above."""
    from assy.federation.engine import run_federation

    root = tmp_path_factory.mktemp("faults")
    pool, data = make_tiny_federation(root)
    captured = root / "captured"
    captured.mkdir()
    cfg = FederationConfig(
        pool=str(pool), task="arc_easy", method="fedit", rounds=ROUNDS, out=str(root / "out"),
        data=str(data), clients=CLIENTS, per_round=CLIENTS, tiers="none", local_steps=3,
        round_timeout=ROUND_TIMEOUT, test_limit=16,
    )  # fmt: skip
    lines: list[str] = []
    mods = [functools.partial(capture_mod, directory=str(captured)), fault_mod]
    start = time.perf_counter()
    run_federation(cfg, lines.append, client_mods=mods, cpus=2)
    history = [json.loads(x) for x in (root / "out" / "rounds.jsonl").read_text().splitlines()]
    return cfg, history, lines, captured, time.perf_counter() - start


def test_every_round_finishes_with_the_others(fault_run):
    _, history, lines, _, _ = fault_run
    assert [r["round"] for r in history] == list(range(ROUNDS + 1))
    bad = {p for p, fault in FAULTS.items() if fault != "slow"}
    for r in history[1:]:
        assert r["accuracy"] is not None and r["aggregation"] == "fedavg"
        good = [p for p in r["sampled"] if p not in bad and p not in r["missing"]]
        assert r["accepted"] == good and len(good) >= 4
    assert any(line.startswith(f"round {ROUNDS}/{ROUNDS}: accuracy") for line in lines), lines
    # Round 1 ended at its timeout, not when the slow client (held until round 2 is done,
    # at most 120 s) came back; the whole run's wall time depends on the machine's load.
    assert 2 in history[1]["missing"] and history[1]["wall_seconds"] < 100


def test_raising_clients_come_back_as_failures(fault_run):
    _, history, _, _, _ = fault_run
    for r in history[1:]:
        failed = {f["client"]: f["reason"] for f in r["failed"]}
        assert sorted(failed) == [0, 1]
        assert "injected failure of client 0" in failed[0]


def test_a_slow_client_is_missing_then_not_sampled_until_its_late_reply(fault_run):
    _, history, lines, _, _ = fault_run
    assert history[1]["missing"] == [2]
    late = next(i for i, line in enumerate(lines) if "client 2: late reply arrived" in line)
    freed = sum(line.startswith("round ") for line in lines[:late]) + 1  # the round it frees
    assert 3 <= freed <= ROUNDS  # round 2 starts while its worker still sleeps
    for r in history[2:freed]:
        assert 2 not in r["sampled"]  # pending: its worker is busy with round 1's work
    assert 2 in history[freed]["sampled"] and history[freed]["missing"] == []


@pytest.mark.parametrize(
    ("client", "reason"), [(3, "non-finite"), (4, "mis-shaped"), (5, "norm outlier")]
)
def test_bad_updates_are_rejected_and_logged_with_why(fault_run, client, reason):
    _, history, lines, _, _ = fault_run
    for r in history[1:]:
        rejected = {x["client"]: x["reason"] for x in r["rejected"]}
        assert rejected[client].startswith(reason)
    assert any(f"rejected client {client}: {reason}" in line for line in lines)


def test_the_global_is_the_fedavg_of_the_accepted_updates_only(fault_run):
    from assy.federation.strategy import state_digest
    from assy.lego import fedavg

    cfg, history, _, captured, _ = fault_run
    for r in history[1:]:
        states, weights = [], []
        for p in sorted(r["accepted"]):
            states.append(load_file(captured / f"train-r{r['round']}-p{p}-arrays.safetensors"))
            metrics = json.loads((captured / f"train-r{r['round']}-p{p}.json").read_text())
            weights.append(metrics["metrics"]["num-examples"])
        assert state_digest(fedavg(states, weights)) == r["global_sha256"]
    final = load_file(Path(cfg.out) / "state" / f"global-r{ROUNDS:05d}.safetensors")
    total = sum(weights)
    for name, tensor in final.items():  # in float64, by hand: no NaN, no 100x update got in
        expected = sum(s[name].double() * w / total for s, w in zip(states, weights, strict=True))
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6)


def test_no_message_a_client_sent_holds_raw_text_or_token_ids(fault_run):
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

    from assy.federation import task
    from blockpool import Pool

    cfg, _, _, captured, _ = fault_run
    data = task.federated_data(cfg)
    tokenizer = Pool(cfg.pool).tokenizer("llama")
    sent = sorted(captured.glob("*.json"))
    assert len(sent) >= CLIENTS + 7 * ROUNDS  # discovery plus every answered training round
    for path in sent:
        pid = int(path.stem.rsplit("-p", 1)[1])
        content = RecordDict()
        for name, record in json.loads(path.read_text()).items():
            if record == "arrays":
                arrays = load_file(path.with_name(f"{path.stem}-{name}.safetensors"))
                content[name] = ArrayRecord(arrays)
            elif name == "metrics":
                content[name] = MetricRecord(record)
            else:
                content[name] = ConfigRecord(record)
        meta = Metadata(1, "m", 0, 0, "", "", 0.0, 1.0, "train")
        assert_private([Message(content=content, metadata=meta)], data.clients[pid], tokenizer)


# --------------------------------------------------------------------------- kill, resume


def _federate_process(pool: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``assy federate`` in its own session (so Ray's helpers can be stopped with it)."""
    args = [sys.executable, "-m", "assy.cli", "federate", str(pool), "--task", "arc_easy"]
    args += ["--method", "fedit", "--rounds", "3", "--out", str(out), "--data", str(data)]
    args += ["--clients", "4", "--per-round", "2", "--tiers", "none", "--cpus", "1"]
    args += ["--local-steps", "3", "--test-limit", "16", *extra]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    """Kill the process group this test started (Ray leaves agents behind a SIGKILL)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 0, output
    return output


def _replay(cfg: FederationConfig, history: list[dict]) -> dict:
    """The same rounds computed in one go, without Flower and without a kill: the sampled
    clients train with the run's own client code, the global is their FedAvg."""
    from assy.federation import task
    from assy.federation.strategy import (
        Update,
        aggregate_adapters,
        sample_clients,
        state_digest,
    )
    from blockpool import Pool

    pool = Pool(cfg.pool)
    sizes = [len(c) for c in task.federated_data(cfg).clients]
    global_state = task.initial_adapter(pool, "llama", cfg)
    assert state_digest(global_state) == history[0]["global_sha256"]
    for r in range(1, cfg.rounds + 1):
        picked = sample_clients(range(cfg.clients), cfg.per_round, cfg.seed, r)
        assert picked == history[r]["sampled"]
        updates = [
            Update(p, task.fedit_round(cfg, p, global_state, r)[0], sizes[p], 0, "llama")
            for p in picked
        ]
        global_state, _ = aggregate_adapters(global_state, updates)
        assert state_digest(global_state) == history[r]["global_sha256"], f"round {r}"
    return global_state


def test_a_killed_server_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    pool, data = make_tiny_federation(tmp_path)
    out = tmp_path / "run"
    killed = _federate_process(pool, data, out)
    rounds = out / "rounds.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (rounds.exists() and '"round": 1' in rounds.read_text()):
            assert killed.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        os.kill(killed.pid, signal.SIGKILL)  # the server, mid-run
    finally:
        _stop(killed)
    assert [json.loads(x)["round"] for x in rounds.read_text().splitlines()] == [0, 1]

    output = _finish(_federate_process(pool, data, out, "--json"))  # progress on stderr
    assert "resuming after round 1" in output and "round 3/3: accuracy" in output
    assert not [ln for ln in output.splitlines() if "warn" in ln.lower() or "Trace" in ln]
    history = [json.loads(x) for x in rounds.read_text().splitlines()]
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert json.loads(output.splitlines()[-1])["rounds"] == history  # --json: the last line
    for png in ("accuracy.png", "participation.png", "bytes.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    recipe = json.loads((out / "final" / "recipe.json").read_text())
    assert recipe["anchor"] == "llama" and (out / "final" / "adapter").is_dir()

    cfg = FederationConfig.from_record(
        json.loads((out / "state" / "server.json").read_text())["config"]
    )
    final = load_file(out / "state" / "global-r00003.safetensors")
    replayed = _replay(cfg, history)
    assert all(torch.equal(final[k], replayed[k]) for k in replayed)
