"""aiohttp's WebSocket message kinds as module constants. Compiled with mypyc, a ``Final`` name
is a C static; ``WSMsgType.TEXT`` read in compiled code goes through ``EnumType.__getattr__``'s
slot on every read (about 75 ns against 10, Python 3.11), and the hot paths read one per
frame."""

from __future__ import annotations

from typing import Final

from aiohttp import WSMsgType

__all__ = ["BINARY", "TEXT"]

TEXT: Final = WSMsgType.TEXT
BINARY: Final = WSMsgType.BINARY
