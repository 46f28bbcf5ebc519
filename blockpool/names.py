"""Model names: one validator for every command that names a model in a pool.

A model's name becomes a directory of the pool (``blocks/<name>/``,
``tokenizers/<name>/``) and the first part of its block ids (``<name>/layer/3``), so it
must be one plain path component: no separators, no ``..``, nothing hidden, nothing a
file system of another machine would refuse or fold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from blockpool.errors import UsageError, arg

__all__ = ["MODEL_NAME_RE", "MODEL_NAME_RULE", "check_model_name"]

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_model_name(name: str, *, argument: str | None = "name", taken: Iterable[str] = ()) -> str:
    """Return ``name`` if it can name a model in a pool, else raise.

    Every writer calls this before it writes anything: ``build-pool NAME=SOURCE``,
    ``prune --as``, ``quantize``, a merged or fine-tuned model, and any later one.

    Args:
        name: the proposed model name.
        argument: the library argument that gave it (shown as the command's flag in the
            CLI); ``None`` when the name did not come from one argument.
        taken: names already in the pool; a name equal to one of them but for letter case
            is refused (the two would share a directory on a case-insensitive file system).

    Raises:
        UsageError: the name is empty, too long, holds a path separator, ``..`` or another
            character outside the rule, or differs from a taken name only by case.
    """
    where = f"{arg(argument)} " if argument else ""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise UsageError(
            f"{where}{name!r} is not a usable model name: use {MODEL_NAME_RULE} "
            "(it names a directory inside the pool)"
        )
    for other in taken:
        if other != name and other.lower() == name.lower():
            raise UsageError(
                f"{where}{name!r} differs from the pool's model {other!r} only by letter case; "
                "choose a name that differs in more than case"
            )
    return name
