"""Split a task's examples into a held-out test set and non-IID client partitions.

Every function is pure and deterministic in its ``seed``: each client recomputes the
whole partition from the same public data and keeps its own part, so no example index
ever travels. Partitions are keyed on Flower's ``partition-id`` (``context.node_config``),
never on node ids.

Two kinds of heterogeneity (``--split``):

* ``labels``: the seed's Dirichlet(α) label skew (Hsu et al., "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification", 2019): for each
  answer label, its examples are spread over the clients by proportions drawn from
  Dir(α·1). For multiple choice this is label skew only: the questions stay alike.
* ``tasks``: each client draws its own mixture of tasks q_i ~ Dir(α·1) and each example of
  task t goes to client i with probability proportional to q_i[t]: clients differ in what
  they are asked, the more meaningful heterogeneity at this scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from assy.errors import UsageError

__all__ = ["dirichlet_labels", "dirichlet_tasks", "heldout_split", "partition"]

_MAX_DRAWS = 100


def heldout_split(n: int, seed: int, test_fraction: float = 0.2) -> tuple[list[int], list[int]]:
    """Shuffle ``range(n)`` by ``seed`` and cut it into client data and a held-out test.

    Returns:
        ``(client_indices, test_indices)``, each sorted; ``len(test) = round(n * fraction)``
        but at least one of each when ``n >= 2``.
    """
    if n < 2:
        raise UsageError(f"{n} example(s): need at least 2 to hold some out for testing")
    order = np.random.default_rng([seed, 0x7E57]).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return sorted(order[n_test:].tolist()), sorted(order[:n_test].tolist())


def _check(n: int, num_clients: int, alpha: float, min_size: int) -> None:
    if num_clients < 1:
        raise UsageError(f"need at least one client, got {num_clients}")
    if alpha <= 0:
        raise UsageError(f"--alpha must be positive, got {alpha}")
    if n < num_clients * min_size:
        raise UsageError(
            f"{n} client examples cannot give {num_clients} clients {min_size} each; "
            "use fewer --clients or more data (--data FILE.jsonl)"
        )


def _draw(
    groups: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float, by_client: bool
) -> list[list[int]]:
    """One draw: per group, the probability of each client, then each example's client."""
    keys = np.unique(groups)
    if by_client:  # q_i ~ Dir(α) per client; a group's examples follow q_i[t] / Σ_j q_j[t]
        q = rng.dirichlet(np.full(len(keys), alpha), size=num_clients)  # [clients, groups]
        per_group = (q / q.sum(0, keepdims=True)).T
    else:  # per group, proportions over the clients ~ Dir(α)
        per_group = rng.dirichlet(np.full(num_clients, alpha), size=len(keys))
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for key, probs in zip(keys, per_group, strict=True):
        members = np.flatnonzero(groups == key)
        owners = rng.choice(num_clients, size=len(members), p=probs / probs.sum())
        for index, owner in zip(members.tolist(), owners.tolist(), strict=True):
            parts[owner].append(index)
    return parts


def partition(
    groups: Sequence[int | str],
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    by_client: bool = False,
    min_size: int = 1,
) -> list[list[int]]:
    """Dirichlet(α) partition of example indices ``0..len(groups)-1`` over clients.

    Args:
        groups: each example's group (answer label or task).
        num_clients: how many partitions.
        alpha: the Dirichlet concentration; small α: few groups per client, large α: IID.
        seed: the draw's seed.
        by_client: draw one mixture over groups per client (``tasks``) instead of one
            spread over clients per group (``labels``).
        min_size: redraw (up to 100 times) until every client holds this many examples.

    Returns:
        ``parts[i]``: the sorted indices of client ``i``; every index in exactly one part.

    Raises:
        UsageError: bad sizes, or no draw gave every client ``min_size`` examples.
    """
    array = np.asarray([str(g) for g in groups])
    _check(len(array), num_clients, alpha, min_size)
    rng = np.random.default_rng([seed, 0xD1])
    for _ in range(_MAX_DRAWS):
        parts = _draw(array, num_clients, rng, alpha, by_client)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise UsageError(
        f"no Dirichlet(α={alpha}) draw in {_MAX_DRAWS} gave each of {num_clients} clients "
        f"{min_size} of {len(array)} examples; raise --alpha or lower --clients"
    )


def dirichlet_labels(
    labels: Sequence[int], num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """``--split labels``: the seed's Dirichlet(α) label skew (see module docstring)."""
    return partition(labels, num_clients, alpha, seed, min_size=min_size)


def dirichlet_tasks(
    tasks: Sequence[str], num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """``--split tasks``: a Dirichlet(α) mixture of tasks per client (module docstring)."""
    return partition(tasks, num_clients, alpha, seed, by_client=True, min_size=min_size)
