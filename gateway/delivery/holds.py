"""The durable delivery jobs one replica holds (gateway/delivery/jobs.py has the backends).

Bounds: at most ``max_jobs`` jobs held at once (running, or final and waiting for Redis to take
the ack). A job created here past that bound is left in Redis, unheld, for the claimers (this
replica's included once it has room, a lease later). A claim takes at most ``claim_batch`` jobs
and never more than the room left.
"""

from __future__ import annotations

import contextlib

import structlog

from gateway.delivery.jobs import DeliveryJob, DeliveryJobs, Hold
from gateway.store.shared import StoreUnavailable

__all__ = ["Holds"]

log = structlog.get_logger("tenebra.delivery")


class Holds:
    def __init__(
        self, jobs: DeliveryJobs, *, replica: str, lease: float, max_jobs: int, claim_batch: int
    ) -> None:
        self.jobs = jobs
        self.replica = replica
        self.lease = lease
        self.max_jobs = max_jobs
        self.claim_batch = claim_batch
        self.entries: dict[str, str] = {}  # delivery id -> entry, of the jobs running here
        # delivery id -> (entry, job): final, but Redis did not take the ack; still held, so
        # that nobody runs them again
        self.unacked: dict[str, tuple[str, DeliveryJob]] = {}

    @property
    def room(self) -> int:
        return self.max_jobs - len(self.entries) - len(self.unacked)

    def held(self, delivery_id: str) -> bool:
        return delivery_id in self.entries or delivery_id in self.unacked

    async def add(self, job: DeliveryJob) -> str | None:
        """The new job's entry, held; None when it is not to run here. Raises StoreUnavailable."""
        entry = await self.jobs.add(job, self.replica)
        if entry is None:
            log.info("delivery already a job: left to its holder")
            return None
        if self.room <= 0:
            log.info("delivery left in redis for the claimers", max_jobs=self.max_jobs)
            return None
        self.entries[job.id] = entry
        return entry

    def release(self, delivery_id: str) -> None:
        self.entries.pop(delivery_id, None)

    async def progress(self, entry: str, job: DeliveryJob) -> bool:
        """False when another replica has the job now."""
        # Redis down: run on; the keeper refreshes the hold once it answers
        with contextlib.suppress(StoreUnavailable):
            return await self.jobs.progress(entry, job, self.replica)
        return True

    async def finish(self, entry: str, job: DeliveryJob) -> None:
        self.entries.pop(job.id, None)
        try:
            await self.jobs.finish(entry, job)
        except StoreUnavailable:
            self.unacked[job.id] = (entry, job)

    async def keep(self, claiming: bool) -> tuple[list[str], list[tuple[str, DeliveryJob]]]:
        """Ack what Redis missed, refresh what is held, claim what dead replicas left (when
        ``claiming``): the delivery ids another replica took, and the jobs claimed (held).
        Raises StoreUnavailable."""
        for delivery_id, (entry, job) in list(self.unacked.items()):
            await self.jobs.finish(entry, job)
            del self.unacked[delivery_id]
        held = [*self.entries.items(), *((i, e) for i, (e, _) in self.unacked.items())]
        holds = await self.jobs.refresh([entry for _, entry in held], self.replica)
        taken = []
        for (delivery_id, _), hold in zip(held, holds, strict=True):
            if hold is not Hold.OURS:
                self.entries.pop(delivery_id, None)
                self.unacked.pop(delivery_id, None)
            if hold is Hold.TAKEN:
                taken.append(delivery_id)
            elif hold is Hold.FORGOTTEN:
                log.warning("delivery forgotten by redis: runs on in memory", delivery=delivery_id)
        if not claiming or self.room <= 0:
            return taken, []
        claimed = []
        for entry, job in await self.jobs.claim(
            self.replica, self.lease, min(self.room, self.claim_batch)
        ):
            if not self.held(job.id):  # else ours already: a refresh that Redis missed
                self.entries[job.id] = entry
                claimed.append((entry, job))
        return taken, claimed
