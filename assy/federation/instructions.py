"""Instruction data for federated fine-tuning: databricks-dolly-15k in FedIT's client split.

The directory (``--data``, default ``../shared/data/dolly-fed10`` beside the repository)
holds FedIT's split (Zhang et al., "Towards Building the Federated GPT", 2023):
``local_training_<i>.json`` (client ``i``'s rows, skewed by category) and
``global_test.json`` (the held-out rows), each a JSON list of
``{"instruction", "context", "response", "category"}``. Three ways to deal the rows
(``--split``):

* ``fed10``: client ``i`` keeps ``local_training_<i>.json`` (non-IID; at most 10 clients);
* ``iid``: every client row pooled, shuffled by seed and dealt round-robin to N clients;
* ``categories``: one client per dolly category (LEGO's 8 task-dependent clients).

An example is rendered in the Alpaca/FedIT prompt; only the response tokens (and the end
of sequence) carry the loss, and prompt plus response are capped at ``max_length`` tokens
(the response keeps at least half of them, the prompt is cut from the left).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assy.errors import UsageError

__all__ = [
    "DEFAULT_DIR",
    "SPLITS",
    "Instruction",
    "encode_instructions",
    "instruction_splits",
    "load_rows",
    "prompt",
]

DEFAULT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dolly-fed10"
SPLITS = ("fed10", "iid", "categories")
_FIELDS = ("instruction", "context", "response")

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Instruction:
    """One dolly row."""

    instruction: str
    context: str
    response: str
    category: str = ""


def prompt(ex: Instruction) -> str:
    """The Alpaca prompt FedIT uses (with the ``### Input`` part only when there is context)."""
    template = _WITH_INPUT if ex.context.strip() else _NO_INPUT
    return template.format(instruction=ex.instruction.strip(), context=ex.context.strip())


def _read(path: Path) -> list[Instruction]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read instruction rows ({e})") from None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and all(isinstance(r.get(k), str) for k in _FIELDS) for r in rows
    ):
        raise UsageError(
            f"{path}: expected a JSON list of {{instruction, context, response, category}}"
        )
    return [Instruction(*(r[k] for k in _FIELDS), str(r.get("category", ""))) for r in rows]


def data_dir(data: str) -> Path:
    """``--data`` or the default directory, checked to hold the FedIT files."""
    directory = Path(data) if data else DEFAULT_DIR
    if not (directory / "global_test.json").is_file() or not sorted(
        directory.glob("local_training_*.json")
    ):
        raise UsageError(
            f"no instruction data in {directory}: --task dolly needs --data DIR holding "
            "local_training_<i>.json and global_test.json (FedIT's databricks-dolly-15k split)"
        )
    return directory


def load_rows(data: str) -> tuple[list[list[Instruction]], list[Instruction]]:
    """``(rows of each local_training_<i>.json in i order, global_test rows)``."""
    directory = data_dir(data)
    files = sorted(
        directory.glob("local_training_*.json"),
        key=lambda p: int(p.stem.rsplit("_", 1)[1]) if p.stem.rsplit("_", 1)[1].isdigit() else -1,
    )
    return [_read(p) for p in files], _read(directory / "global_test.json")


def instruction_splits(
    data: str, split: str, clients: int, seed: int, limit: int = 0, test_limit: int = 0
) -> tuple[list[list[Instruction]], list[Instruction]]:
    """The clients' rows and the held-out test, as ``--split`` deals them.

    Args:
        data: the data directory (``""``: the default).
        split: ``fed10``, ``iid`` or ``categories`` (see the module).
        clients: the number of clients (``fed10``: at most the files; ``categories``:
            exactly the categories).
        seed: the ``iid`` shuffle and each client's ``limit`` draw.
        limit: keep a seeded random ``limit`` rows per client (0: all).
        test_limit: keep the first ``test_limit`` test rows after a seeded shuffle (0: all).

    Raises:
        UsageError: missing data, or a client count the split cannot give.
    """
    if split not in SPLITS:
        raise UsageError(f"--split for instruction data must be one of {', '.join(SPLITS)}")
    files, test = load_rows(data)
    if split == "fed10":
        if clients > len(files):
            raise UsageError(
                f"--split fed10 has {len(files)} client files; use --clients {len(files)} or fewer"
            )
        parts = files[:clients]
    elif split == "iid":
        rows = [r for f in files for r in f]
        if clients > len(rows):
            raise UsageError(f"{len(rows)} rows cannot give {clients} clients one each")
        order = np.random.default_rng([seed, 0x11D]).permutation(len(rows))
        parts = [[rows[i] for i in order[c::clients]] for c in range(clients)]
    else:
        rows = [r for f in files for r in f]
        cats = sorted({r.category for r in rows})
        if clients != len(cats):
            raise UsageError(
                f"--split categories gives one client per category: use --clients {len(cats)}"
            )
        parts = [[r for r in rows if r.category == c] for c in cats]
    if limit:
        parts = [_take(p, limit, [seed, 0x1A, i]) for i, p in enumerate(parts)]
    if test_limit:
        test = _take(test, test_limit, [seed, 0x7E])
    return parts, test


def _take(rows: list[Instruction], n: int, seed: list[int]) -> list[Instruction]:
    if n >= len(rows):
        return rows
    keep = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i] for i in sorted(keep.tolist())]


def encode_instructions(
    tokenizer, examples: Sequence[Instruction], max_length: int
) -> list[tuple[list[int], int]]:
    """Per example: token ids of prompt + response (+ EOS), and how many trailing ids are
    the response (those alone carry the loss); at most ``max_length`` ids."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    encoded = []
    for ex in examples:
        head = tokenizer(prompt(ex), add_special_tokens=False)["input_ids"]
        tail = tokenizer(ex.response.strip(), add_special_tokens=False)["input_ids"] + eos
        keep_tail = min(len(tail), max(max_length - len(bos) - len(head), max_length // 2))
        tail = tail[:keep_tail]
        head = (bos + head)[-(max_length - len(tail)) :] if max_length > len(tail) else []
        if not head:  # at least one token to predict the response from
            head, tail = tail[:1], tail[1:]
        encoded.append((head + tail, len(tail)))
    return [(ids, n) for ids, n in encoded if n > 0]


def response_bytes(tokenizer, encoded: Sequence[tuple[list[int], int]]) -> int:
    """UTF-8 bytes of the response tokens kept (for bits per byte)."""
    return sum(
        len(tokenizer.decode(ids[-n:], skip_special_tokens=True).encode("utf-8"))
        for ids, n in encoded
    )


def bits_per_byte(nats_per_token: float, tokens: int, nbytes: int) -> float:
    """Mean NLL in nats per token, over ``tokens`` tokens spanning ``nbytes`` bytes, as bits
    per byte (tokenizer-independent)."""
    return nats_per_token * tokens / (math.log(2) * max(nbytes, 1))
