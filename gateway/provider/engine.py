"""The local provider's task engine: a task's generations from submission to result.

Each image of a task is one generation, rendered off the loop by the pool; sync results go out
on the task's session one image per frame, async ones wait for ``getResponse``. Fault switches
(latency, error rate, fast mode) act here; seeds and faults come from the injected ``rng`` so
they repeat under a seeded test, image UUIDs never do.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from gateway.provider.config import Stats
from gateway.provider.faults import Faults
from gateway.provider.images import ImageStore
from gateway.provider.pool import RenderJob, RenderPool, RenderQueueFull
from gateway.provider.references import ReferenceImages, ReferenceUnavailable
from gateway.provider.state import Generation, ProviderTask, Session, TaskTable
from protocol.codec import encode_answer, encode_data, encode_errors
from protocol.errors import error_item
from protocol.frames import (
    CONTENT_TYPES,
    EXTENSIONS,
    ErrorItem,
    GetResponse,
    ImageResult,
    ImageTask,
    ProcessingItem,
    TaskAck,
)
from protocol.models import Catalogue

__all__ = ["TaskEngine"]

log = logging.getLogger("tenebra.provider")


class TaskEngine:
    def __init__(
        self,
        *,
        catalogue: Catalogue,
        stats: Stats,
        tasks: TaskTable,
        images: ImageStore,
        references: ReferenceImages,
        pool: RenderPool,
        faults: Callable[[], Faults],
        clock: Callable[[], float],
        rng: random.Random,
        public_url: Callable[[], str],
        priced: bool = True,
    ) -> None:
        self.catalogue = catalogue
        self.stats = stats
        self.tasks = tasks
        self.images = images
        self.references = references
        self.pool = pool
        self._faults = faults
        self._clock = clock
        self._rng = rng
        self._public_url = public_url
        self.priced = priced
        self._work: set[asyncio.Task[None]] = set()

    def cancel(self) -> None:
        """Every image in the making stops: at shutdown, or when the provider forgets."""
        for work in list(self._work):
            work.cancel()

    def submit(
        self, session: Session, task: ImageTask, data: list[Any], errors: list[ErrorItem]
    ) -> None:
        if self.tasks.get(session.key, task.taskUUID) is not None:
            self.stats.conflicts += 1
            errors.append(
                error_item(
                    "conflictTaskUUID",
                    parameter="taskUUID",
                    type="string",
                    task_type="imageInference",
                    task_uuid=task.taskUUID,
                )
            )
            return
        try:
            self.pool.reserve(task.numberResults)
        except RenderQueueFull as full:
            self.stats.refusals += 1
            errors.append(
                error_item(
                    "rateLimitExceeded",
                    message=f"Too many images in progress: {full}. Retry with backoff.",
                    task_type="imageInference",
                    task_uuid=task.taskUUID,
                )
            )
            return
        self.stats.submissions += 1
        entry = ProviderTask(
            task=task,
            session=session,
            created=self._clock(),
            generations=[Generation() for _ in range(task.numberResults)],
        )
        self.tasks.add(session.key, entry)
        if task.deliveryMethod == "async":
            data.append(TaskAck(taskType="imageInference", taskUUID=task.taskUUID))
        faults = self._faults()
        if faults.error_rate and self._rng.random() < faults.error_rate:
            self._spawn(self._fail(entry, faults.error_code), task.numberResults)
            return
        base_seed = self._rng.randrange(1, 2**31 - 64)
        reference: asyncio.Future[bytes] | None = None
        if task.reference_images and not faults.fast:
            reference = asyncio.ensure_future(self.references.load(task))
        for index in range(task.numberResults):
            self._spawn(self._generate(entry, index, base_seed + index, reference), 1)

    def _spawn(self, work: Coroutine[Any, Any, None], images: int) -> None:
        """Run ``work``; the room reserved for its ``images`` is freed when it ends, however
        it ends (cancelled before it started included)."""
        job = asyncio.create_task(work)
        self._work.add(job)
        job.add_done_callback(self._work.discard)
        job.add_done_callback(lambda _: self.pool.release(images))

    async def _fail(self, entry: ProviderTask, code: str) -> None:
        await asyncio.sleep(self._faults().latency.sample(self._rng))
        error = error_item(code, task_type="imageInference", task_uuid=entry.task.taskUUID)
        entry.failed = error
        for generation in entry.generations:
            generation.status, generation.error = "error", error
        if self.tasks.holds(entry) and entry.task.deliveryMethod == "sync":
            entry.session.deliver(encode_errors([error]))

    async def _generate(
        self,
        entry: ProviderTask,
        index: int,
        seed: int,
        reference: asyncio.Future[bytes] | None,
    ) -> None:
        task = entry.task
        generation = entry.generations[index]
        try:
            await asyncio.sleep(self._faults().latency.sample(self._rng))
            # the only secret of an /images URL: from the system's CSPRNG, not the seeded rng
            image_uuid = str(uuid.uuid4())
            if self._faults().fast:
                result = self._fast_result(task, image_uuid, seed)
            else:
                ref = await reference if reference is not None else None
                job = RenderJob(
                    task.positivePrompt,
                    seed,
                    task.width,
                    task.height,
                    task.outputFormat,
                    task.outputQuality,
                    ref,
                )
                result = self._result(task, image_uuid, seed, await self.pool.render(job))
        except ReferenceUnavailable as exc:
            self._generation_failed(entry, generation, "invalidReferenceImages", str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a render that failed must fail its task, never hang it
            log.exception("render failed")
            self._generation_failed(entry, generation, "providerError", f"Render failed: {exc}")
            return
        self.stats.images += 1
        generation.status, generation.result = "success", result
        if self.tasks.holds(entry) and task.deliveryMethod == "sync":
            entry.session.deliver(encode_data([result]))

    def _generation_failed(
        self, entry: ProviderTask, generation: Generation, code: str, message: str
    ) -> None:
        error = error_item(
            code, message=message, task_type="imageInference", task_uuid=entry.task.taskUUID
        )
        generation.status, generation.error = "error", error
        if self.tasks.holds(entry) and entry.task.deliveryMethod == "sync":
            entry.session.deliver(encode_errors([error]))

    def _result(self, task: ImageTask, image_uuid: str, seed: int, data: bytes) -> ImageResult:
        content_type = CONTENT_TYPES[task.outputFormat]
        extension = EXTENSIONS[task.outputFormat]
        url = b64 = data_uri = None
        # every image is kept on the host, whatever the output type: a later task may name it
        # by imageUUID as its reference image
        ttl = float(task.ttl) if isinstance(task.ttl, int) else None
        self.images.put(image_uuid, data, content_type, extension, ttl)
        if task.outputType == "URL":
            url = f"{self._public_url()}/images/{image_uuid}.{extension}"
        else:
            encoded = base64.b64encode(data).decode()
            if task.outputType == "base64Data":
                b64 = encoded
            else:
                data_uri = f"data:{content_type};base64,{encoded}"
        return self._item(task, image_uuid, seed, url, b64, data_uri)

    def _fast_result(self, task: ImageTask, image_uuid: str, seed: int) -> ImageResult:
        url = f"{self._public_url()}/images/fast/{image_uuid}.jpg"
        return self._item(task, image_uuid, seed, url, None, None)

    def _item(
        self,
        task: ImageTask,
        image_uuid: str,
        seed: int,
        url: str | None,
        b64: str | None,
        data_uri: str | None,
    ) -> ImageResult:
        cost = None
        if task.includeCost:
            model = self.catalogue.get(task.model)
            assert model is not None  # validated
            cost = model.price(task.width, task.height, 1) if self.priced else 0.0
        return ImageResult(
            taskType="imageInference",
            taskUUID=task.taskUUID,
            imageUUID=image_uuid,
            imageURL=url,
            imageBase64Data=b64,
            imageDataURI=data_uri,
            seed=seed,
            NSFWContent=False if task.safety_checked else None,
            cost=cost,
        )

    def get_response(self, session: Session, request: GetResponse) -> None:
        entry = self.tasks.get(session.key, request.taskUUID)
        if entry is None:
            session.deliver(
                encode_errors(
                    [
                        error_item(
                            "taskNotFound",
                            parameter="taskUUID",
                            task_type="getResponse",
                            task_uuid=request.taskUUID,
                        )
                    ]
                )
            )
            return
        data: list[Any] = []
        failures: list[ErrorItem] = []  # a failure of the whole task is reported once
        for generation in entry.generations:
            if generation.status == "processing":
                data.append(ProcessingItem(taskType="imageInference", taskUUID=request.taskUUID))
            elif generation.result is not None:
                data.append(msgspec.structs.replace(generation.result, status="success"))
            elif generation.error is not None and generation.error not in failures:
                failures.append(generation.error)
        errors = [msgspec.structs.replace(error, status="error") for error in failures]
        for frame in encode_answer(data, errors):
            session.deliver(frame)
