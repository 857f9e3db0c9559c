"""The provider links together, and the gateway's own flow control in front of them.

Every task waits in one :class:`gateway.admission.FairQueue` (bounded in total by
``provider.max_queued`` and per tenant by its ``max_queued``) and goes out when a ready link
has room in its adaptive window, to the link with the most room. A task the provider refuses
before accepting it (``rateLimitExceeded`` and the like: unbilled) shrinks that link's window
and goes back to the front of its tenant's line after a jittered backoff: a burst is queued,
not failed. A task waits at most ``provider.outage_deadline`` while no link is ready
(``serviceUnavailable``), and at most ``tasks.timeout`` in all (``timeoutProvider``, by the
registry's expiry).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator

import aiohttp
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.admission import FairQueue, QueueFull, TenantLimits
from gateway.backoff import full_jitter
from gateway.config import ProviderSettings
from gateway.metrics import Metrics
from gateway.store.base import TaskRecord
from gateway.store.states import TaskState
from gateway.tasks import TaskRegistry
from gateway.upstream import LinkState, UpstreamLink
from protocol.errors import error_item
from protocol.frames import ErrorItem

__all__ = ["UpstreamPool"]

log = structlog.get_logger("tenebra.pool")

KEY_REFUSED = (
    "The provider refuses the gateway's API key; the gateway keeps retrying. Retry with backoff."
)


class UpstreamPool:
    def __init__(
        self,
        url: str,
        api_key: str,
        settings: ProviderSettings,
        registry: TaskRegistry,
        metrics: Metrics,
        *,
        limits: Callable[[str], TenantLimits] = lambda _: TenantLimits(),
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._url = url
        self._api_key = api_key
        self.queue: FairQueue[TaskRecord] = FairQueue(settings.max_queued, limits)
        self._out: set[str] = set()  # upstream UUIDs taken from the queue and not back or final
        self._retries: dict[str, Iterator[float]] = {}  # backoff of tasks the provider refused
        self._pump_due = False  # a _pump is scheduled for the end of this loop turn
        self._down_since: float | None = registry.now()  # no link ready since
        self.links: list[UpstreamLink] = []
        # links that carry a dead replica's provider sessions until their tasks settle: by
        # index, numbered after the pool's own; never given new tasks
        self.adopted: dict[int, UpstreamLink] = {}
        self._adoptions = itertools.count(settings.links)
        # a link authenticated: (its index, its provider session), for a takeover to resume
        self.on_session: Callable[[int, str], None] | None = None
        self._refused_key = False
        self._http: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.admitted: Counter[str] = Counter()  # by tenant: plain numbers, read at scrape
        self.refused_by_limit: Counter[tuple[str, str]] = Counter()  # (tenant, limit)
        # a queue bound refused a task: (its record, the limit, the code answered); the audit's
        self.on_limit: Callable[[TaskRecord, str, str], None] | None = None
        registry.on_final.append(self._settled)
        metrics.registry.register(_AdmissionFigures(self))

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        for index in range(self.settings.links):
            link = self._link(index)
            self.links.append(link)
            link.start()
        self._watch = asyncio.create_task(self._watch_waiting())

    def _link(self, index: int) -> UpstreamLink:
        assert self._http is not None
        return UpstreamLink(
            index,
            self._url,
            self._api_key,
            self.settings,
            self.registry,
            self.metrics,
            self._http,
            rng=self._rng,
            on_state=self._link_changed,
            on_unsent=self._unsent,
            on_refused=self._refused,
        )

    def adopt(self, session_uuid: str | None, records: list[TaskRecord]) -> None:
        """Carry tasks a dead replica sent on its provider session ``session_uuid`` (None if
        unknown): a link of their own resumes that session and recovers them as after any
        reconnect (gateway.recovery); it closes once they settle."""
        link = self._link(next(self._adoptions))
        link.session_uuid = session_uuid
        for record in records:
            record.link = link.index
            link.recovery.sent(record.upstream_uuid)
        self.adopted[link.index] = link
        link.start()

    def sessions(self) -> dict[int, str]:
        """Each link's provider session, its last (its own and those carrying a dead replica's
        tasks): what a replica taking this one over resumes."""
        return {
            link.index: link.session_uuid
            for link in [*self.links, *self.adopted.values()]
            if link.session_uuid
        }

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for link in [*self.links, *self.adopted.values()]:
            await link.close()
        if self._http is not None:
            await self._http.close()

    @property
    def ready(self) -> bool:
        return any(link.state == LinkState.READY for link in self.links)

    @property
    def refused(self) -> bool:
        """Every link is refused the gateway's key (kept up to date by ``_link_changed``: it is
        read for every task)."""
        return self._refused_key

    async def wait_ready(self) -> None:
        """Until some link is ready; bound it with asyncio.timeout."""
        while not self.ready:
            waits = [asyncio.ensure_future(link.ready.wait()) for link in self.links]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    # ------------------------------------------------------------------ admission

    def submit(self, record: TaskRecord) -> None:
        """Queue a new task and send what the links have room for. A task that cannot wait
        fails at once with the reason."""
        if self.refused:
            self._fail(record, "serviceUnavailable", KEY_REFUSED)
            return
        try:
            self.queue.push(record.tenant, record)
        except QueueFull as full:
            limit = "tenant_max_queued" if full.tenant_limit else "provider_max_queued"
            self.refused_by_limit[record.tenant, limit] += 1
            code = "rateLimitExceeded" if full.tenant_limit or self.ready else "serviceUnavailable"
            if self.on_limit is not None:
                self.on_limit(record, limit, code)
            self._fail(record, code, f"The task cannot wait: {full}. Retry with backoff.")
            return
        self.registry.move(record, TaskState.QUEUED)
        self._pump()

    def _pump(self) -> None:
        """Hand waiting tasks to the links with room, the roomiest first, fairly by tenant."""
        queue, links = self.queue, self.links
        while len(queue):
            best, room = None, 0
            for link in links:  # the room in each ready link's window; runs for every task
                if link.state is not LinkState.READY:
                    continue
                free = link.window.limit - len(link.recovery.in_flight) - len(link.outbox)
                if free > room:
                    best, room = link, free
            if best is None:
                return
            taken = queue.pop()
            if taken is None:
                return  # every tenant with tasks waiting is at its own max_in_flight
            tenant, record = taken
            if record.finished is not None:
                queue.finished(tenant)
                continue
            self._out.add(record.upstream_uuid)
            self.admitted[tenant] += 1
            best.enqueue(record)

    def _back(self, record: TaskRecord) -> None:
        """A task taken from the queue is no longer out: its tenant may send another."""
        out = self._out
        upstream_uuid = record.upstream_uuid
        if upstream_uuid in out:
            out.discard(upstream_uuid)
            self.queue.finished(record.tenant)

    def _unsent(self, record: TaskRecord) -> None:
        """A link went down with the task still in its outbox: first in line again."""
        self._back(record)
        self._retry(record)

    def _refused(self, link: UpstreamLink, record: TaskRecord, error: ErrorItem) -> None:
        """The provider refused the task before accepting it: unbilled. It waits a jittered
        while and goes back to the front of its tenant's line; the link's window has shrunk."""
        self._back(record)
        self.registry.move(record, TaskState.QUEUED)
        delays = self._retries.get(record.upstream_uuid)
        if delays is None:
            delays = self._retries[record.upstream_uuid] = full_jitter(
                self.settings.backoff_initial, self.settings.backoff_max, self._rng
            )
        log.debug("provider refused a task; it waits", code=error.code, window=link.window.limit)
        asyncio.get_running_loop().call_later(next(delays), self._retry, record)

    def limits_changed(self) -> None:
        """Tenants' limits were read again (a reload, the other replicas' figures): room a
        tenant got is used at once, not at its next task."""
        self.queue.reconfigure()
        self._pump()

    def requeue(self, record: TaskRecord) -> None:
        """A task that was waiting elsewhere (a dead replica's): first in its tenant's line."""
        self._retry(record)

    def _retry(self, record: TaskRecord) -> None:
        """Back to the front of its tenant's line, unless it ended or cannot go any more."""
        if record.finished is not None:
            return
        if self.refused:
            self._fail(record, "serviceUnavailable", KEY_REFUSED)
            return
        self.queue.push_front(record.tenant, record)
        self._pump()

    def _fail(self, record: TaskRecord, code: str, message: str) -> None:
        self.registry.fail(
            record,
            error_item(code, message=message, task_type="imageInference",
                       task_uuid=record.task.taskUUID),
        )  # fmt: skip

    def was_refused(self, record: TaskRecord) -> bool:
        """The provider refused the task at least once, and it waits or is out again since."""
        return record.upstream_uuid in self._retries

    def _settled(self, record: TaskRecord) -> None:
        self._back(record)
        if self._retries:  # most often none: the provider refused no task
            self._retries.pop(record.upstream_uuid, None)
        index = record.link
        if index is not None and index < len(self.links):
            link = self.links[index]
            link.settled(record)
            if record.state is TaskState.DONE:
                link.window.succeeded()
        elif index is not None and index in self.adopted:
            self._adopted_settled(self.adopted[index], record)
        if len(self.queue) and not self._pump_due:
            # the room the tasks finished in this loop turn freed, used once at its end (a
            # pump per finished task walked the links each time); a task submitted meanwhile
            # pumps at once, as always
            self._pump_due = True
            asyncio.get_running_loop().call_soon(self._pump_deferred)

    def _pump_deferred(self) -> None:
        self._pump_due = False
        self._pump()

    # ------------------------------------------------------------------ links and deadlines

    def _adopted_settled(self, link: UpstreamLink, record: TaskRecord) -> None:
        link.settled(record)
        if not link.recovery.in_flight and not link.outbox:
            del self.adopted[link.index]
            closing = asyncio.get_running_loop().create_task(link.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def _link_changed(self, link: UpstreamLink) -> None:
        if link.state is LinkState.READY and link.session_uuid and self.on_session is not None:
            self.on_session(link.index, link.session_uuid)
        if link.index in self.adopted:
            return  # it takes no new tasks: nothing else here is about it
        links = self.links
        self._refused_key = bool(links) and all(x.state == LinkState.REFUSED for x in links)
        if self.ready:
            self._down_since = None
            self._pump()
            return
        if self._down_since is None:
            self._down_since = self.registry.now()
        if self.refused:
            for record in self.queue.drain():
                self._fail(record, "serviceUnavailable", KEY_REFUSED)

    async def _watch_waiting(self) -> None:
        deadline = self.settings.outage_deadline
        while True:
            await asyncio.sleep(min(1.0, deadline / 4))
            self.expire_waiting()

    def expire_waiting(self) -> None:
        """Tasks wait for a link at most ``outage_deadline``: then a clear error, not a hang.
        Tasks that ended while they waited (their deadline) leave the queue here too."""
        deadline = self.settings.outage_deadline
        down_since = self._down_since
        horizon = self.registry.now() - deadline
        outage = down_since is not None and down_since <= horizon
        message = f"No provider link for {deadline:g} s. Retry with backoff."
        for record in self.queue.expire(
            lambda r: r.finished is not None or (outage and r.created <= horizon)
        ):
            if record.finished is None:
                self._fail(record, "serviceUnavailable", message)


class _AdmissionFigures(Collector):
    """Per tenant: waiting, in flight, admitted, refused by limit; per link: the window."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        pool, queue = self._pool, self._pool.queue
        waiting = GaugeMetricFamily(
            "tenebra_tenant_queued", "Tasks waiting at the gateway", labels=["tenant"]
        )
        out = GaugeMetricFamily(
            "tenebra_tenant_in_flight", "Tasks out at the provider", labels=["tenant"]
        )
        for tenant in queue.tenants():
            waiting.add_metric([tenant], queue.waiting(tenant))
            out.add_metric([tenant], queue.in_flight(tenant))
        yield waiting
        yield out
        admitted = CounterMetricFamily(
            "tenebra_tenant_admitted", "Tasks sent to the provider", labels=["tenant"]
        )
        for tenant, count in pool.admitted.items():
            admitted.add_metric([tenant], count)
        yield admitted
        refused = CounterMetricFamily(
            "tenebra_tenant_refused", "Tasks refused by a limit", labels=["tenant", "limit"]
        )
        for (tenant, limit), count in pool.refused_by_limit.items():
            refused.add_metric([tenant, limit], count)
        yield refused
        window = GaugeMetricFamily(
            "tenebra_provider_window", "The adaptive window: tasks a link may have out",
            labels=["link"],
        )  # fmt: skip
        for link in pool.links:
            window.add_metric([str(link.index)], link.window.size)
        yield window
