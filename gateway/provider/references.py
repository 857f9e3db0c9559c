"""Reference images: a task's ``referenceImages[0]`` as bytes, from wherever it names.

An imageUUID of an image this provider made, a data URI, bare base64, or a URL to fetch.
"""

from __future__ import annotations

import base64
import binascii

import aiohttp

from gateway.provider.images import ImageStore
from protocol.frames import ImageTask

__all__ = ["ReferenceImages", "ReferenceUnavailable"]


class ReferenceUnavailable(Exception):
    """A reference image that cannot be had: the task fails with invalidReferenceImages."""


class ReferenceImages:
    def __init__(self, images: ImageStore, *, timeout: float, max_bytes: int) -> None:
        self._images = images
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._http: aiohttp.ClientSession | None = None

    async def load(self, task: ImageTask) -> bytes:
        image = task.reference_images[0].image
        if image.startswith(("http://", "https://")):
            return await self._fetch(image)
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
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        limit = self._max_bytes
        try:
            async with self._http.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ReferenceUnavailable(
                        f"Fetching the reference image got HTTP {response.status}."
                    )
                chunks: list[bytes] = []
                size = 0
                # read(n) returns what is buffered: read to the end, under the cap
                while chunk := await response.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise ReferenceUnavailable(
                            f"The reference image is larger than {limit} bytes."
                        )
                    chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ReferenceUnavailable(f"Fetching the reference image failed: {exc!r}.") from exc
        return b"".join(chunks)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
