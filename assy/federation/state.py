"""The server's state on disk: saved atomically after every round, resumed after a kill.

Layout under ``OUT``::

    state/server.json               config, rounds finished, history, measurements
    state/global-r00003.safetensors the global adapter after round 3 (fedit)
    rounds.jsonl                    one line per finished round (rewritten from history)
    accuracy.png participation.png bytes.png

A round is committed by writing its global adapter under a new name, then
``server.json`` (temporary file + rename), then removing the previous adapter file:
a kill at any point leaves the last committed round intact, and a restart with the same
``--out`` resumes after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from assy.errors import UsageError
from assy.federation.config import FederationConfig
from blockpool import atomic_write_bytes

__all__ = ["FORMAT_VERSION", "ServerState", "write_rounds_jsonl"]

FORMAT_VERSION = 1


@dataclass
class ServerState:
    """What the server must not lose: the rounds done and the global adapter.

    Attributes:
        out: the run's output directory.
        config: the run's settings (as a record).
        round: the last finished round (0: none).
        history: one dict per finished round (what ``rounds.jsonl`` holds).
        facts: values fixed at the start (measured memory, tiers), reused on resume.
        global_state: the global adapter after ``round`` (empty for ``local``).
    """

    out: Path
    config: dict[str, Any]
    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    global_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def _dir(self) -> Path:
        return self.out / "state"

    @classmethod
    def open(cls, cfg: FederationConfig) -> ServerState:
        """The saved state of ``cfg.out``, or a fresh one.

        Raises:
            UsageError: ``out`` holds a run with other result-deciding settings, or a
                state file that cannot be read.
        """
        out = Path(cfg.out)
        path = out / "state" / "server.json"
        if not path.exists():
            return cls(out, cfg.to_record())
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: unreadable server state ({e}); use another --out") from None
        if saved.get("format_version") != FORMAT_VERSION:
            raise UsageError(f"{path}: state format {saved.get('format_version')!r} unknown")
        before = FederationConfig.from_record(saved["config"])
        changed = before.differences(cfg)
        if changed:
            raise UsageError(
                f"{out} holds a run with other settings ({'; '.join(changed)}); "
                "rerun with the same settings to resume, or use another --out"
            )
        state = cls(out, cfg.to_record(), saved["round"], saved["history"], saved["facts"])
        if saved.get("global"):
            state.global_state = load_file(state._dir / saved["global"])
        return state

    def commit(self, record: dict[str, Any], global_state: dict[str, torch.Tensor]) -> None:
        """Finish round ``record["round"]``: save the adapter, then the JSON, atomically."""
        previous = self._global_name(self.round) if self.global_state else None
        self.round = int(record["round"])
        self.history.append(record)
        self.global_state = global_state
        self.save()
        if previous and previous != self._global_name(self.round):
            (self._dir / previous).unlink(missing_ok=True)
        write_rounds_jsonl(self.out / "rounds.jsonl", self.history)

    def save(self) -> None:
        """Write the adapter (if any) under its round's name, then ``server.json``."""
        name = None
        if self.global_state:
            name = self._global_name(self.round)
            tensors = {k: v.contiguous() for k, v in self.global_state.items()}
            atomic_write_bytes(self._dir / name, save(tensors))
        body = {
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "round": self.round,
            "global": name,
            "facts": self.facts,
            "history": self.history,
        }
        atomic_write_bytes(self._dir / "server.json", json.dumps(body, indent=1).encode())

    @staticmethod
    def _global_name(round_: int) -> str:
        return f"global-r{round_:05d}.safetensors"


def write_rounds_jsonl(path: Path, history: list[dict[str, Any]]) -> None:
    """``rounds.jsonl``: one JSON object per finished round, written atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in history).encode())
