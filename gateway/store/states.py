"""A task's states, in a module of their own so that mypyc compiles it: compiled code then
reads ``TaskState.DONE`` from a C static. From a class the interpreter defined, every such
read goes through ``EnumType.__getattr__``'s slot (about 75 ns against 10, Python 3.11)."""

from __future__ import annotations

import enum

__all__ = ["TaskState"]


class TaskState(enum.StrEnum):
    RECEIVED = "received"  # checked, registered, not yet on a provider link
    QUEUED = "queued"  # waiting for a provider link to be ready
    SUBMITTED = "submitted"  # sent to the provider
    PARTIAL = "partial"  # some of its results are in
    DONE = "done"  # every result is in
    FAILED = "failed"  # the provider or the gateway failed it
    EXPIRED = "expired"  # its deadline passed with results missing
