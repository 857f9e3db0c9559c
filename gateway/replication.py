"""Tasks shared with the other replicas (``store.url``): claims before a frame is dispatched,
records written behind it.

The registry stays synchronous and in memory: it is each replica's cache of the tasks it runs,
and the hot path never waits for Redis there. What replicas share goes through here:

- **Claims, with the records.** Before a client frame is dispatched, its image tasks' records
  are made and their taskUUIDs claimed for the sender's tenant: of every replica, exactly one
  wins a (tenant, taskUUID), so ``conflictTaskUUID`` holds across replicas, and the claim won
  writes the record whole and lists it as this replica's, in the same round trip. The claims of
  every frame waiting in one loop turn go in one batch (a few hundred share a round trip under
  load). A task is so known to every replica before it is acked, with no write of its own. A
  task refused after its claim (a limit, a destination) gives the claim and its record back
  once the frame is dispatched. A frame's ``getResponse`` tasks about tasks other replicas run
  load their records (a round trip of their own). A Redis that does not answer: the frame's
  image tasks get ``serviceUnavailable`` (nothing is accepted that other replicas could not
  see), and ``/readyz`` says 503 until the lease gets through again.
- **Records, written behind.** A record is written again when a result comes and when it ends
  (not when it is queued or sent: a replica taking it over asks the provider about every open
  task). One flush at a time writes every dirty record in one round trip, as it is at that moment,
  over the claim that wrote it first (no read: the store's plain ``SET XX``). A task's frames to its
  subscribers (its client, its webhooks) leave once the write of what they tell is done
  (``after_write``): a replica that takes the task over knows every image its client was sent,
  and sends none twice. That costs each result one Redis round trip of latency; while Redis is
  away, frames leave after one failed try (the sockets that wait get their results; the store
  catches up later).
- **Bounds.** What waits to be written is bounded by ``max_pending`` records: open ones always
  stay (they are bounded by ``tasks.max_open``), finished ones past the bound are dropped
  oldest first and counted (``tenebra_store_writes_dropped_total``): while Redis is away that
  long, the other replicas' ``getResponse`` will not see them. Flushes that fail are retried
  with full-jitter backoff up to a second.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import structlog
from prometheus_client import Counter
from redis.typing import EncodableT, FieldT

from gateway.backoff import full_jitter
from gateway.store.base import TaskRecord
from gateway.store.connection import RedisConnection, key_part
from gateway.store.redis import RedisSharedTasks, Write
from gateway.store.shared import StoreUnavailable
from protocol.codec import Outcome
from protocol.frames import GetResponse, ImageTask

__all__ = ["FrameClaims", "Replication", "links_key"]

log = structlog.get_logger("tenebra.replication")


# how often a flush held while the lease is in doubt looks again (a renewal answers within
# twice the store's deadline)
IN_DOUBT_POLL = 0.01

# claims waiting to be given back at most (see Replication._give_back)
MAX_GIVING_BACK = 10_000

# claims per round trip at most (a frame's are never split): what piles up while Redis stalls
# goes in several, each within the deadline
CLAIM_BATCH = 2_000

# what a frame's claims hear of its batch: which of them were won, or why none was asked
ClaimAnswer = Callable[[list[bool] | StoreUnavailable], None]
# the record registered for a (tenant, taskUUID), if any (the registry's store)
Registered = Callable[[str, str], TaskRecord | None]
TokenTake = Callable[[dict[str, int]], Awaitable[dict[str, StoreUnavailable]]]


def links_key(redis: RedisConnection, replica: str) -> str:
    """A replica's provider sessions: link index -> connectionSessionUUID (gateway.takeover)."""
    return redis.key("links", key_part(replica))


class FrameClaims:
    """What one frame's tasks hold in the shared store, for its synchronous dispatch. (Not a
    dataclass: mypyc leaves a dataclass's generated ``__init__`` in Python, a call per frame.)"""

    __slots__ = ("loaded", "lost", "tenant", "unavailable", "unread", "won")

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        # taskUUID -> its record, claimed and written (gateway.tasks registers it as it is);
        # these three by the taskUUID as the frame spelled it: the store's claims, keyed in
        # lower case, decide which of two spellings wins
        self.won: dict[str, TaskRecord] = {}
        self.lost: set[str] = set()  # taskUUIDs another task holds already
        self.loaded: dict[str, TaskRecord] = {}  # getResponse: by taskUUID
        self.unavailable: str | None = None  # the store did not answer: why
        # its getResponse tasks' records were not read (the store did not answer): why
        self.unread: str | None = None


class Replication:
    def __init__(
        self,
        shared: RedisSharedTasks,
        replica: str,
        *,
        retention: float,
        max_pending: int,
        new_uuid: Callable[[], str],
        dropped: Counter,
    ) -> None:
        self.shared = shared
        self.replica = replica
        self.retention = retention
        self.max_pending = max_pending
        self._new_uuid = new_uuid
        self._dropped = dropped
        self.healthy = True  # the last call to the store got through
        self._dirty: dict[str, TaskRecord] = {}  # by upstream UUID, in order of first change
        # open records whose claims this replica won in the data set Redis holds (the claim
        # wrote them): their writes go over their claims, unread
        self._stored: set[str] = set()
        # the data set they are stored in (store/pipe.py's Incarnation): in another one, their
        # claims are gone or another task's, and each is written whole, which checks
        self._generation = 0
        self._after: list[Callable[[], None]] = []  # to run once the dirty records are written
        # the cluster's: whether this replica may have been taken over unknowingly (a stall
        # past its lease): its writes and frames wait meanwhile
        self.lease_in_doubt: Callable[[], bool] | None = None
        self._flushing: asyncio.Task[None] | None = None
        # frames waiting for their claims: their new records, who hears the answer, and their
        # tenant where the batch takes their rate tokens (None: the frame's own caller does)
        self._claims: list[tuple[list[TaskRecord], ClaimAnswer, str | None]] = []
        # the intake's: whether a tenant's rate is counted in Redis (its frames wait for their
        # tokens), and a batch's tokens, one take per tenant, every bucket set at once (the
        # tenants Redis did not answer for)
        self.rated: Callable[[str], bool] | None = None
        self.take_tokens: TokenTake | None = None
        # the frames of rated tenants whose claims are answered, waiting for their tokens
        self._rated_frames: list[tuple[str, list[TaskRecord], ClaimAnswer, list[bool]]] = []
        self._taking: asyncio.Task[None] | None = None
        self._staged: dict[str, int] = {}  # tenant -> its frames among them
        self._claiming: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._background: set[asyncio.Task[None]] = set()
        # claims to give back (_give_back): not before, tenant, taskUUID, upstream UUID
        self._giving: deque[tuple[float, str, str, str]] = deque()
        self._giver: asyncio.Task[None] | None = None
        self._in_hand = 0  # a claim being given back (out of _giving meanwhile)
        self._closed = False
        self.gave_up = 0  # claims dropped past MAX_GIVING_BACK, left to lapse

    # ------------------------------------------------------------------ claims

    async def claim(
        self,
        tenant: str,
        outcomes: Iterable[Outcome],
        is_local: Callable[[str], bool],
        *,
        session: str | None,
        created: float,
    ) -> FrameClaims:
        """Claim the frame's image tasks, each with its record (``session`` for a sync one), and
        load the records of its getResponse tasks that are not ``is_local`` (a round trip of
        their own: polls of other replicas' tasks are few). The claims of every frame waiting
        in one loop turn go in one batch, which writes the records of the claims won."""
        outcomes = list(outcomes)
        wanted = self._wanted(tenant, outcomes, session, created)
        polled = [
            o.taskUUID for o in outcomes if type(o) is GetResponse and not is_local(o.taskUUID)
        ]
        claims = FrameClaims(tenant)
        if wanted:
            future: asyncio.Future[list[bool] | StoreUnavailable] = (
                asyncio.get_running_loop().create_future()
            )

            def answered(won: list[bool] | StoreUnavailable) -> None:
                if not future.cancelled():
                    future.set_result(won)
                elif not isinstance(won, StoreUnavailable):  # its socket closed meanwhile
                    self.release_unused(self._sorted(tenant, wanted, won))

            self._enqueue(wanted, answered, None)
            claims = self._sorted(tenant, wanted, await future)
            if claims.unavailable is not None:
                return claims
        try:
            for task_uuid in polled:
                loaded = await self.shared.load(tenant, task_uuid)
                if loaded is not None:
                    claims.loaded[task_uuid] = loaded
        except StoreUnavailable as exc:
            self._unhealthy(exc)
            if claims.won:
                self.release_unused(claims)
                claims.won.clear()
            claims.unavailable = claims.unread = str(exc)
            return claims
        if polled:
            self.healthy = True
        return claims

    def claim_then(
        self,
        tenant: str,
        outcomes: Iterable[Outcome],
        then: Callable[[FrameClaims], None],
        *,
        session: str | None,
        created: float,
    ) -> None:
        """``claim`` without a wait, for a frame with no getResponse to load: ``then`` gets its
        claims once its batch is answered, the frames of every call in the order of the calls
        (a frame with nothing to claim too). The socket that read the frame goes on reading
        meanwhile: the frames it reads in one loop turn share one batch, their dispatch one
        call, their answers one write. Where Redis counts the tenant's rate (``rated``), the
        claims won take their tokens first, one take for all of the tenant's frames in the
        batch (``take_tokens``)."""
        wanted = self._wanted(tenant, outcomes, session, created)
        self._enqueue(wanted, _FrameAnswer(self, tenant, wanted, then), tenant)

    def _wanted(
        self, tenant: str, outcomes: Iterable[Outcome], session: str | None, created: float
    ) -> list[TaskRecord]:
        """The records of a frame's image tasks, to be claimed."""
        new_uuid = self._new_uuid
        return [
            TaskRecord(
                tenant=tenant,
                task=o,
                upstream_uuid=new_uuid(),
                created=created,
                session=session if o.deliveryMethod == "sync" else None,
            )
            for o in outcomes
            if type(o) is ImageTask
        ]

    def _sorted(
        self, tenant: str, wanted: list[TaskRecord], won: list[bool] | StoreUnavailable
    ) -> FrameClaims:
        """A frame's claims as its batch answered them."""
        claims = FrameClaims(tenant)
        if isinstance(won, StoreUnavailable):
            self._unhealthy(won)
            claims.unavailable = claims.unread = str(won)
            return claims
        if wanted:
            self.healthy = True
        # what zip(strict=True) would check: compiled, zip with a keyword is a call into
        # Python (about 280 ns a frame), an index a C loop
        if len(wanted) != len(won):
            raise ValueError(f"{len(wanted)} claims wanted, {len(won)} answered")
        for i, record in enumerate(wanted):
            if won[i]:
                claims.won[record.task.taskUUID] = record
            elif record.task.taskUUID not in claims.won:
                claims.lost.add(record.task.taskUUID)
        return claims

    def _enqueue(self, records: list[TaskRecord], answered: ClaimAnswer, rated: str | None) -> None:
        self._claims.append((records, answered, rated))
        if self._claiming is None:
            self._claiming = asyncio.get_running_loop().create_task(self._claim_all())

    async def _claim_all(self) -> None:
        """One claim batch at a time, for every frame that waits: under load a few hundred
        claims share a round trip instead of paying one each. Every frame hears, in order,
        whatever becomes of its batch."""
        batch: list[tuple[list[TaskRecord], ClaimAnswer, str | None]] = []
        try:
            while self._claims:
                await asyncio.sleep(0)  # the frames read in this loop turn join
                batch = self._next_batch()
                records = [record for wanted, _, _ in batch for record in wanted]
                generation = self.shared.connection.incarnation.generation
                try:
                    won = await self.shared.create_batch(records, self.replica)
                    if len(won) != len(records):
                        raise AssertionError(f"{len(won)} answers to {len(records)} claims")
                except Exception as exc:  # Redis away, or a bug: every frame hears, none hangs
                    if not isinstance(exc, StoreUnavailable):
                        log.exception("claims failed")
                        exc = StoreUnavailable(repr(exc))
                    for _, answered, _ in batch:
                        _answer(answered, exc)
                    self._give_back(records, after=self.shared.deadline)
                    batch = []
                    continue
                # written whole: its next writes go over its claim, unread, unless Redis holds
                # another data set since (the claim may be of the one before)
                if self.shared.connection.incarnation.generation == generation:
                    for record, ok in zip(records, won, strict=True):
                        if ok:
                            self._stored.add(record.upstream_uuid)
                self._answer_all(batch, won)
                batch = []
        except asyncio.CancelledError:  # the gateway stops: no frame is left waiting
            stopped = StoreUnavailable("the gateway is stopping")
            for _, answered, _ in [*batch, *self._claims]:
                _answer(answered, stopped)
            self._claims = []
            raise
        finally:
            self._claiming = None

    def _next_batch(self) -> list[tuple[list[TaskRecord], ClaimAnswer, str | None]]:
        """The frames waiting, in order, up to about ``CLAIM_BATCH`` claims (never a frame
        split): the claims that piled up while Redis stalled go in round trips each within
        the deadline, the frames answered batch by batch."""
        waiting, count = self._claims, 0
        for end, (wanted, _, _) in enumerate(waiting, 1):
            count += len(wanted)
            if count >= CLAIM_BATCH:
                self._claims = waiting[end:]
                return waiting[:end]
        self._claims = []
        return waiting

    def _answer_all(
        self, batch: list[tuple[list[TaskRecord], ClaimAnswer, str | None]], won: list[bool]
    ) -> None:
        """Every frame of a batch hears what it won, in order per tenant: the frames of a
        tenant whose rate Redis counts once its tokens are taken (``_take_all``), the others at
        once, so that no tenant, and no later batch, waits for another's take."""
        rated = self.rated if self.take_tokens is not None else None
        start = 0
        for wanted, answered, tenant in batch:
            end = start + len(wanted)
            mine = won[start:end]
            start = end
            # a tenant with frames at the take already stays there (a reload took its rate
            # away meanwhile): its frames stay in order
            staged = self._staged
            if tenant is not None and (tenant in staged or (rated is not None and rated(tenant))):
                self._rated_frames.append((tenant, wanted, answered, mine))
                staged[tenant] = staged.get(tenant, 0) + 1
            else:
                _answer(answered, mine)
        if self._rated_frames and self._taking is None:
            self._taking = asyncio.get_running_loop().create_task(self._take_all())

    async def _take_all(self) -> None:
        """The rate tokens of the frames waiting for them, one take per tenant for all of its
        frames (those that queue while a take is out join the next), then the frames, in
        order, with nothing awaited between the take and their dispatch."""
        frames: list[tuple[str, list[TaskRecord], ClaimAnswer, list[bool]]] = []
        try:
            while self._rated_frames:
                frames, self._rated_frames = self._rated_frames, []
                counts: dict[str, int] = {}
                for tenant, _, _, mine in frames:
                    counts[tenant] = counts.get(tenant, 0) + mine.count(True)
                take = self.take_tokens
                try:
                    assert take is not None
                    refused = await take({t: n for t, n in counts.items() if n})
                except Exception as exc:  # a bug: the rated frames hear, and no socket hangs
                    log.exception("rate tokens failed")
                    refused = dict.fromkeys(counts, StoreUnavailable(repr(exc)))
                for tenant, wanted, answered, mine in frames:
                    self._unstage(tenant)
                    failed = refused.get(tenant)
                    if failed is None or not any(mine):
                        _answer(answered, mine)
                        continue
                    try:  # no tokens to be had: the frame's claims go back unused
                        self.release_unused(self._sorted(tenant, wanted, mine))
                    except Exception:
                        log.exception("claims not given back")
                    _answer(answered, failed)
                frames = []
        except asyncio.CancelledError:  # the gateway stops: no frame is left waiting
            stopped = StoreUnavailable("the gateway is stopping")
            for _, _, answered, _ in [*frames, *self._rated_frames]:
                _answer(answered, stopped)
            self._rated_frames = []
            self._staged.clear()
            raise
        finally:
            self._taking = None

    def _unstage(self, tenant: str) -> None:
        left = self._staged.get(tenant, 0) - 1
        if left > 0:
            self._staged[tenant] = left
        else:
            self._staged.pop(tenant, None)

    def _give_back(self, records: list[TaskRecord], after: float = 0.0) -> None:
        """Claims to give back, each only while it is still that record's, with its place on
        the open list: of tasks refused after their claim, and (``after`` the store's
        deadline, for what Redis may still run of it) of a batch whose answer was lost, whose
        frames heard serviceUnavailable. Tried again with backoff while Redis is away, until it
        takes them: a claim left to lapse (``open_ttl``) holds its taskUUID against the
        client's retries, and a takeover meanwhile would run a task its client was told was
        not accepted. At most ``MAX_GIVING_BACK`` wait: past it the oldest is dropped (it
        lapses), counted in ``gave_up``."""
        loop = asyncio.get_running_loop()
        not_before = loop.time() + after
        giving = self._giving
        for record in records:
            if len(giving) >= MAX_GIVING_BACK:
                giving.popleft()
                if not self.gave_up:
                    log.warning("claims to give back past their bound: the oldest lapse")
                self.gave_up += 1
            giving.append((not_before, record.tenant, record.task.taskUUID, record.upstream_uuid))
        if giving and self._giver is None:
            self._giver = loop.create_task(self._give_all())
            self._background.add(self._giver)
            self._giver.add_done_callback(self._background.discard)

    async def _give_all(self) -> None:
        loop = asyncio.get_running_loop()
        giving = self._giving
        delays = full_jitter(0.05, 1.0, self._rng)
        try:
            while giving and not self._closed:
                wait = giving[0][0] - loop.time()
                if wait <= 0 and self._in_doubt():  # a taker's claims now, maybe: not touched
                    wait = IN_DOUBT_POLL
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                claim = giving.popleft()
                _, tenant, task_uuid, upstream_uuid = claim
                self._in_hand, failed = 1, False
                try:
                    await self.shared.release(tenant, task_uuid, upstream_uuid, self.replica)
                except StoreUnavailable as exc:
                    self._unhealthy(exc)
                    failed = True
                    if len(giving) < MAX_GIVING_BACK:  # first again
                        giving.appendleft(claim)
                    else:
                        self.gave_up += 1
                except Exception:  # a bug: that claim lapses, the others still go back
                    log.exception("a claim could not be given back")
                finally:
                    self._in_hand = 0
                if failed:
                    await asyncio.sleep(next(delays))
                    continue
                self.healthy = True
                delays = full_jitter(0.05, 1.0, self._rng)
        finally:
            self._giver = None

    def _in_doubt(self) -> bool:
        in_doubt = self.lease_in_doubt
        return in_doubt is not None and in_doubt()

    @property
    def giving_back(self) -> int:
        """Claims waiting to be given back, or being given back."""
        return len(self._giving) + self._in_hand

    def release_unused(self, claims: FrameClaims, registered: Registered | None = None) -> None:
        """After the dispatch: claims of tasks that were refused (whose records are not what
        ``registered`` holds for their taskUUIDs; None: every claim) are given back, with the
        records they wrote."""
        tenant = claims.tenant
        unused = [
            r for t, r in claims.won.items() if registered is None or registered(tenant, t) is not r
        ]
        for record in unused:
            self._stored.discard(record.upstream_uuid)
        if unused:
            self._give_back(unused)

    async def load(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        """A record another replica runs (or ran); None when there is none. StoreUnavailable
        when Redis is away: whether there is one is not known."""
        try:
            record = await self.shared.load(tenant, task_uuid)
        except StoreUnavailable as exc:
            self._unhealthy(exc)
            raise
        self.healthy = True
        return record

    def link_session(self, index: int, session_uuid: str) -> None:
        """The pool's hook: a provider link authenticated under ``session_uuid``, recorded for
        a replica that takes this one over to resume."""
        self.record_links({index: session_uuid})

    def record_links(self, sessions: dict[int, str]) -> None:
        """Provider sessions by link index, recorded (each link's last); also every lease
        renewal, all of them: a Redis restarted empty, or flushed, lost them, and a takeover
        without them would take every task for never sent and submit it again."""
        # a clean stop deletes them: none written after; nor by a replica maybe taken over
        if not sessions or self._closed or self._in_doubt():
            return
        redis = self.shared.connection
        key = links_key(redis, self.replica)
        mapping: dict[FieldT, EncodableT] = {str(i): uuid for i, uuid in sessions.items()}

        async def write() -> None:
            # no TTL: a link may stay up for days; a takeover or a clean stop deletes it
            await redis.client.hset(key, mapping=mapping)

        async def run() -> None:
            try:
                await redis.call(write)
            except StoreUnavailable as exc:
                self._unhealthy(exc)

        self._spawn(run())

    # ------------------------------------------------------------------ records

    def changed(self, record: TaskRecord) -> None:
        """The registry's hook: ``record`` is to be written as it will be at the next flush."""
        self._dirty[record.upstream_uuid] = record
        if len(self._dirty) > self.max_pending:
            self._shed()
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    def after_write(self, step: Callable[[], None]) -> None:
        """The registry's hook: run ``step`` (a task's frames to its subscribers) once the
        records dirty now are written; at once, after one failed try, while Redis is away (the
        sockets that wait get their results; the store catches up later)."""
        self._after.append(step)
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    def _shed(self) -> None:
        finished = [u for u, r in self._dirty.items() if r.finished is not None]
        for upstream_uuid in finished[: len(self._dirty) - self.max_pending]:
            del self._dirty[upstream_uuid]
            self._stored.discard(upstream_uuid)
            self._dropped.inc()

    async def _flush(self) -> None:
        delays = full_jitter(0.05, 1.0, self._rng)
        try:
            while self._dirty or self._after:
                await asyncio.sleep(0)  # the rest of this loop turn's changes join the write
                if self._in_doubt():
                    # maybe taken over during a stall: nothing is written or sent until a
                    # renewal answers (gateway.cluster); fenced, never (close drops them)
                    await asyncio.sleep(IN_DOUBT_POLL)
                    continue
                batch, self._dirty = self._dirty, {}
                after, self._after = self._after, []
                stored = self._stored
                generation = self.shared.connection.incarnation.generation
                if generation != self._generation:
                    self._generation = generation
                    stored.clear()
                writes = [
                    Write(r, u not in stored, r.finished is not None) for u, r in batch.items()
                ]
                # a final record is never stored, whatever becomes of this write: its later
                # writes (a delivery's outcome, this one again after a failure Redis may have
                # run) go whole, whose script reads whether it was listed finished already,
                # and whether the claim is still its own
                for write in writes:
                    if write.final:
                        stored.discard(write.record.upstream_uuid)
                try:
                    missing = await self.shared.write(
                        writes, retention=self.retention, replica=self.replica
                    )
                except Exception as exc:  # Redis away, or a bug: the frames go, writes wait
                    if isinstance(exc, StoreUnavailable):
                        self._unhealthy(exc)
                    else:
                        log.exception("task records not written")
                    # newer changes made meanwhile are the same objects: keep the order
                    batch.update(self._dirty)
                    self._dirty = batch
                    _run(after)
                    missing = None
                if missing is None:  # not in the handler: see UpstreamLink._connection
                    await asyncio.sleep(next(delays))
                    continue
                for upstream_uuid in missing:  # Redis restarted empty: written whole next
                    stored.discard(upstream_uuid)
                    self._dirty.setdefault(upstream_uuid, batch[upstream_uuid])
                self.healthy = True
                delays = full_jitter(0.05, 1.0, self._rng)
                _run(after)
        finally:
            self._flushing = None

    @property
    def pending(self) -> int:
        return len(self._dirty)

    async def drain(self, deadline: float) -> None:
        """Shutdown: the last writes, within ``deadline`` seconds."""
        flushing = self._flushing
        if flushing is not None:
            await asyncio.wait([flushing], timeout=deadline)
        if self._background:
            await asyncio.wait(list(self._background), timeout=deadline)

    async def close(self, deliver_held: bool = True) -> None:
        """For good. The frames still held go first (their sockets are closing, but in order),
        unless the replica was taken over (``deliver_held`` False): they are the taker's to
        send."""
        self._closed = True
        if deliver_held:
            _run(self._after)
        self._after = []
        for task in [self._flushing, *self._background]:
            if task is not None:
                task.cancel()

    def _unhealthy(self, exc: StoreUnavailable) -> None:
        if self.healthy:
            log.warning("shared store unavailable", error=str(exc))
        self.healthy = False

    def _spawn(self, step: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(step)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _FrameAnswer:
    """What a frame's claims hear of their batch (``Replication.claim_then``), handed on
    sorted. An object, not a closure: compiled, a closure is two objects per frame (it and its
    scope), each built and freed attribute by attribute."""

    __slots__ = ("replication", "tenant", "then", "wanted")

    def __init__(
        self,
        replication: Replication,
        tenant: str,
        wanted: list[TaskRecord],
        then: Callable[[FrameClaims], None],
    ) -> None:
        self.replication = replication
        self.tenant = tenant
        self.wanted = wanted
        self.then = then

    def __call__(self, won: list[bool] | StoreUnavailable) -> None:
        try:
            claims = self.replication._sorted(self.tenant, self.wanted, won)
        except Exception:  # a bug: the frame still hears (its socket counts on it)
            log.exception("a frame's claims could not be sorted")
            claims = FrameClaims(self.tenant)
            claims.unavailable = claims.unread = "the gateway failed to read its claims"
        self.then(claims)


def _answer(answered: ClaimAnswer, won: list[bool] | StoreUnavailable) -> None:
    try:
        answered(won)
    except Exception:  # one frame's bug must not keep the batch's other frames waiting
        log.exception("a frame's claims could not be handed on")


def _run(steps: list[Callable[[], None]]) -> None:
    for step in steps:
        try:
            step()
        except Exception:  # one subscriber's bug must not keep the others' frames
            log.exception("a task's frames failed to go out")
