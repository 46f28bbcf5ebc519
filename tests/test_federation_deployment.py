"""Federation on a Flower deployment: one SuperLink and three SuperNodes on 127.0.0.1, with
TLS (a CA and a server certificate made here) and SuperNode authentication (each node's
P-384 key registered with ``flwr supernode register`` before it starts), started once for
the module; on it two rounds of ``assy federate --engine deployment``, then one round with
``--secagg`` (Flower's SecAgg+: four messages per client and round, each a fresh ClientApp
process, the client's protocol state kept between them in the SuperNode's ``Context.state``).
Every ClientApp keeps what it sends (:data:`CAPTURING_CLIENTAPP`); every process started is
stopped by its PID.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_federation import make_tiny_federation

pytestmark = pytest.mark.slow

NODES = 3
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _certificate(subject: str, key, issuer: str, signer, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_credentials(directory: Path, nodes: int) -> None:
    """``ca.pem``, ``server.pem``/``server.key`` for 127.0.0.1, ``nodeI.key``/``nodeI.pub``."""
    directory.mkdir(parents=True)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("assy test CA", ca_key, "assy test CA", ca_key, ca=True)
    (directory / "ca.pem").write_bytes(_pem(ca))
    server = _certificate("127.0.0.1", key, "assy test CA", ca_key, ca=False)
    (directory / "server.pem").write_bytes(_pem(server))
    (directory / "server.key").write_bytes(_pem(key))
    for i in range(nodes):
        node = ec.generate_private_key(ec.SECP384R1())
        private = node.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = node.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        (directory / f"node{i}.key").write_bytes(private)
        (directory / f"node{i}.pub").write_bytes(public)


def _children(pid: int) -> list[int]:
    """PIDs of the processes ``pid`` started (and theirs), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found += [child, *_children(child)]
    return found


def _stop(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL, every process this test started and what they started."""
    every = [p for pid in pids for p in (pid, *_children(pid))]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in every:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(1.0 if sig == signal.SIGTERM else 0)


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while text not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, f"{proc.args[0]} exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {log}: {log.read_text()[-2000:]}"
        time.sleep(0.2)


CAPTURING_CLIENTAPP = '''#!{python}
"""Flower's flwr-clientapp, with assy's ClientApp patched when Flower imports it (after the
task started: the process starts as fast as Flower's own). It keeps, as pickles under
{directory}/<the run's --out name>/, every training reply the client sends and every
adapter it trains (before SecAgg+ masks it)."""
import importlib.abc, importlib.util, pickle, sys, uuid
from pathlib import Path


def keep(context, kind, round_, records):
    folder = Path({directory!r}) / Path(str(context.run_config["out"])).name
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{{kind}}-r{{round_}}-p{{context.node_config['partition-id']}}-{{uuid.uuid4().hex}}"
    (folder / f"{{name}}.pickle").write_bytes(pickle.dumps(records))


def plain(record):
    if hasattr(record, "to_numpy_ndarrays"):
        return ("arrays", {{k: a.numpy() for k, a in record.items()}})
    return ("values", dict(record.items()))


def capture(msg, context, call_next):  # the outermost mod: what leaves the client
    reply = call_next(msg, context)
    if msg.metadata.message_type == "train" and reply.has_content():
        records = {{k: plain(r) for k, r in reply.content.items()}}
        keep(context, "reply", msg.metadata.group_id, records)
    return reply


class Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "assy.federation.client_app":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            work = module.train_content

            def train_content(content, context):
                reply = work(content, context)
                if "arrays" in reply:
                    round_ = module.run_settings(content)[1]
                    keep(context, "trained", round_, plain(reply["arrays"])[1])
                return reply

            module.train_content = train_content
            module.app = module.make_client_app([capture])

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Patch())
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

sys.exit(flwr_clientapp())
'''


@dataclass
class Deployment:
    """The running deployment: its directory, the tiny pool and data, the SuperLink."""

    root: Path
    pool: Path
    data: Path
    address: str
    ca: Path
    env: dict[str, str]

    def federate(
        self, name: str, *extra: str, rounds: int = 2
    ) -> tuple[subprocess.CompletedProcess, list[dict]]:
        """``assy federate`` fedit into ``root/name``: the process and rounds.jsonl."""
        out = self.root / name
        args = [sys.executable, "-m", "assy.cli", "federate", str(self.pool), "--task", "arc_easy"]
        args += ["--method", "fedit", "--rounds", str(rounds), "--out", str(out)]
        args += ["--data", str(self.data)]
        args += ["--clients", str(NODES), "--tiers", "none", "--local-steps", "3"]
        args += ["--test-limit", "16", "--engine", "deployment", "--superlink", self.address]
        args += ["--root-certificates", str(self.ca), *extra]
        run = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"round {rounds}/{rounds}: accuracy" in run.stdout, run.stdout
        assert "Traceback" not in run.stdout + run.stderr
        rounds = (out / "rounds.jsonl").read_text().splitlines()
        return run, [json.loads(x) for x in rounds]

    def captured(self, name: str, kind: str, round_: int, client: int) -> list:
        """What :data:`CAPTURING_CLIENTAPP` kept of run ``name``: ``kind`` ``reply`` (each a
        ``{record: ("arrays" | "values", {key: value})}``) or ``trained`` (``{key: array}``)."""
        paths = sorted((self.root / "captured" / name).glob(f"{kind}-r{round_}-p{client}-*"))
        return [pickle.loads(p.read_bytes()) for p in paths]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A SuperLink (TLS, SuperNode authentication) and three registered SuperNodes on
    127.0.0.1, on free ports, for the module; their ClientApps run
    :data:`CAPTURING_CLIENTAPP`. Every process is stopped by its PID, pass or fail."""
    tmp_path = tmp_path_factory.mktemp("deployment")
    pool, data = make_tiny_federation(tmp_path)
    creds = tmp_path / "creds"
    make_credentials(creds, NODES)
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec on PATH
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",  # no process of the test reaches the network
    )
    capturing = tmp_path / "capturing-bin"  # first on the SuperNodes' PATH
    capturing.mkdir()
    script = capturing / "flwr-clientapp"
    captured = tmp_path / "captured"
    script.write_text(CAPTURING_CLIENTAPP.format(python=sys.executable, directory=str(captured)))
    script.chmod(0o755)
    link_port, node_ports = _free_port(), [_free_port() for _ in range(NODES)]
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str], path: str = env["PATH"]) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        home = dict(env, FLWR_HOME=str(tmp_path / f"home-{name}"), PATH=path)
        with log.open("w") as f:
            procs.append(subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=home))
        return procs[-1], log

    try:
        link, link_log = start("superlink", [
            str(BIN / "flower-superlink"), "--port", str(link_port),
            "--ssl-ca-certfile", str(creds / "ca.pem"),
            "--ssl-certfile", str(creds / "server.pem"), "--ssl-keyfile", str(creds / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        ])  # fmt: skip
        _wait_for_line(link_log, f"https://127.0.0.1:{link_port}", link)
        cli_home = tmp_path / "home-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "assy"\n\n[superlink.assy]\n'
            f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{creds / "ca.pem"}"\n'
        )
        for i in range(NODES):  # registered before they start, or they exit
            done = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(creds / f"node{i}.pub"), "assy"],
                env=dict(env, FLWR_HOME=str(cli_home)), capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            assert "registered successfully" in done.stdout, done.stdout + done.stderr
        for i in range(NODES):
            start(f"supernode{i}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}",
                "--root-certificates", str(creds / "ca.pem"),
                "--auth-supernode-private-key", str(creds / f"node{i}.key"),
                "--node-config", f"partition-id={i} num-partitions={NODES}",
                "--port", str(node_ports[i]),
            ], path=f"{capturing}{os.pathsep}{env['PATH']}")  # fmt: skip
        yield Deployment(tmp_path, pool, data, f"127.0.0.1:{link_port}", creds / "ca.pem", env)
    finally:
        _stop([p.pid for p in procs])
        for p in procs:
            p.wait(timeout=30)


def test_two_rounds_on_a_superlink_with_tls_and_three_authenticated_supernodes(deployment):
    _, history = deployment.federate("out", "--per-round", str(NODES))
    assert [r["round"] for r in history] == [0, 1, 2]
    for r in history[1:]:
        assert r["accepted"] == [0, 1, 2] and r["participants"] == {"all": 3}
        assert r["bytes_up"] > 0 and r["failed"] == [] and r["missing"] == []
    assert (deployment.root / "out" / "final" / "adapter").is_dir()
    for i in range(NODES):
        text = (deployment.root / f"supernode{i}.log").read_text()
        assert "SuperNode ID" in text  # authenticated and activated
    for client in range(NODES):  # the capture works: a plain reply carries the adapter
        [reply] = deployment.captured("out", "reply", 1, client)
        [trained] = deployment.captured("out", "trained", 1, client)
        kind, sent = reply["arrays"]
        assert kind == "arrays" and sent.keys() == trained.keys()
        assert all((sent[k] == trained[k]).all() for k in trained)


def test_a_secagg_round_on_the_same_deployment_sends_no_adapter_in_the_clear(deployment):
    """SecAgg+ needs each client's state (keys, shares, stage) from one message to the
    next; on a deployment every message starts a fresh ClientApp process, and Flower keeps
    ``Context.state`` in the SuperNode between them: every stage completes. One round (each
    costs ~100 s here: four fresh processes per client and Flower's 3 s polling)."""
    run, history = deployment.federate("secagg", "--per-round", "2", "--secagg", rounds=1)
    assert [r["round"] for r in history] == [0, 1]
    assert "Secure aggregation" not in run.stdout  # Flower's INFO lines per round: filtered
    stages = ["setup", "share keys", "collect masked vectors", "unmask"]
    for r in history[1:]:
        assert r["aggregation"] == "secagg-fedavg" and len(r["accepted"]) == 2
        assert r["failed"] == r["missing"] == r["rejected"] == []
        assert [s["stage"] for s in r["secagg"]["stages"]] == stages
        groups = r["secagg"]["groups"]
        assert groups and all(g["aggregate"] == "ok" for g in groups.values()), groups
        assert [g["summed"] for g in groups.values()] == [r["accepted"]]
        for client in r["accepted"]:
            [trained] = deployment.captured("secagg", "trained", r["round"], client)
            replies = deployment.captured("secagg", "reply", r["round"], client)
            assert len(replies) == len(stages)  # one reply per stage
            blobs, masked = [], []
            for reply in replies:
                for name, (kind, values) in reply.items():
                    if kind == "arrays":  # Flower's mod empties the FitRes parameters
                        assert not any(a.size for a in values.values()), (client, name)
                    for key, value in values.items() if kind == "values" else ():
                        items = value if isinstance(value, list) else [value]
                        blobs += [b for b in items if isinstance(b, bytes)]
                        masked += [items] if key == "masked_params" else []
            assert len(masked) == 1 and len(masked[0]) == 1 + len(trained)  # weight, tensors
            for tensor in trained.values():  # no row of its float32 adapter, in any reply
                row = tensor.reshape(tensor.shape[0], -1)[0].tobytes()
                assert not any(row in blob for blob in blobs), f"client {client}'s adapter sent"
    assert (deployment.root / "secagg" / "final" / "adapter").is_dir()
