"""A dead replica's tasks, finished by a live one (``store.url``; run by gateway.cluster).

When a replica's lease lapses (SIGKILL, a lost machine), one live replica takes over what it
ran, from what it wrote to the shared store (gateway.replication):

- its open task records (``{prefix}:open:{replica}``) become this replica's: registered here,
  written under this replica's name, and their frames go to their client's session wherever
  it is now (gateway.roaming) and to their webhooks and uploads;
- tasks it had sent to the provider are carried by a link that resumes the dead replica's
  provider session (``{prefix}:links:{replica}``, recorded as each link authenticated): the
  provider holds them, and recovery (gateway.recovery) polls them as after any reconnect.
  Results already in a record are not relayed twice (the registry drops an imageUUID it has).
  If the provider no longer has that session, the tasks are polled as orphans, and one it
  lost fails (or is sent again once, with ``provider.on_lost = "resubmit"``): never two bills
  by a guess;
- tasks it had not sent yet are queued here as new.

The dead replica's open list is first moved into the taker's own (one script): whoever moves
it runs those tasks, so a takeover done again after one that failed half way (Redis away a
moment, its lock lapsed: gateway.cluster) finds nothing to run twice, and a taker that dies
leaves them in its own list, for its own takeover. Every other step can be done again.
"""

from __future__ import annotations

from collections import defaultdict

import structlog

from gateway.delivery.deliveries import Deliveries
from gateway.pool import UpstreamPool
from gateway.replication import Replication, links_key
from gateway.roaming import Roaming
from gateway.store.base import TaskRecord, TaskState
from gateway.store.connection import RedisConnection
from gateway.store.shared import StoreUnavailable
from gateway.tasks import AT_PROVIDER, TaskRegistry

__all__ = ["Takeover"]

log = structlog.get_logger("tenebra.takeover")


class Takeover:
    def __init__(
        self,
        redis: RedisConnection,
        replication: Replication,
        registry: TaskRegistry,
        pool: UpstreamPool,
        roaming: Roaming | None,
        deliveries: Deliveries,
    ) -> None:
        self.redis = redis
        self.replication = replication
        self.registry = registry
        self.pool = pool
        self.roaming = roaming
        self.deliveries = deliveries

    async def __call__(self, dead: str) -> None:
        shared, me = self.replication.shared, self.replication.replica
        try:
            records = await shared.take_open(dead, me)
        except StoreUnavailable:
            # the move may have run, its answer lost: what it moved is in this replica's own
            # list now, which only this replica reads while it lives (those it has already
            # are passed by)
            records = await shared.open_records(me)
        client, key = self.redis.client, links_key(self.redis, dead)
        sessions = await self.redis.call(lambda: client.hgetall(key))
        by_link = {
            int(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in sessions.items()
        }
        # A record's sends are not written (gateway.tasks): one that says it waits may have
        # gone out since. So every open task is asked about on one of the dead replica's
        # provider sessions (the provider finds a task by the API key's taskUUID, whichever
        # session asks): resumed, the provider says taskNotFound for one it never received,
        # and it is sent then (gateway.recovery). Without any provider session known, each
        # is sent again (below).
        first = min(by_link) if by_link else None
        sent: defaultdict[int | None, list[TaskRecord]] = defaultdict(list)
        waiting: list[TaskRecord] = []
        for record in records:
            if not self._adopt(record):
                continue
            link = record.link if record.link in by_link else first
            if link is None:
                waiting.append(record)
                continue
            if record.state not in AT_PROVIDER:
                self.registry.move(record, TaskState.SUBMITTED)
                record.sends = max(record.sends, 1)
            sent[link].append(record)
        for link, carried in sent.items():
            self.pool.adopt(by_link.get(link) if link is not None else None, carried)
        for record in waiting:
            # no provider session known (none was up, or Redis lost them before a renewal
            # recorded them again): it may have gone out all the same. Counted as sent once, a
            # conflictTaskUUID to its send says the provider has it (its upstream UUID is the
            # gateway's own), and it is polled (gateway.recovery), not failed with the conflict
            record.sends = max(record.sends, 1)
            if record.state is TaskState.RECEIVED:
                self.pool.submit(record)
            else:  # queued at the dead replica: first in its tenant's line here
                self.pool.requeue(record)
        await self.replication.drain(self.redis.deadline * 2)
        await self.redis.call(lambda: client.delete(key))
        log.warning(
            "took over a dead replica's tasks",
            replica=dead,
            at_provider=sum(map(len, sent.values())),
            waiting=len(waiting),
            provider_sessions=len(sent),
        )

    def _adopt(self, record: TaskRecord) -> bool:
        """Register a dead replica's record here with whoever waits for its frames; False if
        this replica has it already (a takeover done again)."""
        if self.registry.store.get(record.tenant, record.task.taskUUID) is not None:
            return False
        subscribers = []
        if record.session is not None and self.roaming is not None:
            subscribers.append(self.roaming.subscriber(record.session))
        task = record.task
        if isinstance(task.webhookURL, str) or isinstance(task.uploadEndpoint, str):
            subscribers.append(self.deliveries)
        return self.registry.adopt(record, subscribers)
