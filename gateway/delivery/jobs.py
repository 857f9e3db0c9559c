"""Pending webhooks and uploads as jobs that outlive the replica that started them (issue 13).

A :class:`DeliveryJob` carries everything another process needs to perform the delivery without
the task record: the kind, the delivery id (the ``webhook-id``, stable for the job's whole life),
tenant, client taskUUID, upstream UUID, the full target URL, the webhook body or where the upload's
image is, and how far it got (attempts made, the next attempt's wall-clock time). It carries no
secret: the replica that runs an attempt signs it with the tenant's secret from its own
configuration.

It does carry the target URL *with its query*, since an upload's presigned URL is needed to PUT:
Redis holds presigned URLs (and, for base64 output, the image itself) until the job is acked, so
that Redis must be as private as the gateway.

Two backends:

- :class:`MemoryJobs` (no ``store.url``): nothing durable, today's single-process behaviour; a
  replica that dies loses its pending deliveries.
- :class:`RedisJobs`: a stream and a consumer group; the consumer is the replica's name. Keys
  under the connection's prefix:

  - ``{prefix}:deliveries``       stream, one entry per job (field ``id``: the delivery id),
    consumer group ``deliveries``. An entry is pending (in the group's PEL) from its creation to
    its final outcome, owned by the replica that runs it.
  - ``{prefix}:delivery:{id}``    hash: ``job`` (the job as created, MessagePack), ``entry`` (its
    stream entry id), ``progress`` (attempts, next time, last status and error, MessagePack;
    written after each attempt that is not the last). It expires ``ttl`` after its creation and
    again after each progress write, ``ttl`` being longer than a job can still be tried (see
    ``Deliveries``): a hash whose stream entry was lost (a failover that lost writes) does not
    stay forever. A job left unclaimed in the stream for longer (every replica full for that
    long) is dropped, with a warning, by the claimer that finds its hash gone.
    Once the job ends, the hash is replaced by a tombstone (field ``done``) for ``linger`` (ten
    leases): what tells a holder that lagged (a pause, a partition) that another replica finished
    its job, as opposed to Redis having lost it.

  The owner keeps its entries' idle time below the lease (``refresh``, an ownership-checked
  ``XCLAIM ... JUSTID`` to itself); another replica ``XAUTOCLAIM``s entries idle longer than the
  lease and continues them from their progress. The final outcome ``XACK``s and deletes the entry
  and leaves the tombstone in one step. Steps that must be atomic are Lua scripts that touch keys
  they compute (a single Redis or a primary with replicas, not Redis Cluster), as the task store's.

  What a refresh finds of an entry (:class:`Hold`): pending for this replica: OURS; pending for
  another: TAKEN; in no pending list, its hash a tombstone or another entry's job: TAKEN (finished
  elsewhere, or the delivery is a job again); in no pending list and no hash naming another
  entry: FORGOTTEN, Redis lost it (restarted empty, as without persistence). Nobody else has a
  forgotten job, so its holder runs it on in memory, no longer durable (as a job created while
  Redis is unavailable), rather than dropping it: even once a later job has recreated the stream
  and its group, which is why a group without the entry is not enough to say TAKEN.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, Protocol

import msgspec
import structlog

from gateway.store.connection import RedisConnection

__all__ = ["DeliveryJob", "DeliveryJobs", "Hold", "MemoryJobs", "Progress", "RedisJobs"]

GROUP = "deliveries"
REFRESH_BATCH = 512  # entries per script call: a long script would hold Redis for the others

log = structlog.get_logger("tenebra.delivery")


class Progress(msgspec.Struct, kw_only=True, gc=False):
    """How far a job got: what changes between attempts."""

    attempts: int = 0  # made so far, by every replica that ran it
    next_at: float = 0.0  # wall clock: replicas compare it, so monotonic time would not do
    last_status: int | None = None
    last_error: str | None = None


class DeliveryJob(Progress, kw_only=True, gc=False):
    """One webhook POST or upload PUT, enough to perform it on any replica."""

    kind: Literal["webhook", "upload"]
    id: str  # the webhook-id: the receiver's de-duplication key, the same on every replica
    tenant: str
    task_uuid: str  # the client's
    upstream_uuid: str
    url: str  # full, query included (a presigned URL): never logged, see the module's text
    image_uuid: str | None = None  # None for the webhook of a task's failure
    content_type: str = "application/json"
    body: bytes = b""  # a webhook's JSON
    image_url: str | None = None  # an upload's image, fetched at its first attempt on a replica
    image_base64: str | None = None  # or the image itself (base64 or data URI output)

    @property
    def progress(self) -> Progress:
        return Progress(
            attempts=self.attempts,
            next_at=self.next_at,
            last_status=self.last_status,
            last_error=self.last_error,
        )


class Hold(enum.Enum):
    """What a refresh found of one entry."""

    OURS = "ours"  # refreshed: nobody else takes it for another lease
    TAKEN = "taken"  # another replica claimed it, or finished it: stop running it here
    # Redis lost it (a restart without persistence): nobody else has it, so run on, in memory
    FORGOTTEN = "forgotten"


class DeliveryJobs(Protocol):
    """Where pending deliveries are kept. ``consumer`` is the calling replica's name; ``entry`` is
    the job's handle in the backend. Every call on a durable backend may raise StoreUnavailable."""

    @property
    def durable(self) -> bool: ...

    async def add(self, job: DeliveryJob, consumer: str, ttl: float) -> str | None:
        """Keep a new job, held by ``consumer``, for ``ttl`` seconds; its entry, or None when a
        job with this delivery id already exists (someone runs it)."""

    async def progress(self, entry: str, job: DeliveryJob, consumer: str, ttl: float) -> Hold:
        """Record ``job``'s progress (kept ``ttl`` seconds more) and refresh its hold; not
        recorded unless OURS."""

    async def finish(self, entry: str, job: DeliveryJob, linger: float) -> None:
        """The final outcome: the job is gone for every replica; a holder that asks within
        ``linger`` seconds hears TAKEN."""

    async def refresh(self, held: Sequence[tuple[str, str]], consumer: str) -> list[Hold]:
        """Keep ``held`` (delivery id, entry) held by ``consumer``: one answer each, in order."""

    async def claim(
        self, consumer: str, min_idle: float, count: int
    ) -> list[tuple[str, DeliveryJob]]:
        """Take at most ``count`` jobs not refreshed for ``min_idle`` seconds, with their
        progress."""


class MemoryJobs:
    """Nothing durable: jobs live in the tasks that run them (one replica)."""

    durable = False

    async def add(self, job: DeliveryJob, consumer: str, ttl: float) -> str | None:
        return job.id

    async def progress(self, entry: str, job: DeliveryJob, consumer: str, ttl: float) -> Hold:
        return Hold.OURS

    async def finish(self, entry: str, job: DeliveryJob, linger: float) -> None:
        pass

    async def refresh(self, held: Sequence[tuple[str, str]], consumer: str) -> list[Hold]:
        return [Hold.OURS] * len(held)

    async def claim(
        self, consumer: str, min_idle: float, count: int
    ) -> list[tuple[str, DeliveryJob]]:
        return []


# KEYS[1]: stream, KEYS[2]: the job's hash; ARGV: group, consumer, job, delivery id, ttl (ms).
# FORCE puts the new entry straight into the consumer's PEL: nobody reads the stream with
# XREADGROUP, so an entry that never reached a PEL would never be claimed. A tombstone does not
# stop a new job with its delivery id: that job was asked for again after the last one ended.
_ADD = """
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if redis.call('HEXISTS', KEYS[2], 'job') == 1 then return false end
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[4])
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'FORCE', 'JUSTID')
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'job', ARGV[3], 'entry', entry)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return entry
"""

# The shared part of _PROGRESS and _REFRESH: 1 refreshed, 0 taken, -1 forgotten (see the
# module's text). Not pending, with no hash or a hash of this entry: no replica can take it
# from here (nothing pending to claim), so it is forgotten, not taken.
_HOLD = """
local function hold(stream, group, consumer, entry, key)
  local pending = redis.pcall('XPENDING', stream, group, entry, entry, 1)
  if not pending.err and #pending > 0 then
    if pending[1][2] ~= consumer then return 0 end
    redis.call('XCLAIM', stream, group, consumer, 0, entry, 'JUSTID')
    return 1
  end
  if redis.call('EXISTS', key) == 1 and redis.call('HGET', key, 'entry') ~= entry then
    return 0
  end
  return -1
end
"""

# KEYS[1]: stream, KEYS[2]: the job's hash; ARGV: group, consumer, entry, progress, ttl (ms).
_PROGRESS = (
    _HOLD
    + """
local held = hold(KEYS[1], ARGV[1], ARGV[2], ARGV[3], KEYS[2])
if held == 1 then
  redis.call('HSET', KEYS[2], 'progress', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return held
"""
)

# KEYS[1]: stream; ARGV: group, consumer, the hashes' key prefix, (delivery id, entry)...
_REFRESH = (
    _HOLD
    + """
local held = {}
for i = 4, #ARGV, 2 do
  table.insert(held, hold(KEYS[1], ARGV[1], ARGV[2], ARGV[i + 1], ARGV[3] .. ARGV[i]))
end
return held
"""
)

# KEYS[1]: stream, KEYS[2]: the job's hash; ARGV: group, entry, linger (ms). A hash of another
# entry is a later job with this delivery id: left alone.
_FINISH = """
redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local owner = redis.call('HGET', KEYS[2], 'entry')
if owner == false or owner == ARGV[2] then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'done', '1')
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 0
"""

# KEYS[1]: stream; ARGV: group, consumer, min idle (ms), cursor, count, the hashes' key prefix.
# Returns {next cursor, {entry, delivery id, job, progress or ''}..., {expired delivery id...}}.
# An entry whose hash is a tombstone was finished between two steps of its owner; one whose hash
# is gone expired (or Redis lost it): both acked and deleted here. A consumer that holds
# nothing and was silent for ten leases is deleted: every restart names a new replica, and the
# group's list of consumers would grow with each (deleting one that holds nothing loses nothing).
_CLAIM = """
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] > 10 * tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
  end
end
local found = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                         'COUNT', ARGV[5])
local jobs, expired = {}, {}
for _, item in ipairs(found[2]) do
  if type(item) == 'table' and type(item[2]) == 'table' then
    local key = ARGV[6] .. item[2][2]
    local job = redis.call('HGET', key, 'job')
    if job then
      table.insert(jobs, {item[1], item[2][2], job, redis.call('HGET', key, 'progress') or ''})
    else
      if redis.call('EXISTS', key) == 0 then table.insert(expired, item[2][2]) end
      redis.call('XACK', KEYS[1], ARGV[1], item[1])
      redis.call('XDEL', KEYS[1], item[1])
    end
  end
end
return {found[1], jobs, expired}
"""

_CODES = {1: Hold.OURS, 0: Hold.TAKEN, -1: Hold.FORGOTTEN}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisJobs:
    """Jobs in a Redis stream shared by every replica (keys: see the module's text)."""

    durable = True

    def __init__(self, redis: RedisConnection) -> None:
        self._redis = redis
        self._call = redis.call
        self._stream = redis.key("deliveries")
        self._hashes = redis.key("delivery", "")
        self._encoder = msgspec.msgpack.Encoder()
        self._job = msgspec.msgpack.Decoder(DeliveryJob)
        self._progress = msgspec.msgpack.Decoder(Progress)
        self._add = redis.script(_ADD)
        self._progress_script = redis.script(_PROGRESS)
        self._refresh = redis.script(_REFRESH)
        self._finish = redis.script(_FINISH)
        self._claim = redis.script(_CLAIM)
        self._cursor = "0-0"  # XAUTOCLAIM scans the PEL a batch per call, round and round

    def job_key(self, delivery_id: str) -> str:
        return self._hashes + delivery_id

    @property
    def stream(self) -> str:
        return self._stream

    async def add(self, job: DeliveryJob, consumer: str, ttl: float) -> str | None:
        keys = [self._stream, self.job_key(job.id)]
        args = [GROUP, consumer, self._encoder.encode(job), job.id, _ms(ttl)]
        entry = await self._call(lambda: self._add(keys=keys, args=args))
        return None if entry is None else _text(entry)

    async def progress(self, entry: str, job: DeliveryJob, consumer: str, ttl: float) -> Hold:
        keys = [self._stream, self.job_key(job.id)]
        args = [GROUP, consumer, entry, self._encoder.encode(job.progress), _ms(ttl)]
        held = await self._call(lambda: self._progress_script(keys=keys, args=args))
        return _CODES[int(held)]

    async def finish(self, entry: str, job: DeliveryJob, linger: float) -> None:
        keys = [self._stream, self.job_key(job.id)]
        await self._call(lambda: self._finish(keys=keys, args=[GROUP, entry, _ms(linger)]))

    async def refresh(self, held: Sequence[tuple[str, str]], consumer: str) -> list[Hold]:
        holds: list[Hold] = []
        for start in range(0, len(held), REFRESH_BATCH):
            pairs = [part for pair in held[start : start + REFRESH_BATCH] for part in pair]
            args = [GROUP, consumer, self._hashes, *pairs]
            codes = await self._call(partial(self._refresh, keys=[self._stream], args=args))
            holds += [_CODES[int(code)] for code in codes]
        return holds

    async def claim(
        self, consumer: str, min_idle: float, count: int
    ) -> list[tuple[str, DeliveryJob]]:
        args = [GROUP, consumer, _ms(min_idle), self._cursor, count, self._hashes]
        cursor, found, expired = await self._call(
            lambda: self._claim(keys=[self._stream], args=args)
        )
        self._cursor = _text(cursor)
        for delivery_id in expired:
            # its hash outlived any run of the job: nobody had room for it for that long, or
            # Redis lost the hash but not the entry
            log.warning("delivery job expired before a replica ran it", delivery=_text(delivery_id))
        claimed = []
        for entry, delivery_id, job, progress in found:
            try:
                claimed.append(self._decode(entry, job, progress))
            except msgspec.DecodeError:
                # else claimed again and again by every replica, and never deliverable
                log.error("delivery job does not decode: dropped", delivery=_text(delivery_id))
                keys = [self._stream, self.job_key(_text(delivery_id))]
                args = [GROUP, entry, _ms(10 * min_idle)]  # ten leases, as Holds.linger
                await self._call(partial(self._finish, keys=keys, args=args))
        return claimed

    def _decode(self, entry: Any, job: Any, progress: Any) -> tuple[str, DeliveryJob]:
        decoded = self._job.decode(_bytes(job))
        if progress:
            made = self._progress.decode(_bytes(progress))
            decoded = msgspec.structs.replace(
                decoded,
                attempts=made.attempts,
                next_at=made.next_at,
                last_status=made.last_status,
                last_error=made.last_error,
            )
        return _text(entry), decoded
