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
