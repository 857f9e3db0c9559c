"""``SharedTasks`` in Redis (``store.url``): what several gateway replicas share about tasks.

Keys, under one prefix (``tenebra`` unless told; tenant and taskUUID escaped so that a ':' in a
tenant's name cannot make two tenants' keys meet; the taskUUID in lower case, so that two
spellings of one UUID are one claim, RFC 9562, while the record keeps its client's spelling. A
replica of before that change keyed a taskUUID as it was sent: the tasks it claimed in upper or
mixed case are not found by a replica of after it):

- ``{prefix}:record:{tenant}:{taskUUID}``  string: the claim and the record in one key. A *tag*
  (one byte, the upstream UUID's length, then the upstream UUID), a *mark* (``f``: the record
  is on the finished list; ``o``: not yet), then the record (MessagePack, one array:
  store/parts.py). Written first with ``SET NX``: one command claims the taskUUID and records
  the task; then whole again at each change. A bare claim (``claim``, no record) is the tag
  alone
- ``{prefix}:ended``                     list of finished records, in the order Redis saw them
  finish: the count bound ``max_retained`` pops it from the oldest
- ``{prefix}:open:{replica}``            set of the open records a replica runs (its takeover)

A member of the last two is a record's tag then its key, so a takeover and a pop find a
record's key without a read. An open record lives at most ``open_ttl`` from its last write (a
safety net: a replica that died with the task and was never taken over); a final write sets
it to ``retention``. The finished list keeps the members of records whose retention let them
go (their keys expired by themselves) until the bound pops them: it holds at most
``max_retained`` members (and a write's more). A record is listed once: its first final write
lists it, and a later one (the outcome of a delivery after the task ended, a write sent again
after a failure: gateway.replication writes them whole) finds the mark and does not. Two cases
list it twice, so that the pop of its first member deletes it before its time: a final write
whose connection dropped before its replies came, sent again at once (``RedisPipe.exchange``),
and one that found its key gone (Redis lost it, or the bound popped it under a delivery's
outcome: the record comes back, listed anew). A batch cut between its ``SET``s and its
``RPUSH`` (a restart, or a connection reset, as Redis read it) leaves records marked listed
that are not: the bound does not count them, and they go at the end of their retention. A pop
deletes a key only while it is still that record's: a taskUUID whose claim lapsed may have
been claimed again by another task.

Redis restarted empty (no persistence): finished tasks are gone for every replica but the one
that ran them; an open task's next write finds its key gone, and it is written whole again
(claim and record, open list), unless another task took its taskUUID meanwhile.
Each replica knows which data set Redis holds (``{prefix}:incarnation``: store/pipe.py's
``Incarnation``, read at every connect and with every flush). Once it changes, every record
claimed before is written whole (gateway.replication), which checks whose the claim is, and a
flush built before is not sent: no write of a record over its claim assumes a claim of the data
set that is gone. Redis must not evict keys (``maxmemory-policy noeviction``): a claim evicted
is a taskUUID that can be billed twice. Three cases are not told by the incarnation, and the
claim's owner is not checked record by record: a flush under replicas that run
(``FLUSHALL``, or claims deleted by hand: seen by the next write batch's probe, after that
batch ran), a claim that lapsed (``open_ttl``, twice ``tasks.timeout``) under a write held
back longer, and a failover behind a proxy that keeps the store's connections open
(store/pipe.py). A taskUUID claimed again by another task meanwhile (a client that sent a
taskUUID still running again, in that window) may then have its record written over by the
first task's: ``getResponse`` answers with the first task's record, as it answered before
the flush.

How a batch goes (a loop turn's claims, a flush's records): one round trip on the store's
pipelined connection (store/pipe.py: its replies parsed in C as they arrive), its commands
packed by hand (RESP: a batch is hundreds of arguments, which redis-py's asyncio client would
pack one by one in Python), and one command per batch for the sets and the list:

- claims: one ``SADD`` of the records' members to the open list, then one ``SET NX PX`` each
  (claim and record at once), then the list's expiry. Each claim is atomic, the batch is not:
  a replica that dies half way leaves members without their claim, which its takeover passes
  by; a claim lost takes its member back (a second round trip, for conflicts only);
- a record written over its claim (every write but the first after a claim this replica made
  in this data set): a ``SET XX PX``, to the retention (final) or ``open_ttl`` (open), whose
  nil says Redis lost the claim (flushed under connections that stayed up): written whole
  next. The finished go off the open list in one ``SREM`` and onto the finished list in one
  ``RPUSH``, whose reply tells whether the list is past ``max_retained``: then the next write
  pops it down to 1% under it (a small script, ``OVER``; to the bound itself under 100), so it
  is past by one write's records at most, and a pop runs once every 1% of the bound's records;
- what must read before it writes is a script: a record written whole (``WRITE``), a final
  write with a retention of 0, a release (the scripts: store/redis_scripts.py).

A task so costs Redis two keyed commands (its claim; its record when it ends) and a share of a
batch's few, with no script on the way of a task that runs as it should. A record's state in a
key of its own (and its claim's expiry set apart), and the finished in a sorted set by time,
cost Redis about 2 us a task more (6.2 against 4.0, in a side-by-side run of the two command
mixes). Plain commands, not one script per batch: a command inside a script, and every byte
through Lua, costs Redis more than a command it parses (in a side-by-side microbenchmark of
claims and final writes, Redis 5.9 us a task against 8.5 with one script per batch), at the
cost of a reply for the gateway to read per command. Scripts touch keys they compute, so this
is for a single Redis or a primary with replicas, not Redis Cluster. Redis 6.2 or later
(``LPOP`` with a count). Keys of earlier layouts (``{prefix}:task:*``, ``{prefix}:state:*``,
``{prefix}:finished``, ``{prefix}:rec:*``) are neither read nor written: replicas of two
versions must not share a prefix, and the old keys expire by themselves (but for the old
finished set, which can be deleted). A value that does not read as a record raises
``StoreUnavailable`` where it was asked for, and is passed by in a takeover (logged).

Every call keeps the connection's deadline (store/connection.py): a Redis that refuses, stalls
or fails raises ``StoreUnavailable``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import structlog
from msgspec.structs import astuple

from gateway.store.base import TaskRecord
from gateway.store.connection import RedisConnection, key_part
from gateway.store.parts import StoredRecord
from gateway.store.pipe import RedisPipe, command
from gateway.store.redis_scripts import OVER, RELEASE, TAKE_OPEN, WRITE
from gateway.store.shared import StoreUnavailable

__all__ = ["RedisSharedTasks", "Write"]

log = structlog.get_logger("tenebra.store")

DAY = 86_400.0
# records per round trip of a flush or a takeover's read: the records dirty after a long outage
# (up to ``max_pending``), a dead replica's open ones, go in pieces, each within the deadline,
# not in one round trip that never can
BATCH = 2_000

_OVER_SOURCE, _WRITE_SOURCE = OVER.encode(), WRITE.encode()
_OPEN, _LISTED = b"o", b"f"  # a record's mark: whether it is on the finished list


# RESP by hand, as ``command`` (store/pipe.py) packs a whole command: a member or a value
# packed once, for the variadic commands and the scripts' arguments
def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _tag(upstream_uuid: str) -> bytes:
    """What a record's claim and members start with: the upstream UUID's length (one byte, so
    a script finds where it ends), then the UUID."""
    data = upstream_uuid.encode()
    return b"%c%b" % (len(data), data)


def _variadic(name: bytes, fixed: Sequence[bytes], packed: Sequence[bytes]) -> list[bytes]:
    """A command whose last arguments are packed already (``packed``)."""
    return [b"*%d\r\n" % (1 + len(fixed) + len(packed)), *map(_bulk, (name, *fixed)), *packed]


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data  # the client does not decode


class Write:
    """One record of a flush: whole (its claim checked, a script) the first time, else over its
    claim; final (its retention starts) or open."""

    __slots__ = ("final", "record", "whole")

    def __init__(self, record: TaskRecord, whole: bool, final: bool) -> None:
        self.record = record
        self.whole = whole
        self.final = final


class RecordCodec:
    """A record as one MessagePack array (store/parts.py), packed from its fields as one tuple:
    the same bytes as StoredRecord's, without a Struct made for each, its fields read by offset
    in C (``astuple``, in TaskRecord's order) rather than each through an attribute read from
    compiled code (about 0.4 us a record), then put in the stored array's order (the layout
    replicas share: a record written by a replica of before reads the same)."""

    def __init__(self) -> None:
        self._encode: Callable[[Any], bytes] = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(StoredRecord).decode

    def encode(self, r: TaskRecord) -> bytes:
        t = astuple(r)
        return self._encode(
            (t[0], t[1], t[2], t[4], t[12], t[3], t[5], t[6], t[7], t[8], t[9], t[10], t[11],
             t[13], t[14], t[15])
        )  # fmt: skip

    def decode(self, data: bytes) -> TaskRecord:
        a = self._decode(data)
        return TaskRecord(
            tenant=a.tenant, task=a.task, upstream_uuid=a.upstream_uuid, created=a.created,
            session=a.session, state=a.state, finished=a.finished, link=a.link,
            window_epoch=a.window_epoch, sends=a.sends, results=a.results, error=a.error,
            deliveries=a.deliveries, key_id=a.key_id, cost=a.cost, trace=a.trace,
        )  # fmt: skip


class RedisSharedTasks:
    def __init__(self, redis: RedisConnection, *, max_retained: int, open_ttl: float = DAY) -> None:
        self._redis = redis
        self._call = redis.call
        self._max_retained = max_retained
        self._open_ttl_ms = max(1, round(open_ttl * 1000))
        self._prefix = redis.prefix
        self._claims = f"{redis.prefix}:record:"
        self._finished_key = f"{redis.prefix}:ended"
        self._over = False  # the finished list past max_retained: the next write pops it down
        self._tenants: dict[str, str] = {}  # tenant -> the start of its claim keys
        self._codec = RecordCodec()
        self._ttl_ms = b"%d" % self._open_ttl_ms
        # the end of each claim's SET
        self._claim_tail = b"$2\r\nNX\r\n$2\r\nPX\r\n" + _bulk(self._ttl_ms)
        self._release = redis.script(RELEASE)
        self._take_open = redis.script(TAKE_OPEN)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_retained: int,
        deadline: float = 1.0,
        max_connections: int = 32,
        open_ttl: float = DAY,
        prefix: str = "tenebra",
    ) -> RedisSharedTasks:
        """A connection of its own (tests; the gateway shares one between its stores)."""
        redis = RedisConnection.from_url(
            url, deadline=deadline, max_connections=max_connections, prefix=prefix
        )
        return cls(redis, max_retained=max_retained, open_ttl=open_ttl)

    @property
    def connection(self) -> RedisConnection:
        return self._redis

    @property
    def deadline(self) -> float:
        return self._redis.deadline

    @property
    def max_retained(self) -> int:
        return self._max_retained

    def claim_key(self, tenant: str, task_uuid: str) -> str:
        """A (tenant, taskUUID)'s key, the taskUUID in lower case: UUIDs are case-insensitive
        (RFC 9562), so two spellings of one are one claim (the record keeps the client's)."""
        return f"{self._claims}{key_part(tenant)}:{key_part(task_uuid.lower())}"

    def _tenant(self, tenant: str) -> str:
        """The start of a tenant's claim keys, kept: tenants are few (the configuration's)."""
        if len(self._tenants) >= 10_000:
            self._tenants.clear()
        start = self._tenants[tenant] = f"{self._claims}{key_part(tenant)}:"
        return start

    def _claim_key(self, tenant: str, task_uuid: str) -> bytes:
        """``claim_key``, as bytes, with the tenant's part kept: twice per task on the hot
        path."""
        start = self._tenants.get(tenant) or self._tenant(tenant)
        return (start + key_part(task_uuid.lower())).encode()

    def open_key(self, replica: str) -> str:
        """The open records a replica runs (their members): what a takeover finds."""
        return f"{self._prefix}:open:{key_part(replica)}"

    def member(self, tenant: str, task_uuid: str, upstream_uuid: str) -> bytes:
        """A record's member of the finished list and of the open lists: its tag, then its
        key."""
        return _tag(upstream_uuid) + self._claim_key(tenant, task_uuid)

    async def claim(self, tenant: str, task_uuid: str, upstream_uuid: str) -> bool:
        [won] = await self.claim_many(tenant, [(task_uuid, upstream_uuid)])
        return won

    async def claim_many(self, tenant: str, claims: Sequence[tuple[str, str]]) -> list[bool]:
        return await self.claim_batch([(tenant, task, upstream) for task, upstream in claims])

    async def claim_batch(self, claims: Sequence[tuple[str, str, str]]) -> list[bool]:
        """``claim`` for each (tenant, taskUUID, upstream UUID), of any tenants, in order, in one
        round trip: bare claims (their tag alone), no record."""
        if not claims:
            return []
        commands = [
            command(b"SET", self.claim_key(t, task).encode(), _tag(up), b"NX", b"PX", self._ttl_ms)
            for t, task, up in claims
        ]
        answers = await self._exchange(self._redis.claims, commands, len(commands))
        return [answer is not None for answer in answers]

    async def create_batch(self, records: Sequence[TaskRecord], replica: str) -> list[bool]:
        """Claim each record's (tenant, taskUUID) and, where won, write the record and list it
        as ``replica``'s: in one round trip, a loop turn's new tasks of every frame. A task is
        then known to every replica before it is dispatched, with no write of its own.

        Plain commands, pipelined: one ``SADD`` of the records' members to the open list, one
        ``SET NX PX`` each (claim and record at once), the list's expiry. Listed first, so that
        a replica that dies half way leaves members without claims, which its takeover passes
        by; a claim lost takes its member back (a second round trip, for conflicts only)."""
        if not records:
            return []
        encode, tail = self._codec.encode, self._claim_tail
        members: list[bytes] = []
        sets: list[bytes] = []
        keys: list[bytes] = []
        tags: list[bytes] = []
        for record in records:
            tag = _tag(record.upstream_uuid)
            key = self._claim_key(record.tenant, record.task.taskUUID)
            value = _OPEN + encode(record)
            keys.append(key)
            tags.append(tag)
            members.append(_bulk(tag + key))
            sets.append(
                b"*6\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b%b\r\n%b"
                % (len(key), key, len(tag) + len(value), tag, value, tail)
            )
        index = self.open_key(replica).encode()
        commands = [
            *_variadic(b"SADD", [index], members),
            *sets,
            command(b"PEXPIRE", index, self._ttl_ms),
        ]
        answers = await self._exchange(self._redis.claims, commands, 2 + len(sets))
        won = [answer is not None for answer in answers[1 : 1 + len(sets)]]
        if not all(won):
            await self._own_claims(won, keys, tags)
        if not all(won):
            lost = [m for m, ok in zip(members, won, strict=True) if not ok]
            # the claims won stand whatever becomes of this tidying: a lost claim's member left
            # in the open list is passed by (its claim carries another tag)
            with contextlib.suppress(StoreUnavailable):
                await self._exchange(self._redis.claims, _variadic(b"SREM", [index], lost), 1)
        return won

    async def _own_claims(self, won: list[bool], keys: list[bytes], tags: list[bytes]) -> None:
        """A claim that reads as lost may be this batch's own: Redis ran the batch, the
        connection dropped before its replies came, and the batch went again (``_send``). A
        claim carrying its record's tag is won (a round trip for conflicts only); unread, the
        claims stay as they read."""
        lost = [i for i, ok in enumerate(won) if not ok]
        reads = [command(b"GETRANGE", keys[i], b"0", b"%d" % (len(tags[i]) - 1)) for i in lost]
        with contextlib.suppress(StoreUnavailable):
            held = await self._exchange(self._redis.claims, reads, len(reads))
            for i, value in zip(lost, held, strict=True):
                if value is not None and _bytes(value) == tags[i]:
                    won[i] = True

    async def release(
        self, tenant: str, task_uuid: str, upstream_uuid: str, replica: str | None = None
    ) -> None:
        """Give back a claim still held for ``upstream_uuid``, with its record (and its place
        in ``replica``'s open list)."""
        keys = [self.claim_key(tenant, task_uuid), self.open_key(replica or "")]
        tag = _tag(upstream_uuid)
        await self._call(lambda: self._release(keys=keys, args=[tag]))

    async def save(self, record: TaskRecord) -> None:
        await self.write([Write(record, True, False)], retention=0.0)

    async def finish(self, record: TaskRecord, retention: float) -> None:
        await self.write([Write(record, True, True)], retention=retention)

    async def write(
        self, writes: Sequence[Write], *, retention: float, replica: str | None = None
    ) -> list[str]:
        """Many records (open or final, as each is) in one round trip, and with them
        ``replica``'s list of open records; the upstream UUIDs of those Redis lost, to be
        written whole.

        A record written over its claim (every write of the gateway's but the first after a
        claim it made in this data set: ``generation``) is a plain ``SET XX``, whose nil says
        Redis lost the claim; the finished go off the open list and onto the finished list
        with a command each for all. The others go through a script of their own (``WRITE``):
        it reads before it writes. Each batch starts with the data set's probe: a flush seen
        there counts as a new ``generation`` too."""
        built = self._redis.incarnation.generation  # the data set the writes were decided in
        missing: list[str] = []
        for start in range(0, len(writes), BATCH):  # after an outage: in pieces, each in time
            part = writes[start : start + BATCH]
            missing += await self._write(part, retention, replica, built)
        return missing

    async def _write(
        self, writes: Sequence[Write], retention: float, replica: str | None, built: int
    ) -> list[str]:
        retention_ms = max(0, round(retention * 1000))
        encode = self._codec.encode
        expire, ttl = _bulk(b"%d" % retention_ms), _bulk(self._ttl_ms)
        incarnation = self._redis.incarnation
        # the probe, then each record's SET
        commands: list[bytes] = [incarnation.probe()]
        checked: list[str] = []  # their upstream UUIDs
        ended: list[bytes] = []  # the members of the final ones
        whole: list[bytes] = []  # the items of the records for WRITE
        whole_kinds = bytearray()
        for write in writes:
            record = write.record
            upstream = record.upstream_uuid
            key = self._claim_key(record.tenant, record.task.taskUUID)
            tag = _tag(upstream)
            data = (_LISTED if write.final else _OPEN) + encode(record)
            if write.whole or (write.final and not retention_ms):
                whole += (_bulk(tag + key), _bulk(data))
                if write.whole:
                    whole_kinds.append(70 if write.final else 79)  # F, O
                else:
                    whole_kinds.append(102)  # f
                continue
            commands.append(
                b"*6\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b%b\r\n$2\r\nXX\r\n$2\r\nPX\r\n%b"
                % (len(key), key, len(tag) + len(data), tag, data, expire if write.final else ttl)
            )  # nil: Redis lost the claim
            if write.final:
                ended.append(_bulk(tag + key))
            checked.append(upstream)
        index = self.open_key(replica).encode() if replica is not None else b""
        finished, cap = self._finished_key.encode(), b"%d" % self._max_retained
        replies = 2 + len(checked)
        counted = 0  # where the finished list's length is answered
        if ended:
            if index:
                commands += _variadic(b"SREM", [index], ended)
                replies += 1
            commands += _variadic(b"RPUSH", [finished], ended)
            replies += 1
            counted = replies - 1
        popping = self._over
        if popping:  # after the SETs: the pop deletes the records it pops
            slack = b"%d" % (self._max_retained // 100)  # none under 100: a bound of 1 keeps 1
            commands.append(command(b"EVAL", _OVER_SOURCE, b"1", finished, cap, slack))
            replies += 1
        if whole:
            fixed = [_WRITE_SOURCE, b"1", finished, b"%d" % retention_ms, cap, self._ttl_ms,
                     index, bytes(whole_kinds)]  # fmt: skip
            commands += _variadic(b"EVAL", fixed, whole)
            replies += 1
        answers = await self._redis.batch(self._redis.writes, b"".join(commands), replies, built)
        if incarnation.generation == built:  # else it may tell of the data set before
            incarnation.seen(answers[1])
        # past the count bound (and not popped below it in this batch): the next write pops
        self._over = not popping and counted > 0 and answers[counted] > self._max_retained
        # each record's SET answers nil where its claim is gone
        return [upstream for i, upstream in enumerate(checked) if answers[2 + i] is None]

    async def _exchange(self, pipe: RedisPipe, commands: list[bytes], replies: int) -> list[Any]:
        """``commands`` (packed) in one write on one of the store's pipelined connections
        (store/pipe.py), and their ``replies``: one round trip within the connection's deadline.
        No argument goes through redis-py's packer (a Python loop over each); scripts go by
        their source (``EVAL``: Redis keeps them compiled by their hash), so a Redis that
        restarted needs no second try. An error reply is raised once every reply is read."""
        return await self._redis.batch(pipe, b"".join(commands), replies)

    async def load(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        """The record under the claim (None: no claim, or a bare one)."""
        key = self.claim_key(tenant, task_uuid).encode()
        [value] = await self._redis.batch(self._redis.writes, command(b"GET", key), 1)
        return None if value is None else self._record(_bytes(value))

    def _record(self, value: bytes) -> TaskRecord | None:
        """The record of a key's value (tag, mark, record); None for a bare claim."""
        if not value:
            raise StoreUnavailable("a record in redis does not read: an empty value")
        start = value[0] + 2
        if len(value) < start:
            return None
        try:
            return self._codec.decode(value[start:])
        except msgspec.DecodeError as exc:  # another version's, or written by hand
            raise StoreUnavailable(f"a record in redis does not read: {exc}") from exc

    async def open_records(self, replica: str) -> list[TaskRecord]:
        """The open records ``replica`` listed (this replica's own, or a test's look)."""
        client = self._redis.client
        members = await self._call(lambda: client.smembers(self.open_key(replica)))
        return await self._listed(members)

    async def take_open(self, dead: str, replica: str) -> list[TaskRecord]:
        """A dead replica's open records, for ``replica`` to run: its list moved into
        ``replica``'s in one script, then the records read. Another takeover of ``dead``
        (after this one failed half way) finds nothing to run a second time."""
        keys = [self.open_key(dead), self.open_key(replica)]
        members = await self._call(lambda: self._take_open(keys=keys, args=[self._ttl_ms]))
        return await self._listed(members)

    async def _listed(self, members: Any) -> list[TaskRecord]:
        """The open records of open-list members, read in pipelined round trips (not a
        script: a long list does not hold Redis up for the other replicas)."""
        listed = []
        for member in sorted(_bytes(m) for m in members):
            n = member[0] + 1
            listed.append((member[:n], member[n:]))  # tag, key
        if not listed:
            return []
        replies: list[Any] = []
        for start in range(0, len(listed), BATCH):
            reads = [command(b"GET", key) for _, key in listed[start : start + BATCH]]
            replies += await self._exchange(self._redis.writes, reads, len(reads))
        records = []
        for (tag, _), value in zip(listed, replies, strict=True):
            if value is None:  # finished meanwhile and gone, or lapsed
                continue
            value = _bytes(value)
            if value[: len(tag)] != tag:
                continue  # the taskUUID is another task's now
            try:
                record = self._record(value)
            except StoreUnavailable as exc:  # one record's: the others are still taken over
                log.warning("an open record not taken over", error=str(exc))
                continue
            if record is not None and record.finished is None:
                records.append(record)
        return records

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.close()
