"""The echo provider: a Runware-protocol server that answers at once, for measuring what sits
in front of it (the ceiling scenarios of issue 14), not product code.

    python -m bench.echo --port 8765 [--key K] [--remember 65536]

What it does, and nothing else: the authentication (any key, or only ``--key``; the reply
carries a connectionSessionUUID), ping/pong, ``numberResults`` result items for every
imageInference task at once (imageUUID, imageURL to one fixed URL, seed, cost if includeCost),
and getResponse answered from a bounded per-connection map of recent tasks (or taskNotFound).
Any other task type gets an ``unsupportedTaskType`` error: an answer, so that nobody waits.

Why it is fast, since the point is that it is never the bottleneck:
- a frame is decoded once, into one flat Struct per task holding only the fields it reads
  (msgspec skips the rest); the taskUUID stays raw JSON and is spliced into the answer, so it
  is neither decoded into a str nor escaped again;
- every answer item is built by concatenating bytes, not by encoding objects;
- everything answered to one socket while its reader runs without suspending (all the frames
  that one read from the socket brought) goes out as ONE data frame, then at most one errors
  frame (never both in one frame: SDK 1.8 drops the data of such a frame), and a pong in a
  frame of its own (SDKs read ``data[0]`` of a pong). The gateway's upstream link and the load
  generator both read every item of a frame (``decode_server_frame``), so nothing else is lost.
- uvloop, aiohttp without compression, text frames kept as bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import uuid
from collections import deque

import msgspec
import uvloop
from aiohttp import WSMsgType, web

IMAGE_URL = b"https://im.runware.ai/image/ws/0.5/ii/echo.webp"
COST = b"0.0013"
DEFAULT_REMEMBER = 65_536  # getResponse answers per socket: a gateway's in-flight tasks fit


class _Task(msgspec.Struct, gc=False):
    """Every field any task type needs, each optional: one decode per frame, no tagged union."""

    taskType: str = ""
    taskUUID: msgspec.Raw = msgspec.Raw(b"null")
    numberResults: int = 1
    includeCost: bool = False
    seed: int | None = None
    apiKey: str | None = None


_tasks_of = msgspec.json.Decoder(list[_Task])
_image_counter = itertools.count()
# imageUUIDs need only be unique (the gateway counts a result once per imageUUID): a fixed
# prefix and a counter cost far less than uuid4 per image
_IMAGE_PREFIX = uuid.uuid4().hex[:8].encode() + b"-ec40-4000-8000-"


def error(code: str, message: str, task_type: str, task_uuid: bytes = b"null") -> bytes:
    """One error item as the reference's errors carry them."""
    return (
        b'{"code":' + msgspec.json.encode(code) + b',"message":' + msgspec.json.encode(message)
        + b',"taskType":' + msgspec.json.encode(task_type) + b',"taskUUID":' + task_uuid + b"}"
    )  # fmt: skip


def results(task: _Task) -> bytes:
    """The ``numberResults`` result items of one imageInference task, comma-joined."""
    head = b'{"taskType":"imageInference","taskUUID":' + bytes(task.taskUUID) + b',"imageUUID":"'
    tail = b'","imageURL":"' + IMAGE_URL + b'","seed":'
    cost = b',"cost":' + COST + b"}" if task.includeCost else b"}"
    seed = task.seed
    items = []
    for _ in range(max(1, task.numberResults)):
        n = next(_image_counter)
        items.append(
            head + _IMAGE_PREFIX + b"%012x" % n + tail
            + b"%d" % (seed if seed is not None else n & 0x7FFFFFFF) + cost
        )  # fmt: skip
    return b",".join(items)


class Connection:
    """One socket's state: what waits to be sent this turn, and its recent tasks' answers.

    Frames in go through :meth:`handle`, which only appends; :meth:`frames` empties what is
    pending into the frames to send, in order: pongs, the data frame, the errors frame."""

    def __init__(self, key: str | None, remember: int, session: str | None = None) -> None:
        self.key = key
        self.session = session or str(uuid.uuid4())
        self.authenticated = False
        self.data: list[bytes] = []
        self.errors: list[bytes] = []
        self.alone: list[bytes] = []  # frames of their own (auth reply, pongs), sent first
        self._remember = remember
        self._answers: dict[bytes, bytes] = {}
        self._order: deque[bytes] = deque()

    def handle(self, frame: bytes) -> None:
        try:
            tasks = _tasks_of.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            self.errors.append(error("invalidJSON", "Not a JSON array of tasks.", "unknown"))
            return
        for task in tasks:
            kind = task.taskType
            if kind == "imageInference" and self.authenticated:
                items = results(task)
                self.data.append(items)
                self._keep(bytes(task.taskUUID), items)
            elif kind == "authentication":
                self._authenticate(task)
            elif not self.authenticated:
                self.errors.append(
                    error("missingApiKey", "Authenticate first.", kind, task.taskUUID)
                )
            elif kind == "ping":
                self.alone.append(
                    b'{"data":[{"taskType":"ping","pong":true,"taskUUID":'
                    + bytes(task.taskUUID)
                    + b"}]}"
                )
            elif kind == "getResponse":
                answer = self._answers.get(bytes(task.taskUUID))
                if answer is None:
                    self.errors.append(error("taskNotFound", "No such task.", kind, task.taskUUID))
                else:
                    self.data.append(answer)
            else:
                self.errors.append(
                    error("unsupportedTaskType", "The echo provider does not do this.", kind,
                          task.taskUUID)
                )  # fmt: skip

    def _authenticate(self, task: _Task) -> None:
        if self.key is not None and task.apiKey != self.key:
            self.errors.append(error("invalidApiKey", "Invalid API key.", "authentication"))
            return
        self.authenticated = True
        # sent at once, before whatever else this turn answers: a client waits for it first
        self.alone.append(
            b'{"data":[{"taskType":"authentication","connectionSessionUUID":'
            + msgspec.json.encode(self.session)
            + b"}]}"
        )

    def _keep(self, task_uuid: bytes, items: bytes) -> None:
        """Remember the answer for getResponse; the oldest goes once ``remember`` are kept (a
        deque beside the dict: popping a dict's first key over and over costs a scan)."""
        if task_uuid not in self._answers:
            self._order.append(task_uuid)
            if len(self._order) > self._remember:
                self._answers.pop(self._order.popleft(), None)
        self._answers[task_uuid] = items

    def frames(self) -> list[bytes]:
        out = self.alone
        self.alone = []
        if self.data:
            out.append(b'{"data":[' + b",".join(self.data) + b"]}")
            self.data.clear()
        if self.errors:
            out.append(b'{"errors":[' + b",".join(self.errors) + b"]}")
            self.errors.clear()
        return out

    @property
    def pending(self) -> bool:
        return bool(self.alone or self.data or self.errors)


async def serve(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=0)
    await ws.prepare(request)
    connection = Connection(app[KEY] or None, app[REMEMBER])
    wakeup = asyncio.Event()

    async def write() -> None:
        # woken by the reader; runs once the reader suspends, i.e. after every frame already
        # read from the socket has been handled: their answers leave together
        while True:
            await wakeup.wait()
            wakeup.clear()
            for frame in connection.frames():
                await ws.send_frame(frame, WSMsgType.TEXT)

    writer = asyncio.create_task(write())
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
                connection.handle(message.data)
                if connection.pending:
                    wakeup.set()
    finally:
        writer.cancel()
    return ws


KEY = web.AppKey("key", str)  # "" accepts any key
REMEMBER = web.AppKey("remember", int)


def application(key: str | None = None, remember: int = DEFAULT_REMEMBER) -> web.Application:
    app = web.Application()
    app[KEY] = key or ""
    app[REMEMBER] = remember
    app.router.add_get("/v1", serve)
    return app


async def main(args: argparse.Namespace) -> None:
    runner = web.AppRunner(application(args.key, args.remember), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    # the harness reads the URL off the end of this line
    print(f"echo provider: listening on ws://127.0.0.1:{runner.addresses[0][1]}/v1", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default=None, help="the only API key accepted (default: any)")
    parser.add_argument("--remember", type=int, default=DEFAULT_REMEMBER,
                        help="tasks per socket that getResponse can answer")  # fmt: skip
    sys.exit(uvloop.run(main(parser.parse_args())))
