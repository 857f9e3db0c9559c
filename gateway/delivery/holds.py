"""The durable delivery jobs one replica holds (gateway/delivery/jobs.py has the backends).

Bounds: at most ``max_jobs`` jobs held at once (running, or final and waiting for Redis to take
the ack). A job created here past that bound is left in Redis, unheld, for the claimers (this
replica's included once it has room, a lease later). A claim takes at most ``claim_batch`` jobs
and never more than the room left.

A job Redis forgot (``Hold.FORGOTTEN``: restarted empty) leaves ``entries`` and runs on in its
task, in memory only, like a job created while Redis is unavailable: ``on_forgotten`` is told
once per job (Deliveries counts it in ``tenebra_delivery_not_durable_total``), and nothing of it
is written to Redis again.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from gateway.delivery.jobs import DeliveryJob, DeliveryJobs, Hold
from gateway.store.shared import StoreUnavailable

__all__ = ["Holds"]

log = structlog.get_logger("tenebra.delivery")


class Holds:
    def __init__(
        self,
        jobs: DeliveryJobs,
        *,
        replica: str,
        lease: float,
        max_jobs: int,
        claim_batch: int,
        ttl: float,
        on_forgotten: Callable[[str], None] | None = None,
    ) -> None:
        self.jobs = jobs
        self.replica = replica
        self.lease = lease
        self.max_jobs = max_jobs
        self.claim_batch = claim_batch
        self.ttl = ttl  # of a job's hash, from its creation and from each progress write
        # of a finished job's tombstone: a holder that lagged this long past the end of a job
        # another replica finished takes it for forgotten and runs it again (at least once)
        self.linger = 10 * lease
        self.on_forgotten = on_forgotten
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
        entry = await self.jobs.add(job, self.replica, self.ttl)
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
        if job.id not in self.entries:
            return True  # forgotten by Redis: in memory from now on (a taken one is cancelled)
        try:
            hold = await self.jobs.progress(entry, job, self.replica, self.ttl)
        except StoreUnavailable:
            return True  # run on; the keeper refreshes the hold once Redis answers
        if hold is Hold.FORGOTTEN:
            self._forget(job.id)
        return hold is not Hold.TAKEN

    async def finish(self, entry: str, job: DeliveryJob) -> None:
        if self.entries.pop(job.id, None) is None:
            return  # forgotten: nothing of it in Redis to ack
        try:
            await self.jobs.finish(entry, job, self.linger)
        except StoreUnavailable:
            self.unacked[job.id] = (entry, job)

    def _forget(self, delivery_id: str) -> None:
        self.entries.pop(delivery_id, None)
        log.warning("delivery forgotten by redis: runs on in memory", delivery=delivery_id)
        if self.on_forgotten is not None:
            self.on_forgotten(delivery_id)

    async def keep(self, claiming: bool) -> tuple[list[str], list[tuple[str, DeliveryJob]]]:
        """Ack what Redis missed, refresh what is held, claim what dead replicas left (when
        ``claiming``): the delivery ids another replica took, and the jobs claimed (held).
        Raises StoreUnavailable."""
        for delivery_id, (entry, job) in list(self.unacked.items()):
            await self.jobs.finish(entry, job, self.linger)
            del self.unacked[delivery_id]
        held = [*self.entries.items(), *((i, e) for i, (e, _) in self.unacked.items())]
        holds = await self.jobs.refresh(held, self.replica)
        taken = []
        for (delivery_id, entry), hold in zip(held, holds, strict=True):
            if hold is Hold.OURS:
                continue
            if self.unacked.pop(delivery_id, None) is not None:
                continue  # final already: nothing left to run or to ack
            if self.entries.get(delivery_id) != entry:
                continue  # ended, or ended and started again, while Redis answered
            if hold is Hold.TAKEN:
                del self.entries[delivery_id]
                taken.append(delivery_id)
            else:
                self._forget(delivery_id)
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
