"""The pool manifest (``pool.json``): reading, validating and writing it atomically.

Layout of a pool directory::

    pool.json                          # this manifest, written last
    blocks/<model>/embed.safetensors   # one file per block
    blocks/<model>/layer.007.safetensors
    blocks/<model>/head.safetensors
    tokenizers/<model>/tokenizer.json  # tokenizer files, copied

``pool.json`` holds ``format_version``, ``models`` (family, config, source, tokenizer files,
block ids in execution order) and ``blocks`` (file, kind, index, precision, sparsity,
bytes, sha256, interface, parent, tied aliases). Every path is relative to the pool and
must stay inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from blockpool.entries import FORMAT_VERSION, Manifest
from blockpool.errors import ManifestError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "atomic_write_bytes",
    "block_file",
    "block_id",
    "empty_manifest",
    "read_manifest",
    "resolve_inside",
    "sha256_file",
    "write_manifest",
]

MANIFEST = "pool.json"
_REQUIRED_BLOCK_KEYS = ("file", "model", "kind", "index", "family", "precision", "sha256", "bytes")


def block_file(model: str, kind: str, index: int) -> str:
    """The pool-relative file of a block: ``blocks/<model>/layer.007.safetensors``."""
    name = f"layer.{index:03d}" if kind == "layer" else kind
    return f"blocks/{model}/{name}.safetensors"


def block_id(model: str, kind: str, index: int) -> str:
    """The id ``<model>/<kind>/<index>`` of a block."""
    return f"{model}/{kind}/{index}"


def empty_manifest() -> Manifest:
    return Manifest(FORMAT_VERSION, {}, {})


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write ``pool.json`` atomically."""
    doc = manifest.to_json()
    atomic_write_bytes(root / MANIFEST, json.dumps(doc, indent=1, sort_keys=True).encode())


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing a path that leaves the pool directory.

    Raises:
        ManifestError: the path is absolute or escapes ``root`` (``..``, symlinks).
    """
    base = root.resolve()
    path = (base / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(base):
        raise ManifestError(
            f"{root / MANIFEST}: entry {relative!r} points outside the pool directory; "
            "the manifest was tampered with or hand-edited; rebuild the pool with assy build-pool"
        )
    return path


def read_manifest(root: Path) -> Manifest:
    """Read and validate ``root/pool.json`` into typed entries.

    Raises:
        ManifestError: missing, truncated or malformed manifest, unknown format version,
            or an entry pointing outside the pool.
    """
    path = root / MANIFEST
    if not root.is_dir():
        raise ManifestError(f"{root}: no such pool directory (create one with assy build-pool)")
    if not path.is_file():
        raise ManifestError(
            f"{root}: not a pool ({MANIFEST} is missing); build it with assy build-pool"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path}: truncated or not valid JSON ({e}); rerun assy build-pool on this directory "
            "to rewrite it"
        ) from None
    _validate(path, manifest)
    try:
        typed = Manifest.from_json(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(
            f"{path}: malformed entry ({type(e).__name__}: {e}); the manifest was tampered with "
            "or hand-edited; rebuild the pool with assy build-pool"
        ) from None
    for entry in typed.blocks.values():
        resolve_inside(root, entry.file)
    for model in typed.models.values():
        for rel in model.tokenizer:
            resolve_inside(root, rel)
    return typed


def _validate(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict) or not {"format_version", "models", "blocks"} <= set(
        manifest
    ):
        raise ManifestError(f"{path}: not a pool manifest (needs format_version, models, blocks)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest['format_version']!r}, this assy reads "
            f"{FORMAT_VERSION}; rebuild the pool with this version"
        )
    for bid, entry in manifest["blocks"].items():
        missing = [k for k in _REQUIRED_BLOCK_KEYS if k not in entry]
        if missing:
            raise ManifestError(f"{path}: block {bid} lacks {', '.join(missing)}")
    for name, model in manifest["models"].items():
        unknown = [b for b in model.get("blocks", []) if b not in manifest["blocks"]]
        if unknown or "family" not in model or "config" not in model:
            raise ManifestError(
                f"{path}: model {name} is incomplete (unknown blocks {unknown[:3]})"
            )
