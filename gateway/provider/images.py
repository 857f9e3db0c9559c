"""The local provider's image host: generated images by imageUUID, bounded, with expiry.

An image is served until its ``ttl`` runs out (or the default retention), then 404. The store
is bounded both in count and in bytes; past either bound the oldest images are evicted first.
The clock is injected so that expiry is tested without waiting.

Routes: ``GET /images/<imageUUID>.<ext>`` serves a stored image; ``GET /images/fast/<name>``
serves the one pre-rendered image of the ``fast`` fault, whatever the name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.provider.render import encode_image, render_scene

__all__ = ["ImageHost", "ImageStore", "StoredImage"]


@dataclass(frozen=True, slots=True)
class StoredImage:
    data: bytes
    content_type: str
    extension: str
    expires_at: float


class ImageStore:
    def __init__(
        self,
        *,
        max_images: int,
        max_bytes: int,
        default_ttl: float,
        clock: Callable[[], float],
    ) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.default_ttl = default_ttl
        self._clock = clock
        self._images: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self.evicted = 0

    def put(
        self,
        image_uuid: str,
        data: bytes,
        content_type: str,
        extension: str,
        ttl: float | None = None,
    ) -> None:
        expires = self._clock() + (self.default_ttl if ttl is None else ttl)
        old = self._images.pop(image_uuid, None)
        if old is not None:
            self._bytes -= len(old.data)
        self._images[image_uuid] = StoredImage(data, content_type, extension, expires)
        self._bytes += len(data)
        while self._images and (
            len(self._images) > self.max_images or self._bytes > self.max_bytes
        ):
            _, evicted = self._images.popitem(last=False)
            self._bytes -= len(evicted.data)
            self.evicted += 1

    def get(self, image_uuid: str) -> StoredImage | None:
        image = self._images.get(image_uuid)
        if image is None:
            return None
        if self._clock() >= image.expires_at:
            del self._images[image_uuid]
            self._bytes -= len(image.data)
            return None
        return image

    def clear(self) -> None:
        self._images.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._images)

    @property
    def bytes(self) -> int:
        return self._bytes


class ImageHost:
    """The HTTP side of the store."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self._fast_image: bytes | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/images/fast/{name}", self._fast_image_route)
        app.router.add_get("/images/{name}", self._image_route)

    async def _image_route(self, request: web.Request) -> web.StreamResponse:
        image_uuid, _, extension = request.match_info["name"].partition(".")
        stored = self.store.get(image_uuid)
        if stored is None or stored.extension != extension:
            raise web.HTTPNotFound()
        return web.Response(body=stored.data, content_type=stored.content_type)

    async def _fast_image_route(self, request: web.Request) -> web.StreamResponse:
        if self._fast_image is None:
            self._fast_image = encode_image(
                render_scene("a figure under a spotlight", 1, 1024, 1024), "JPG", 90
            )
        return web.Response(body=self._fast_image, content_type="image/jpeg")
