"""The console's one producer: what the gateway is doing, once a second, for every viewer.

The task path pays one hook per finished task (:meth:`Console.task_ended`, on the registry's
``on_final``): the record appended to a list. The list is read in batches of at most
``ABSORB`` records (and before every tick and every read of the figures): the last tasks of each
batch become summaries in two fixed-size rings, and a bounded sample of their latencies is kept
(at about 40,000 tasks/s the per-task summary and sample cost 6% of the gateway's CPU).
Everything else is read once a second by :meth:`Console.tick` from figures the gateway
keeps anyway (the pool's queue, the links, the quotas' connection counts, the budget ledger,
the error counter), encoded once per scope (the admin's view, or one tenant's), and offered to
each viewer's :class:`~gateway.console.bounded.Mailbox`. A viewer whose mailbox is full is
dropped: nothing on the task path or in the producer ever waits for a viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from itertools import count
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gateway.console.bounded import LatencySample, Mailbox, Series
from gateway.store.base import TaskRecord

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["ADMIN", "Console", "Viewer"]

log = structlog.get_logger("tenebra.console")

ADMIN = "*"  # the scope of an admin viewer: every tenant; any other scope is a tenant's name

TASKS_KEPT = 50  # the last tasks shown, overall and per tenant
POINTS = 900  # one a second: the plots' 15 minutes
SAMPLE = 512  # latencies kept per second (and per tenant) for the percentiles
MAILBOX = 8  # frames a viewer may be behind (8 s) before it is dropped
MAX_TENANTS = 256  # tenants with their own rings and series; others count in the totals only
MAX_TENANT_ROWS = 100  # rows of the tenants table sent, the busiest first
ABSORB = 1024  # finished records held at most before they are summarised (about 25 ms of them)

_encode = msgspec.json.Encoder().encode


class _Ended:
    """A finished task as the console shows it: a summary, not the record, so that the rings
    never keep a task's images (base64 data may be megabytes) alive past their retention.
    Its deliveries are the record's, read at each tick while the registry keeps it (``view``'s
    ``lookup``): webhooks and uploads go on after the end, and a task's last ones may even begin
    after it (on a shared store, once its final write is done); then, as they were last seen."""

    __slots__ = (
        "cost",
        "deliveries",
        "ended",
        "error",
        "images",
        "latency",
        "requested",
        "state",
        "task_uuid",
        "tenant",
    )

    def __init__(self, record: TaskRecord) -> None:
        """``ended`` on the registry's clock: made wall time once per frame, not per task."""
        ended = record.finished
        if ended is None:  # never: on_final runs once the record is finished
            ended = record.created
        latency = ended - record.created
        self.task_uuid = record.task_uuid
        self.tenant = record.tenant
        self.state = str(record.state)
        self.latency = latency
        self.ended = ended
        self.images = len(record.results)
        self.requested = record.task.numberResults
        # the record's own total where this version keeps one (the usage ledger's, issue 15),
        # else what its results say
        cost = getattr(record, "cost", None)
        if not isinstance(cost, float):
            cost = 0.0
            for result in record.results:
                if result.cost:
                    cost += result.cost
        self.cost = cost
        self.error = record.error.code if record.error is not None else None
        self.deliveries = record.deliveries

    def view(
        self, to_wall: float, lookup: Callable[[str, str], TaskRecord | None]
    ) -> dict[str, Any]:
        record = lookup(self.tenant, self.task_uuid)
        if record is not None:
            self.deliveries = record.deliveries
        return {
            "taskUUID": self.task_uuid,
            "tenant": self.tenant,
            "state": self.state,
            "latency": round(self.latency, 3),
            "ended": round(self.ended + to_wall, 3),
            "images": self.images,
            "requested": self.requested,
            "cost": round(self.cost, 6),
            "error": self.error,
            "deliveries": [
                {"kind": d.kind, "state": d.state, "attempts": d.attempts, "status": d.last_status}
                for d in self.deliveries[:20]  # at most numberResults uploads and one webhook
            ],
        }


class _Watch:
    """One scope's figures: the whole gateway's, or one tenant's."""

    __slots__ = ("errors", "rate", "recent", "sample", "series")

    def __init__(self, tasks_kept: int, points: int, sample: int) -> None:
        self.sample = LatencySample(sample)
        self.series = Series(points)
        self.recent: deque[_Ended] = deque(maxlen=tasks_kept)
        self.errors: Counter[str] = Counter()  # final errors by code (a finite set of codes)
        self.rate = 0.0  # tasks/s ended in the last second


class Viewer:
    """One console page: its scope and its mailbox. ``on_drop`` is the socket's to set."""

    def __init__(self, ident: int, scope: str, mailbox: int) -> None:
        self.ident = ident
        self.scope = scope
        self.mailbox = Mailbox(mailbox)
        self.dropped = False
        self.on_drop: Callable[[], None] | None = None


class Console:
    def __init__(
        self,
        gateway: Gateway,
        *,
        max_viewers: int = 64,
        tasks_kept: int = TASKS_KEPT,
        points: int = POINTS,
        sample: int = SAMPLE,
        mailbox: int = MAILBOX,
        max_tenants: int = MAX_TENANTS,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway = gateway
        self.max_viewers = max_viewers
        self.interval = interval
        self._clock = clock
        self._wall = wall_clock
        self._shape = (tasks_kept, points, sample)
        self._mailbox = mailbox
        self.max_tenants = max_tenants
        self._all = _Watch(*self._shape)
        self._tenants: dict[str, _Watch] = {}
        self._ended: list[TaskRecord] = []  # finished, not yet summarised (ABSORB at most)
        self.viewers: dict[str, set[Viewer]] = {}  # by scope
        self._count = 0
        self._ids = count(1)
        self._sessions: dict[int, tuple[str, float]] = {}  # link -> (provider session, seen at)
        self._last_tick = clock()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # viewers dropped for not keeping up, since start
        # today's figures by tenant from the usage ledger, where the gateway has one: read by
        # the producer before a tick (it may ask Redis), never on the task path
        self.usage_today: Callable[[], Awaitable[dict[str, dict[str, float]]]] | None = None
        self._today: dict[str, dict[str, float]] = {}
        gateway.registry.on_final.append(self.task_ended)

    # ------------------------------------------------------------------ the task path

    def task_ended(self, record: TaskRecord) -> None:
        """``registry.on_final``: the only work the console adds per task."""
        ended = self._ended
        ended.append(record)
        if len(ended) >= ABSORB:
            self._absorb()

    @property
    def all(self) -> _Watch:
        """The whole gateway's figures, up to date."""
        self._absorb()
        return self._all

    @property
    def tenants(self) -> dict[str, _Watch]:
        """Each tenant's figures (at most ``max_tenants``), up to date."""
        self._absorb()
        return self._tenants

    def _absorb(self) -> None:
        """The records finished since the last call into the watches: every one counted, the
        last ``tasks_kept`` of each scope summarised, a sample of the latencies kept."""
        batch = self._ended
        if not batch:
            return
        self._ended = []
        kept = self._shape[0]
        total = self._all
        total.sample.extend(batch, _latency)
        total.recent.extend(_Ended(record) for record in batch[-kept:])
        tenants = self._tenants
        first = batch[0].tenant
        groups: dict[str, list[TaskRecord]]
        if all(record.tenant == first for record in batch):
            groups = {first: batch}
        else:
            groups = {}
            for record in batch:
                group = groups.get(record.tenant)
                if group is None:
                    group = groups[record.tenant] = []
                group.append(record)
        for tenant, group in groups.items():
            watch = tenants.get(tenant)
            if watch is None:
                watch = self._watch(tenant)
                if watch is None:
                    continue
            watch.sample.extend(group, _latency)
            watch.recent.extend(_Ended(record) for record in group[-kept:])
            errors = watch.errors
            for record in group:
                if record.error is not None:
                    errors[record.error.code] += 1

    def _watch(self, tenant: str) -> _Watch | None:
        if len(self._tenants) >= self.max_tenants:
            return None
        watch = self._tenants[tenant] = _Watch(*self._shape)
        return watch

    # ------------------------------------------------------------------ viewers

    @property
    def viewer_count(self) -> int:
        return self._count

    def join(self, scope: str) -> Viewer | None:
        """A viewer of ``scope``, its mailbox holding the history and the present; None past
        ``max_viewers``."""
        if self._count >= self.max_viewers:
            return None
        viewer = Viewer(next(self._ids), scope, self._mailbox)
        self.viewers.setdefault(scope, set()).add(viewer)
        self._count += 1
        watch = self.all if scope == ADMIN else self.tenants.get(scope)
        points = watch.series.points() if watch is not None else []
        history = {"type": "history", "interval": self.interval, "points": points}
        viewer.mailbox.offer(_encode(history))
        viewer.mailbox.offer(_encode(self.snapshot(scope)))
        return viewer

    def leave(self, viewer: Viewer) -> None:
        viewers = self.viewers.get(viewer.scope)
        if viewers is not None and viewer in viewers:
            viewers.discard(viewer)
            self._count -= 1
            if not viewers:
                del self.viewers[viewer.scope]
        viewer.mailbox.close()

    def _drop(self, viewer: Viewer) -> None:
        """A viewer ``mailbox`` frames behind: out, its socket closed by its own handler."""
        self.dropped += 1
        viewer.dropped = True
        self.leave(viewer)
        log.info("console viewer dropped: not keeping up", viewer=viewer.ident)
        if viewer.on_drop is not None:
            viewer.on_drop()

    def close_all(self) -> None:
        for viewers in list(self.viewers.values()):
            for viewer in list(viewers):
                self.leave(viewer)

    # ------------------------------------------------------------------ the producer

    def start(self) -> None:
        if self._task is None:
            self._last_tick = self._clock()
            self._task = asyncio.create_task(self._run(), name="console-producer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.close_all()

    async def _run(self) -> None:
        while True:
            # on the interval's boundaries, so the points are evenly spaced whatever a tick took
            now = self._clock()
            await asyncio.sleep(self.interval - (now % self.interval))
            if self.viewers and self.usage_today is not None:
                await self._read_usage()
            try:
                self.tick()
            except Exception:  # the console must never take the gateway down with it
                log.exception("console tick failed")

    async def _read_usage(self) -> None:
        """Today's usage, within half a tick; the last figures stay when it cannot be read."""
        assert self.usage_today is not None
        try:
            async with asyncio.timeout(self.interval / 2):
                self._today = await self.usage_today()
        except Exception as exc:  # Redis away, a slow read: the console shows the last figures
            log.debug("console: usage not read", error=repr(exc))

    def tick(self) -> None:
        """Close the second: one point per watch; then one frame per scope watched, offered
        to each of its viewers."""
        now = self._clock()
        elapsed = max(now - self._last_tick, 1e-3)
        self._last_tick = now
        wall = self._wall()
        for watch in (self.all, *self.tenants.values()):
            seen, p50, p99 = watch.sample.take()
            watch.rate = seen / elapsed
            watch.series.push(wall, watch.rate, p50, p99)
        self._observe_links(wall)
        if not self.viewers:
            return
        for scope, viewers in list(self.viewers.items()):
            frame = _encode(self.snapshot(scope))
            for viewer in list(viewers):
                if not viewer.mailbox.offer(frame):
                    self._drop(viewer)

    def _observe_links(self, wall: float) -> None:
        """When each link's provider session began, as first seen by a tick (the link keeps
        no such time; a session resumed after a reconnect is the same session)."""
        pool = self.gateway.pool
        if pool is None:
            return
        for link in (*pool.links, *pool.adopted.values()):
            session = link.session_uuid
            if session is None:
                self._sessions.pop(link.index, None)
            elif self._sessions.get(link.index, ("", 0.0))[0] != session:
                self._sessions[link.index] = (session, wall)

    # ------------------------------------------------------------------ what is shown

    def snapshot(self, scope: str) -> dict[str, Any]:
        """What a viewer of ``scope`` sees now. An admin sees everything; a tenant sees its
        own row, tasks, errors and plot, and the links' states (is the provider up)."""
        admin = scope == ADMIN
        watch = self.all if admin else self.tenants.get(scope)
        point = watch.series.last() if watch is not None else None
        to_wall = self._wall() - self._clock()  # the registry's clock to wall time
        lookup = self.gateway.registry.lookup
        frame: dict[str, Any] = {
            "type": "tick",
            "t": self._wall(),
            "scope": "admin" if admin else scope,
            "point": point,
            "links": self._links(full=admin),
            "tenants": self._tenant_rows(None if admin else [scope]),
            "tasks": [ended.view(to_wall, lookup) for ended in reversed(watch.recent)]
            if watch
            else [],
            "errors": self._errors() if admin else dict(watch.errors) if watch else {},
            "viewers": self._count if admin else None,
            "dropped": self.dropped if admin else None,
        }
        return frame

    def _links(self, *, full: bool) -> list[dict[str, Any]]:
        pool = self.gateway.pool
        if pool is None:
            return []
        if not full:
            return [{"index": link.index, "state": str(link.state)} for link in pool.links]
        reconnects = _labelled(self.gateway.metrics.upstream_reconnects, "link")
        wall = self._wall()
        rows = []
        for link in (*pool.links, *pool.adopted.values()):
            session = self._sessions.get(link.index)
            rows.append(
                {
                    "index": link.index,
                    "state": str(link.state),
                    "adopted": link.index in pool.adopted,
                    "session_age": round(wall - session[1]) if session else None,
                    "in_flight": len(link.recovery.in_flight),
                    "outbox": len(link.outbox),
                    "window": round(link.window.size, 1),
                    "ceiling": link.window.ceiling,
                    "reconnects": int(reconnects.get(str(link.index), 0)),
                }
            )
        return rows

    def _tenant_rows(self, only: list[str] | None) -> list[dict[str, Any]]:
        gateway, pool, intake = self.gateway, self.gateway.pool, self.gateway.intake
        policies = gateway.tenants.policies
        if only is not None:
            names: Iterable[str] = only
        else:
            found = set(policies) | set(self.tenants)
            if pool is not None:
                found.update(pool.queue.tenants())
            names = found
        usage = self._usage(names)
        rows: list[dict[str, Any]] = []
        for name in names:
            policy = policies.get(name)
            watch = self.tenants.get(name)
            used = usage.get(name, {})
            rows.append(
                {
                    "tenant": name,
                    "connections": intake.quotas.connections(name) if intake else 0,
                    "queued": pool.queue.waiting(name) if pool else 0,
                    "in_flight": pool.queue.in_flight(name) if pool else 0,
                    "rate": round(watch.rate, 2) if watch else 0.0,
                    "spend_today": round(used.get("spend", 0.0), 6),
                    "images_today": used.get("images"),
                    "budget": policy.budget_per_day if policy else None,
                }
            )
        rows.sort(key=lambda r: (-(r["in_flight"] + r["queued"]), -r["rate"], r["tenant"]))
        return rows[:MAX_TENANT_ROWS]

    def _usage(self, names: Iterable[str]) -> dict[str, dict[str, float]]:
        """Today's spend (and images, where the usage ledger counts them) by tenant."""
        if self.usage_today is not None:
            return self._today
        spend = self.gateway.budgets.spend_by_tenant()
        return {name: {"spend": total} for name, total in spend.items()}

    def _errors(self) -> dict[str, int]:
        """Every error item sent since start, by code (the /metrics counter, read here)."""
        return {code: int(n) for code, n in _labelled(self.gateway.metrics.errors, "code").items()}


def _latency(record: TaskRecord) -> float:
    finished = record.finished
    return (finished if finished is not None else record.created) - record.created


def _labelled(counter: Any, label: str) -> dict[str, float]:
    """A prometheus-client counter's totals by one label, through its public collect()."""
    totals: dict[str, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and label in sample.labels:
                value = sample.value
                if not math.isnan(value):
                    totals[sample.labels[label]] = value
    return totals
