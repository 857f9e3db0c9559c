"""One request to a receiver, as every delivery makes it: Standard Webhooks signing, a send that
never follows a redirect and reads at most a bounded answer, an image fetched within a size cap,
and the URL as it may be shown (never a credential or a presigned signature)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urlsplit

import aiohttp

from gateway.delivery.egress import EgressRefused

__all__ = [
    "Final",
    "display",
    "fetch_image",
    "fill",
    "origin",
    "read_capped",
    "reason",
    "refused",
    "send",
    "sign",
]


class Final(Exception):
    """Stop retrying: the outcome is final."""


def sign(secret: str, message_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, keyed by the
    base64 part of a ``whsec_`` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(digest.digest()).decode()


def display(url: str) -> str:
    """The URL without userinfo, query or fragment: credentials and presigned signatures
    never reach a log or a view."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host, query="", fragment="").geturl()


def fill(url: str, image_uuid: str, index: int) -> str:
    for name, value in (("imageUUID", image_uuid), ("index", str(index))):
        url = url.replace("{" + name + "}", value).replace("%7B" + name + "%7D", value)
    return url


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


async def send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    max_response_bytes: int,
) -> int:
    async with http.request(
        method, url, data=body, headers=headers, allow_redirects=False
    ) as response:
        await response.content.read(max_response_bytes)
        if 300 <= response.status < 400:
            where = display(response.headers.get("Location", "?"))
            raise Final(f"HTTP {response.status}: redirect to {where} not followed")
        return response.status


async def fetch_image(http: aiohttp.ClientSession, url: str, limit: int) -> bytes:
    async with http.get(url, allow_redirects=False) as response:
        if response.status != 200:
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status,
                message="fetching the image from the provider",
            )  # fmt: skip
        data = await read_capped(response.content, limit)
    if data is None:
        raise Final(f"the image is larger than {limit} bytes")
    return data


async def read_capped(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None past ``limit`` bytes. (``read(n)`` returns what is buffered,
    up to n: reading once is not reading it all.)"""
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def refused(exc: BaseException) -> bool:
    """Refused by the egress guard when the name resolved (aiohttp wraps the resolver's
    error in a connector error)."""
    return isinstance(exc, EgressRefused) or isinstance(
        getattr(exc, "os_error", None), EgressRefused
    )


def reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"
