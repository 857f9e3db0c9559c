from __future__ import annotations

from gateway.provider.images import ImageStore
from tests.gateway.conftest import Clock


def store(clock: Clock, max_images: int = 10, max_bytes: int = 1000) -> ImageStore:
    return ImageStore(max_images=max_images, max_bytes=max_bytes, default_ttl=3600, clock=clock)


def test_images_expire_after_their_ttl(clock: Clock) -> None:
    images = store(clock)
    images.put("a", b"x" * 10, "image/jpeg", "jpg", ttl=60)
    images.put("b", b"y" * 10, "image/jpeg", "jpg")
    clock.advance(59.9)
    assert images.get("a") is not None
    clock.advance(0.1)
    assert images.get("a") is None
    assert images.get("b") is not None
    clock.advance(3600)
    assert images.get("b") is None
    assert len(images) == 0 and images.bytes == 0


def test_oldest_evicted_first_by_count(clock: Clock) -> None:
    images = store(clock, max_images=3)
    for name in "abcd":
        images.put(name, b"1", "image/png", "png")
    assert [images.get(n) is not None for n in "abcd"] == [False, True, True, True]
    assert images.evicted == 1


def test_oldest_evicted_first_by_bytes(clock: Clock) -> None:
    images = store(clock, max_bytes=25)
    images.put("a", b"1" * 10, "image/png", "png")
    images.put("b", b"1" * 10, "image/png", "png")
    images.put("c", b"1" * 10, "image/png", "png")
    assert images.get("a") is None and images.get("c") is not None
    assert images.bytes == 20
    images.put("c", b"2" * 5, "image/png", "png")  # a replaced image is counted once
    assert images.bytes == 15


def test_an_image_larger_than_the_store_is_not_kept(clock: Clock) -> None:
    images = store(clock, max_bytes=5)
    images.put("a", b"1" * 6, "image/png", "png")
    assert images.get("a") is None and images.bytes == 0
