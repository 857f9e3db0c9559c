"""A child process that ends with its parent. No numpy, no Pillow: the gateway's workers
(gateway/workers.py) import it too, without the [provider] extra."""

from __future__ import annotations

import contextlib
import ctypes
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this process when the one that made it dies (Linux; elsewhere a no-op): a parent
    killed with SIGKILL otherwise leaves its workers running, holding its ports and pipes."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
