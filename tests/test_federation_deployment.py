"""Federation on a Flower deployment: one SuperLink and three SuperNodes on 127.0.0.1, with
TLS (a CA and a server certificate made here) and SuperNode authentication (each node's
P-384 key registered with ``flwr supernode register`` before it starts), two rounds of
``assy federate --engine deployment``; every process started is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
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


def test_two_rounds_on_a_superlink_with_tls_and_three_authenticated_supernodes(tmp_path):
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
    link_port, node_ports = _free_port(), [_free_port() for _ in range(NODES)]
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        home = dict(env, FLWR_HOME=str(tmp_path / f"home-{name}"))
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
            ])  # fmt: skip

        out = tmp_path / "out"
        args = [sys.executable, "-m", "assy.cli", "federate", str(pool), "--task", "arc_easy"]
        args += ["--method", "fedit", "--rounds", "2", "--out", str(out), "--data", str(data)]
        args += ["--clients", str(NODES), "--per-round", str(NODES), "--tiers", "none"]
        args += ["--local-steps", "3", "--test-limit", "16", "--engine", "deployment"]
        args += ["--superlink", f"127.0.0.1:{link_port}"]
        args += ["--root-certificates", str(creds / "ca.pem")]
        run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "round 2/2: accuracy" in run.stdout, run.stdout
        assert "Traceback" not in run.stdout + run.stderr

        history = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in history] == [0, 1, 2]
        for r in history[1:]:
            assert r["accepted"] == [0, 1, 2] and r["participants"] == {"all": 3}
            assert r["bytes_up"] > 0 and r["failed"] == [] and r["missing"] == []
        assert (out / "final" / "adapter").is_dir()
        for i in range(NODES):
            text = (tmp_path / f"supernode{i}.log").read_text()
            assert "SuperNode ID" in text  # authenticated and activated
    finally:
        _stop([p.pid for p in procs])
        for p in procs:
            p.wait(timeout=30)
