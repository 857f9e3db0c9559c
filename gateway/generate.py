"""``tenebra generate``: a client of the gateway that saves the pictures it streams back."""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from protocol.frames import EXTENSIONS

__all__ = ["generate"]


def _reference(ref: str) -> str:
    """A file becomes a data URI; a URL or an imageUUID goes as it is."""
    path = Path(ref)
    if path.is_file():
        kind = mimetypes.guess_type(path.name)[0] or "image/png"
        return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
    return ref


async def generate(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get("TENEBRA_DEMO_KEY")
    if not key:
        print("tenebra generate: give --key (or TENEBRA_DEMO_KEY)", file=sys.stderr)
        return 2
    width, _, height = args.size.partition("x")
    output_format = args.format.upper()
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "exactly:photo@extreme-contrast",
        "positivePrompt": args.prompt,
        "width": int(width),
        "height": int(height),
        "numberResults": args.number,
        "outputFormat": output_format,
        "includeCost": True,
    }
    if args.ref:
        task["inputs"] = {"referenceImages": [{"image": _reference(args.ref)}]}
    args.out.mkdir(parents=True, exist_ok=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    saved: list[tuple[Path, float]] = []
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.ws_connect(args.url, max_msg_size=0, heartbeat=20) as ws,
    ):
        await ws.send_str(json.dumps([{"taskType": "authentication", "apiKey": key}]))
        reply = await ws.receive_json(timeout=30)
        if "errors" in reply:
            print(f"tenebra generate: {reply['errors'][0]['message']}", file=sys.stderr)
            return 1
        await ws.send_str(json.dumps([task]))
        with Progress(
            TextColumn("[bold]rendering"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ) as progress:
            bar = progress.add_task("images", total=args.number)
            while len(saved) < args.number:
                frame = await ws.receive_json(timeout=600)
                for error in frame.get("errors", []):
                    print(f"tenebra generate: {error['code']}: {error['message']}")
                    return 1
                for item in frame.get("data", []):
                    path = args.out / f"{item['imageUUID']}.{EXTENSIONS[output_format]}"
                    path.write_bytes(await _bytes(http, item))
                    saved.append((path, float(item.get("cost", 0.0))))
                    progress.advance(bar)
    for path, _ in saved:
        print(path)
    print(f"cost: ${sum(cost for _, cost in saved):.3f}")
    return 0


async def _bytes(http: aiohttp.ClientSession, item: dict[str, Any]) -> bytes:
    if "imageURL" in item:
        async with http.get(item["imageURL"]) as response:
            response.raise_for_status()
            return await response.read()
    if "imageBase64Data" in item:
        return base64.b64decode(item["imageBase64Data"])
    return base64.b64decode(item["imageDataURI"].partition(",")[2])
