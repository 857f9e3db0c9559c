"""Reference images: a task's ``referenceImages[0]`` as bytes, from wherever it names.

An imageUUID of an image this provider made, a data URI, bare base64, or a URL to fetch. A URL
is fetched through the egress guard (:mod:`gateway.provider.egress`): no private destination
unless the allow-list opens it, no redirect, at most ``max_bytes`` within ``timeout`` seconds.
Whatever goes wrong with a fetch (refused, unreachable, closed, slow, a non-2xx answer, too
large, not a picture) the task is told the same words, so the provider cannot be used to map
a network: which ports are open, which hosts answer.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Iterable

import aiohttp
from PIL import Image
from yarl import URL

from gateway.provider.egress import guarded_session
from gateway.provider.images import ImageStore
from protocol.egress import EgressPolicy
from protocol.frames import ImageTask

__all__ = ["NOT_FETCHED", "ReferenceImages", "ReferenceUnavailable"]

log = logging.getLogger("tenebra.provider")
NOT_FETCHED = "The reference image could not be fetched."


class ReferenceUnavailable(Exception):
    """A reference image that cannot be had: the task fails with invalidReferenceImages."""


class _NotFetched(Exception):
    """Why a fetch failed, for the provider's log only."""


class ReferenceImages:
    def __init__(
        self,
        images: ImageStore,
        *,
        timeout: float,
        max_bytes: int,
        allow: Iterable[str] = (),
    ) -> None:
        self._images = images
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._policy = EgressPolicy(allow)
        self._http: aiohttp.ClientSession | None = None

    async def load(self, task: ImageTask) -> bytes:
        image = task.reference_images[0].image
        if image.startswith(("http://", "https://")):
            try:
                return await self._fetch(image)
            except _NotFetched as exc:
                log.info("reference image not fetched: %s", exc)
                raise ReferenceUnavailable(NOT_FETCHED) from None
        if image.startswith("data:"):
            image = image.partition(",")[2]
        elif len(image) == 36 and image.count("-") == 4:
            stored = self._images.get(image)
            if stored is None:
                raise ReferenceUnavailable(f"No image with imageUUID {image} on this provider.")
            return stored.data
        try:
            return base64.b64decode(image, validate=True)
        except binascii.Error as exc:
            raise ReferenceUnavailable("The reference image is not valid base64.") from exc

    async def _fetch(self, url: str) -> bytes:
        try:
            # the host as aiohttp will read it, so a literal is judged as it will connect
            target = URL(url)
        except ValueError as exc:
            raise _NotFetched("the URL does not parse") from exc
        if reason := self._policy.refusal_for_host(target.raw_host or ""):
            raise _NotFetched(f"egress refused: {reason}")
        if self._http is None:
            self._http = guarded_session(self._policy, timeout=self._timeout)
        try:
            async with self._http.get(target, allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    raise _NotFetched(f"HTTP {response.status}")
                data = await self._read(response)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _NotFetched(repr(exc)) from exc
        try:
            with Image.open(io.BytesIO(data)):  # the header only: is it a picture at all?
                pass
        except Exception as exc:
            raise _NotFetched(f"not a picture: {exc!r}") from exc
        return data

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        # read(n) returns what is buffered: read to the end, under the cap
        while chunk := await response.content.readany():
            size += len(chunk)
            if size > self._max_bytes:
                raise _NotFetched(f"larger than {self._max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
