"""Rendering off the event loop: a process pool sized to the machine, behind a bounded queue.

At most ``max_queue`` images are accepted and not yet finished (waiting, rendering, or in
their injected latency); a task with more images than there is room for is refused whole with
:class:`RenderQueueFull`, so a burst turns into clear, unbilled refusals rather than unbounded
memory.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass

from PIL import Image

from gateway.provider.lifetime import die_with_parent
from gateway.provider.render import encode_image, regrade, render_scene

__all__ = ["RenderJob", "RenderPool", "RenderQueueFull", "render"]


@dataclass(frozen=True, slots=True)
class RenderJob:
    prompt: str
    seed: int
    width: int
    height: int
    output_format: str
    quality: int
    reference: bytes | None = None


class RenderQueueFull(Exception):
    """The pool has ``max_queue`` images in hand already."""


def render(job: RenderJob) -> bytes:
    """Render and encode one image; runs in a worker process."""
    if job.reference is None:
        image = render_scene(job.prompt, job.seed, job.width, job.height)
    else:
        with Image.open(io.BytesIO(job.reference)) as reference:
            reference.load()
            image = regrade(reference, job.prompt, job.seed, job.width, job.height)
    return encode_image(image, job.output_format, job.quality)


class RenderPool:
    def __init__(self, *, workers: int | None = None, max_queue: int = 256) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.max_queue = max_queue
        self._in_hand = 0
        self._executor: Executor | None = None

    def _pool(self) -> Executor:
        if self._executor is None:
            # spawn, not fork: the parent runs an event loop and threads that a fork would copy
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent,
            )
        return self._executor

    @property
    def in_hand(self) -> int:
        return self._in_hand

    def reserve(self, images: int) -> None:
        """Hold room for a whole task's images before it is accepted, as Runware's queue
        refuses a task it has no room for rather than some of its images: the refusal is
        then unbilled, and the same taskUUID may be sent again."""
        if self._in_hand + images > self.max_queue:
            raise RenderQueueFull(f"the render queue holds {self.max_queue} images already")
        self._in_hand += images

    def release(self, images: int = 1) -> None:
        self._in_hand -= images

    async def render(self, job: RenderJob) -> bytes:
        """Render one image whose room was reserved."""
        return await asyncio.get_running_loop().run_in_executor(self._pool(), render, job)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
