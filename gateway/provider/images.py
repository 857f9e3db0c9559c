"""The local provider's image host: generated images by imageUUID, bounded, with expiry.

An image is served until its ``ttl`` runs out (or the default retention), then 404. The store
is bounded both in count and in bytes; past either bound the oldest images are evicted first.
The clock is injected so that expiry is tested without waiting.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ImageStore", "StoredImage"]


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
