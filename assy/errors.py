"""User-facing errors of assy.

Every error a user can cause derives from :class:`AssyError`; the CLI prints its message on
one line and exits with code 2. ``blockpool`` defines its own errors on the same base so
that the dependency stays one-way (``assy`` -> ``blockpool``).
"""

from blockpool.errors import BlockpoolError as AssyError
from blockpool.errors import UsageError, arg

__all__ = ["AssyError", "UsageError", "arg"]
