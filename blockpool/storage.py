"""How a pool's files reach the disk: atomic, content-addressed, with ordinary permissions.

Every file a pool writes goes through here:

* it is first written to a temporary file beside its target, named
  ``.<name>.<8 hex>.assy-tmp``: only files so named, and only in the directories a pool
  writes (:func:`remove_stray`), are ever deleted as leftovers of a killed writer;
* the temporary file is created with mode ``0o666`` minus the umask, as any file
  (``tempfile.mkstemp`` would make it ``0o600`` and the pool could not be shared);
* it is written, fsynced, renamed over its target (``os.replace``), and the directory is
  fsynced, so a reader sees the old file or the new one, never a part;
* block files are content-addressed (``blocks/<model>/layer.007-<sha256[:12]>.safetensors``)
  and tokenizer files sit in a content-addressed directory
  (``tokenizers/<model>/<12 hex>/tokenizer.json``): a rebuild writes beside the version the
  manifest names and never over it, and the manifest switches to the new version at once.

An ``OSError`` while writing (a full disk, a read-only or missing location) becomes a
:class:`~blockpool.errors.PoolWriteError` that names the file and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from blockpool.errors import PoolWriteError
from blockpool.names import MODEL_NAME_RE

__all__ = [
    "TMP_SUFFIX",
    "TOKENIZER_FILES",
    "atomic_write_bytes",
    "block_stem",
    "files_digest",
    "make_dirs",
    "remove_stray",
    "sha256_file",
    "sweep",
    "write_tensors",
    "write_tokenizer",
    "writing",
]

TMP_SUFFIX = ".assy-tmp"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")
_BLOCK_RE = re.compile(r"^(embed|head|layer\.\d{3,})(-[0-9a-f]{12})?\.safetensors$")
_TAG_RE = re.compile(r"^[0-9a-f]{12}$")
_FIXES = {
    errno.ENOSPC: "the disk is full; free some space and run the command again",
    errno.EDQUOT: "the disk quota is exhausted; free some space and run the command again",
    errno.EROFS: "the file system is read-only; write to a writable location",
    errno.EACCES: "permission denied; write to a location you may write to",
    errno.EPERM: "permission denied; write to a location you may write to",
    errno.ENOENT: "the directory does not exist (was it removed while writing?)",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another location",
    errno.EISDIR: "a directory is in the way; choose another location",
}


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a :class:`PoolWriteError`."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        where = e.filename or path
        fix = _FIXES.get(e.errno or 0, "check the location and run the command again")
        raise PoolWriteError(f"cannot write {where}: {e.strerror or e} ({fix})") from None
    except SafetensorError as e:  # safetensors reports its own I/O errors this way
        raise PoolWriteError(
            f"cannot write {path}: {e} (is the disk full or the location read-only?)"
        ) from None


def make_dirs(path: Path) -> None:
    """``mkdir -p`` with the error a user can act on."""
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def block_stem(kind: str, index: int) -> str:
    """The file stem of a block: ``embed``, ``layer.007``, ``head``."""
    return f"layer.{index:03d}" if kind == "layer" else kind


def _temp_beside(path: Path) -> Path:
    """Create an empty temporary file beside ``path`` (umask permissions) and return it."""
    make_dirs(path.parent)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    """Rename a complete, fsynced temporary file over ``path`` and make the rename durable.

    Every file of a pool becomes visible here, one at a time (the fault-injection tests
    fail or kill a writer at each call)."""
    os.replace(tmp, path)
    _fsync(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over.

    Raises:
        PoolWriteError: the file cannot be written (full disk, read-only location, ...).
    """
    path = Path(path)
    with writing(path):
        tmp = _temp_beside(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _publish(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_tensors(
    directory: Path, stem: str, state: Mapping[str, Any], meta: Mapping[str, str]
) -> tuple[Path, str]:
    """Write a safetensors file ``<directory>/<stem>-<sha256[:12]>.safetensors``.

    The file is written by ``save_file`` to a temporary name and hashed from disk: about
    one block in memory, where serializing to ``bytes`` would hold two more.

    Returns:
        The file's path and its sha256.

    Raises:
        PoolWriteError: the file cannot be written.
    """
    from safetensors.torch import save_file

    with writing(directory / stem):
        tmp = _temp_beside(directory / f"{stem}.safetensors")
        try:
            mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 minus the umask
            save_file(dict(state), str(tmp), metadata=dict(meta))
            _sort_metadata(tmp)
            os.chmod(tmp, mode)  # safetensors replaces the file with one of mode 0o600
            _fsync(tmp)
            digest = sha256_file(tmp)
            path = directory / f"{stem}-{digest[:12]}.safetensors"
            _publish(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path, digest


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header's ``__metadata__`` with its keys sorted, in place.

    safetensors writes that map in no fixed order (two builds of the same block differed
    only there), so the file's sha256 — its name and the sum the pool records — would not
    be decided by its content alone. The tensors' entries keep safetensors' own order, and
    the header its length (the same keys and values, reordered); one that would not
    (escaping written otherwise) is left as safetensors wrote it.
    """
    import json

    from blockpool.reads import read_header

    raw, _, meta = read_header(path)
    if not meta:
        return
    header = json.loads(raw[8:])
    ordered = {"__metadata__": dict(sorted(meta.items()))}
    ordered |= {k: v for k, v in header.items() if k != "__metadata__"}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) != len(raw[8:].rstrip(b" ")) or json.loads(text) != header:
        return
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(text)


def write_tokenizer(root: Path, model: str, files: Mapping[str, bytes]) -> dict[str, str]:
    """Write a model's tokenizer files into ``tokenizers/<model>/<12 hex>/`` (a directory
    named by their sums, so a new version never overwrites the one a manifest names).

    Args:
        root: the pool directory.
        model: the model's name.
        files: file name -> contents.

    Returns:
        Pool-relative file -> sha256, as the manifest records them.
    """
    sums = {n: hashlib.sha256(data).hexdigest() for n, data in files.items()}
    if not sums:
        return {}
    directory = f"tokenizers/{model}/{files_digest(sums)[:12]}"
    for n, data in files.items():
        path = root / directory / n
        if not (path.is_file() and sha256_file(path) == sums[n]):
            atomic_write_bytes(path, data)
    return {f"{directory}/{n}": digest for n, digest in sums.items()}


def files_digest(sums: Mapping[str, str]) -> str:
    """One sum over named files' sums (``name -> sha256``), independent of their order."""
    h = hashlib.sha256()
    for name in sorted(sums):
        h.update(f"{name}\0{sums[name]}\n".encode())
    return h.hexdigest()


def _pool_dirs(root: Path) -> Iterator[tuple[Path, str]]:
    """The directories a pool writes, each with what it holds: the root (``pool``),
    ``blocks/<model>/`` (``blocks``), ``tokenizers/<model>/`` and its versions
    ``tokenizers/<model>/<12 hex>/`` (``tokenizer``)."""
    yield root, "pool"
    for top, kind in (("blocks", "blocks"), ("tokenizers", "tokenizer")):
        for d in _children(root / top):
            if d.is_dir() and MODEL_NAME_RE.match(d.name):
                yield d, kind
                if kind == "tokenizer":
                    for v in _children(d):
                        if v.is_dir() and _TAG_RE.match(v.name):
                            yield v, kind


def _children(d: Path) -> list[Path]:
    return sorted(d.iterdir()) if d.is_dir() else []


def remove_stray(root: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in the directories a pool writes.

    Only files named as :func:`atomic_write_bytes` and :func:`write_tensors` name them are
    touched, and no other directory is looked into: a user's files are never removed.
    Call it while holding the pool's lock (:func:`blockpool.lock.pool_lock`).
    """
    removed = []
    with writing(root):
        for d, _ in _pool_dirs(root):
            for f in _children(d):
                if f.is_file() and _TMP_RE.match(f.name):
                    f.unlink(missing_ok=True)
                    removed.append(f)
    return removed


def sweep(root: Path, referenced: Iterable[Path]) -> list[Path]:
    """Delete pool files no model uses any more: block files and tokenizer files the
    manifest just written does not name (an earlier version of a rebuilt model, the blocks
    of a killed build), then the directories left empty.

    Only files named as a pool names them, in the directories a pool writes, are deleted.
    Call it under the pool's lock, after the manifest was written. What cannot be deleted
    is left for the next writer: the manifest no longer names it, so it harms nothing.
    """
    keep = {Path(p).resolve() for p in referenced}
    removed = []
    dirs = list(_pool_dirs(root))
    for d, kind in dirs:
        for f in _children(d) if kind != "pool" else ():
            ours = _BLOCK_RE.match(f.name) if kind == "blocks" else f.name in TOKENIZER_FILES
            if ours and f.is_file() and f.resolve() not in keep:
                try:
                    f.unlink()
                    removed.append(f)
                except OSError:
                    continue  # unreferenced: the next writer tries again
    for d, kind in sorted(dirs, key=lambda x: -len(x[0].parts)):
        if kind != "pool" and not any(d.iterdir()):
            try:
                d.rmdir()
            except OSError:
                continue
    for top in ("blocks", "tokenizers"):
        if (root / top).is_dir() and not any((root / top).iterdir()):
            (root / top).rmdir()  # empty: nothing of anyone's is lost
    return removed
