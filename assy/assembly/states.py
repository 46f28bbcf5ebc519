"""Hidden states for fitting: a model's own states at given depths, cached by what made them.

*Depth* ``k`` of a model is the hidden state entering its layer ``k``; depth ``L`` (its
number of layers) is the state leaving the last layer, before the final norm. States are
keyed by the token ids, the mask, the causality and dtype of the pass and the chain of
block sums (and adapter sums) that produced them, so a state computed once -- the anchor's
own states, the stream entering a seam -- is reused by every fit that shares that prefix
(within a run, and across runs when the cache has a directory).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from assy.progress import bar
from blockpool import Pool, RunOptions, open_runner

__all__ = [
    "FORWARDS",
    "StateCache",
    "block_digest",
    "default_cache_dir",
    "module_digest",
    "own_states",
    "prefix_keys",
    "state_key",
]


class ForwardCounter:
    """Block forward passes run in this process, one per block per window (a layer run
    over a batch of 8 windows counts 8): what a state found in a :class:`StateCache`
    saves. :data:`FORWARDS` is the process's counter; read it before and after."""

    def __init__(self) -> None:
        self.value = 0

    def add(self, blocks: int, windows: int) -> None:
        self.value += blocks * windows


FORWARDS = ForwardCounter()


def default_cache_dir() -> Path:
    """``states/`` under assy's cache directory (``$ASSY_CACHE_DIR``, else ``~/.cache/assy``)."""
    from blockpool import cache_dir

    return cache_dir() / "states"


def block_digest(pool: Pool, bid: str) -> str:
    """What identifies a block's computation: its id and its sum."""
    return f"{bid}@{pool.blocks[bid]['sha256']}"


def module_digest(module: torch.nn.Module) -> str:
    """A sum of a module's tensors (an adapter's state) in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_key(inputs: str, items: Sequence[str], *, causal: bool, dtype: str) -> str:
    """The cache key of the state a chain of ``items`` produces from ``inputs``."""
    h = hashlib.sha256(f"{inputs}|causal={causal}|{dtype}".encode())
    for item in items:
        h.update(b"|" + item.encode())
    return h.hexdigest()


def prefix_keys(inputs: str, items: Sequence[str], *, causal: bool, dtype: str) -> list[str]:
    """:func:`state_key` of every prefix of ``items`` (``[0]``: the inputs alone)."""
    h = hashlib.sha256(f"{inputs}|causal={causal}|{dtype}".encode())
    keys = [h.copy().hexdigest()]
    for item in items:
        h.update(b"|" + item.encode())
        keys.append(h.copy().hexdigest())
    return keys


class StateCache:
    """Tensors by key: in memory for this process, and on disk under ``root`` if given."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._memory: dict[str, torch.Tensor] = {}

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.root is not None and self._path(key).is_file():
            tensor = load_file(self._path(key))["state"]
            self._memory[key] = tensor
            return tensor
        return None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.is_inference():  # made under inference mode: usable by autograd only as a copy
            tensor = tensor.clone()
        self._memory[key] = tensor
        if self.root is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"state": tensor}, tmp)
            tmp.replace(path)

    def forget(self) -> None:
        """Drop the in-memory copies (the files stay)."""
        self._memory.clear()


def _layer_ids(pool: Pool, model: str) -> list[str]:
    return [b for b in pool.model(model).blocks if pool.blocks[b].kind == "layer"]


def own_states(
    pool: Pool,
    model: str,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    depths: Sequence[int],
    *,
    options: RunOptions = RunOptions(),
    cache: StateCache | None = None,
    desc: str | None = None,
) -> dict[int, torch.Tensor]:
    """Model ``model``'s own hidden states at ``depths`` on ``ids``, float32 on the CPU.

    Args:
        pool: the open pool.
        model: the model (run alone: its own positions, masks and causality).
        ids: ``[n, T]`` token ids (its own tokenization).
        mask: ``[n, T]`` padding mask, ``None`` for all real tokens.
        depths: depths wanted (0: the embedding's output; the number of layers: the last
            layer's output).
        options: how to run (budget, device, dtype, batch size, threads).
        cache: where states are looked up and kept.

    Returns:
        depth -> ``[n, T, d]``.
    """
    cache = cache or StateCache()
    layers = _layer_ids(pool, model)
    embed = pool.model(model).blocks[0]
    causal = pool.family(model).causal
    inputs = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    if mask is not None:
        inputs += hashlib.sha256(mask.numpy().tobytes()).hexdigest()
    digests = [block_digest(pool, b) for b in [embed, *layers]]

    def key(depth: int) -> str:
        return state_key(inputs, digests[: depth + 1], causal=causal, dtype=options.dtype)

    found = {d: t for d in depths if (t := cache.get(key(d))) is not None}
    todo = sorted(set(depths) - set(found))
    if not todo:
        return found
    # start from the deepest state already cached below what is missing
    start, state = -1, ids
    for d in range(min(todo), -1, -1):
        if (t := cache.get(key(d))) is not None:
            start, state = d, t
            break
    chain = [embed, *layers[: max(todo)]]
    with open_runner(pool, chain, options) as run:
        runner, batch = run.runner, options.batch_size
        for depth in bar(
            range(start + 1, max(todo) + 1),
            desc=desc or f"{model} states",
            leave=False,
        ):
            bid = chain[depth]
            outs = []
            with torch.no_grad():
                for s in range(0, ids.shape[0], batch):
                    m = mask[s : s + batch].to(runner.device) if mask is not None else None
                    x = state[s : s + batch].to(runner.device)
                    outs.append(runner.run_block(bid, x, attention_mask=m).float().cpu())
                    FORWARDS.add(1, x.shape[0])
            state = torch.cat(outs)
            if depth in todo:
                cache.put(key(depth), state)
                found[depth] = cache.get(key(depth))
    return found
