"""The bare relay: the yardstick tenebra is measured against, not product code.

The simplest correct relay (shared/reference/limits.md): client sockets in, every frame
forwarded over ONE upstream socket, result items routed back by taskUUID, nothing else: no
validation, no tenants, no state beyond the route. aiohttp on both sides, msgspec decoding only
the routing fields, uvloop.

    python -m bench.relay --port 8090 --provider-url ws://127.0.0.1:8765/v1 --provider-key K
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
import msgspec
import uvloop
from aiohttp import WSMsgType, web


class _Task(msgspec.Struct):
    taskUUID: str | None = None


class _Item(msgspec.Struct):
    taskUUID: str | None = None


class _Frame(msgspec.Struct):
    data: list[msgspec.Raw] = msgspec.field(default_factory=list)
    errors: list[msgspec.Raw] = msgspec.field(default_factory=list)


tasks_of = msgspec.json.Decoder(list[_Task])
frame_of = msgspec.json.Decoder(_Frame)
item_of = msgspec.json.Decoder(_Item)


async def main(args: argparse.Namespace) -> None:
    routes: dict[str, web.WebSocketResponse] = {}
    async with aiohttp.ClientSession() as http:
        upstream = await http.ws_connect(args.provider_url, max_msg_size=0)
        await upstream.send_str(
            msgspec.json.encode(
                [{"taskType": "authentication", "apiKey": args.provider_key}]
            ).decode()
        )
        await upstream.receive()

        async def pump() -> None:
            async for message in upstream:
                frame = frame_of.decode(message.data)
                for key, items in (("data", frame.data), ("errors", frame.errors)):
                    for raw in items:
                        client = routes.get(item_of.decode(raw).taskUUID or "")
                        if client is not None and not client.closed:
                            out = b'{"' + key.encode() + b'":[' + bytes(raw) + b"]}"
                            await client.send_frame(out, WSMsgType.TEXT)

        async def serve(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=0)
            await ws.prepare(request)
            first = True
            async for message in ws:
                if first:  # the authentication: answered, not checked
                    first = False
                    await ws.send_str(
                        '{"data":[{"taskType":"authentication","connectionSessionUUID":"r"}]}'
                    )
                    continue
                for task in tasks_of.decode(message.data):
                    if task.taskUUID:
                        routes[task.taskUUID] = ws
                await upstream.send_frame(message.data, WSMsgType.TEXT)
            return ws

        pumping = asyncio.create_task(pump())
        app = web.Application()
        app.router.add_get("/v1", serve)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        print(f"relay: listening on ws://127.0.0.1:{runner.addresses[0][1]}/v1", flush=True)
        await pumping


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--provider-url", required=True)
    parser.add_argument("--provider-key", required=True)
    sys.exit(uvloop.run(main(parser.parse_args())))
