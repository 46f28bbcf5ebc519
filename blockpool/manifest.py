"""The pool manifest (``pool.json``): reading, validating and writing it atomically.

Layout of a pool directory (format 2)::

    pool.json                                       # this manifest, written last
    pool.lock                                       # the writers' lock (blockpool.lock)
    blocks/<model>/embed-<sha256[:12]>.safetensors  # one file per block, content-addressed
    blocks/<model>/layer.007-<sha256[:12]>.safetensors
    blocks/<model>/head-<sha256[:12]>.safetensors
    tokenizers/<model>/<12 hex>/tokenizer.json      # tokenizer files, copied

(format 1 named files ``blocks/<model>/layer.007.safetensors`` and
``tokenizers/<model>/tokenizer.json``; such pools still open.) ``pool.json`` holds
``format_version``, ``models`` (family, config and its sum, source, tokenizer files and
their sums, block ids in execution order) and ``blocks`` (file, kind, index, precision,
sparsity, bytes, sha256, interface, parent, tied aliases, source sum). Every path is
relative to the pool and must stay inside it; every model name passes
:func:`blockpool.names.check_model_name`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blockpool.entries import FORMAT_VERSION, READABLE_VERSIONS, Manifest, config_digest
from blockpool.errors import ManifestError
from blockpool.names import MODEL_NAME_RE
from blockpool.storage import atomic_write_bytes, sha256_file

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "atomic_write_bytes",
    "block_id",
    "empty_manifest",
    "read_manifest",
    "referenced_files",
    "resolve_inside",
    "sha256_file",
    "write_manifest",
]

MANIFEST = "pool.json"
_REQUIRED_BLOCK_KEYS = ("file", "model", "kind", "index", "family", "precision", "sha256", "bytes")


def block_id(model: str, kind: str, index: int) -> str:
    """The id ``<model>/<kind>/<index>`` of a block."""
    return f"{model}/{kind}/{index}"


def empty_manifest() -> Manifest:
    return Manifest(FORMAT_VERSION, {}, {})


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write ``pool.json`` atomically, at the current format version.

    A manifest read from a version-1 pool gains what version 2 adds and can be computed
    from the manifest alone: the sum of every model's config. (Call under the pool's lock.)
    """
    for name, model in manifest.models.items():
        if model.config_sha256 is None:
            manifest.models[name] = model.but(config_sha256=config_digest(model.config))
    manifest.format_version = FORMAT_VERSION
    doc = manifest.to_json()
    atomic_write_bytes(root / MANIFEST, json.dumps(doc, indent=1, sort_keys=True).encode())


def referenced_files(root: Path, manifest: Manifest) -> list[Path]:
    """Every file the manifest names: block files and tokenizer files."""
    files = [root / b.file for b in manifest.blocks.values()]
    return files + [root / rel for m in manifest.models.values() for rel in m.tokenizer]


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
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror}); check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path}: truncated or not valid JSON ({e}); pool.json is only ever replaced whole, "
            "so it was damaged from outside: restore it from a copy, or rebuild the pool into a "
            "new directory with assy build-pool"
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
    if not isinstance(manifest["models"], dict) or not isinstance(manifest["blocks"], dict):
        raise ManifestError(f"{path}: not a pool manifest (models and blocks must be objects)")
    if manifest["format_version"] not in READABLE_VERSIONS:
        newer = isinstance(manifest["format_version"], int) and manifest["format_version"] > 0
        raise ManifestError(
            f"{path}: format_version {manifest['format_version']!r}, this assy reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; "
            + ("upgrade assy to open it" if newer else "rebuild the pool with assy build-pool")
        )
    for name in manifest["models"]:
        if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
            raise ManifestError(
                f"{path}: model name {name!r} is not a plain name; the manifest was tampered "
                "with or hand-edited; rebuild the pool with assy build-pool"
            )
    for bid, entry in manifest["blocks"].items():
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: block {bid} is not an object")
        missing = [k for k in _REQUIRED_BLOCK_KEYS if k not in entry]
        if missing:
            raise ManifestError(f"{path}: block {bid} lacks {', '.join(missing)}")
    for name, model in manifest["models"].items():
        if not isinstance(model, dict) or not isinstance(model.get("blocks", []), list):
            raise ManifestError(f"{path}: model {name} is not an object with a list of blocks")
        unknown = [b for b in model.get("blocks", []) if b not in manifest["blocks"]]
        if unknown or "family" not in model or "config" not in model:
            raise ManifestError(
                f"{path}: model {name} is incomplete (unknown blocks {unknown[:3]})"
            )
