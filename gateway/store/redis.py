"""``SharedTasks`` in Redis (``store.url``): what several gateway replicas share about tasks.

Keys, under one prefix (``tenebra`` unless told; tenant and taskUUID escaped so that a ':' in a
tenant's name cannot make two tenants' keys meet):

- ``{prefix}:task:{tenant}:{taskUUID}``  string: the claim, and the record's part that never
  changes. A *tag* (one byte, the upstream UUID's length, then the upstream UUID) and the
  static part (tenant, the task, its UUIDs, when it came; MessagePack). Written once with
  ``SET NX``: one command claims the taskUUID and records the task. A bare claim (``claim``,
  no record) is the tag alone
- ``{prefix}:state:{upstreamUUID}``      string: what changes (state, results, error,
  deliveries; MessagePack), written at each change after the claim. None yet reads as a task
  just received: a claim writes no state
- ``{prefix}:finished``                  sorted set of finished records by finish time (Redis's
  own clock, microseconds): the count bound ``max_retained`` trims it from the oldest
- ``{prefix}:open:{replica}``            set of the open records a replica runs (its takeover)

A member of the last two is a record's tag then its claim's key, so a takeover and a trim
find both of a record's keys without a read. An open record lives at most ``open_ttl`` from
its claim (a safety net: a replica that died with the task and was never taken over); a final
write sets it to ``retention``. The trim deletes a claim only while it is still that record's:
a taskUUID whose claim lapsed may have been claimed again by another task.

Redis restarted empty (no persistence): finished tasks are gone for every replica but the one
that ran them; an open task's next write finds its claim gone, and it is written whole again
(claim, static part, state, open list), unless another task took its taskUUID meanwhile.
Redis must not evict keys (``maxmemory-policy noeviction``): a claim evicted is a taskUUID
that can be billed twice, a state evicted reads as a task just received.

Steps that must be atomic are Lua scripts, and a batch (the claims of a loop turn, a flush's
records) is one script with its items in one MessagePack argument (Redis's ``cmsgpack``): the
client packs one argument, not several per record, and a batch's sets and sorted set take one
command each (its members in chunks of ``_CHUNK``, under Lua's stack limit), not one per
record: a task costs Redis three keyed commands (claim; state and claim expiry at its end).
Scripts touch keys they compute, so this is for a single Redis or a primary with replicas,
not Redis Cluster. Redis 5 or later (scripts read ``TIME``).

Every call keeps the connection's deadline (store/connection.py): a Redis that refuses, stalls
or fails raises ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from redis.typing import EncodableT

from gateway.store.base import TaskRecord
from gateway.store.connection import RedisConnection, key_part
from gateway.store.shared import RecordParts

__all__ = ["RedisSharedTasks", "Write"]

DAY = 86_400.0

# Members per SADD, SREM or DEL, and ZADD arguments, per call: Lua's ``unpack`` fails past its
# C stack (8,000 values in Redis's Lua 5.1)
_CHUNK = 4000

# ARGV[1]: open ttl (ms), ARGV[2]: the replica's open list ('' for none), ARGV[3]: the state
# keys' prefix, ARGV[4]: [[claim key, tag .. static, state], ...] packed, the static part
# absent for a bare claim, the state for a record as it was received. A string of '1' for each
# claim won, else '0'.
_CLAIM = """
local ttl, index, prefix, won, listed = ARGV[1], ARGV[2], ARGV[3], {}, {}
for i, claim in ipairs(cmsgpack.unpack(ARGV[4])) do
  local key, value = claim[1], claim[2]
  if redis.call('SET', key, value, 'NX', 'PX', ttl) then
    won[i] = '1'
    local n = string.byte(value) + 1
    if claim[3] then redis.call('SET', prefix .. string.sub(value, 2, n), claim[3], 'PX', ttl) end
    if index ~= '' and #value > n then listed[#listed + 1] = string.sub(value, 1, n) .. key end
  else
    won[i] = '0'
  end
end
if #listed > 0 then
  for i = 1, #listed, 4000 do
    redis.call('SADD', index, unpack(listed, i, math.min(i + 3999, #listed)))
  end
  redis.call('PEXPIRE', index, ttl)
end
return table.concat(won)
"""

# KEYS[1]: claim, KEYS[2]: state, KEYS[3]: finished, KEYS[4]: the replica's open list (or any
# key, unused); ARGV[1]: the record's tag.
_RELEASE = """
local held, tag = redis.call('GET', KEYS[1]), ARGV[1]
if held and string.sub(held, 1, #tag) == tag then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], tag .. KEYS[1])
  redis.call('SREM', KEYS[4], tag .. KEYS[1])
end
return 0
"""

# KEYS[1]: claim; ARGV[1]: the state keys' prefix. {claim, state} ({claim} with no state yet),
# or false for no claim or a bare one.
_LOAD = """
local held = redis.call('GET', KEYS[1])
if not held then return false end
local n = string.byte(held) + 1
if #held == n then return false end
return {held, redis.call('GET', ARGV[1] .. string.sub(held, 2, n))}
"""

# A flush. ARGV: retention (ms), max_retained, open ttl (ms), the replica's open list ('' for
# none), the finished set, the state keys' prefix, then [[kind, member, state, static], ...]
# packed: kind o (open) or f (final); member the record's tag .. its claim key; static only
# where the record is written whole (not in Redis yet, or not known to be). Returns the
# upstream UUIDs of records written by their state alone whose claim Redis does not have (it
# restarted empty): they are to be written whole again. A record written whole whose taskUUID
# another task claimed meanwhile is written nowhere.
_WRITE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local retention, cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local index, finished, prefix = ARGV[4], ARGV[5], ARGV[6]
local stamp = string.format('%d', now)
local listed, unlisted, ended, gone, missing = {}, {}, {}, {}, {}
for _, item in ipairs(cmsgpack.unpack(ARGV[7])) do
  local final, member, state, static = item[1] == 'f', item[2], item[3], item[4]
  local n = string.byte(member) + 1
  local claim, upstream = string.sub(member, n + 1), string.sub(member, 2, n)
  local expiry, ours = ttl, false
  if final then expiry = ARGV[1] end
  if final and retention <= 0 then
    local held = redis.call('GET', claim)
    if held and string.sub(held, 1, n) == string.sub(member, 1, n) then
      redis.call('DEL', claim)
    end
    redis.call('DEL', prefix .. upstream)
    gone[#gone + 1] = member
  elseif static then
    -- whole: its claim back where Redis lost it, or its own completed (a bare claim, a record
    -- taken over), never another task's
    local tag = string.sub(member, 1, n)
    ours = redis.call('SET', claim, tag .. static, 'NX', 'PX', expiry)
    if not ours then
      ours = string.sub(redis.call('GET', claim), 1, n) == tag
      if ours then redis.call('SET', claim, tag .. static, 'PX', expiry) end
    end
    if ours and not final and index ~= '' then listed[#listed + 1] = member end
  elseif final then
    ours = redis.call('PEXPIRE', claim, expiry) == 1
    if not ours then missing[#missing + 1] = upstream end
  else
    ours = redis.call('EXISTS', claim) == 1
    if not ours then missing[#missing + 1] = upstream end
  end
  if ours then
    redis.call('SET', prefix .. upstream, state, 'PX', expiry)
    if final then
      unlisted[#unlisted + 1] = member
      ended[#ended + 1] = stamp
      ended[#ended + 1] = member
    end
  end
end
if index ~= '' then
  for i = 1, #gone, 4000 do
    redis.call('SREM', index, unpack(gone, i, math.min(i + 3999, #gone)))
  end
  for i = 1, #unlisted, 4000 do
    redis.call('SREM', index, unpack(unlisted, i, math.min(i + 3999, #unlisted)))
  end
  for i = 1, #listed, 4000 do
    redis.call('SADD', index, unpack(listed, i, math.min(i + 3999, #listed)))
  end
  if #listed > 0 then redis.call('PEXPIRE', index, ttl) end
end
for i = 1, #gone, 4000 do
  redis.call('ZREM', finished, unpack(gone, i, math.min(i + 3999, #gone)))
end
if #ended > 0 then
  for i = 1, #ended, 4000 do
    redis.call('ZADD', finished, unpack(ended, i, math.min(i + 3999, #ended)))
  end
  redis.call('ZREMRANGEBYSCORE', finished, '-inf', string.format('(%d', now - retention * 1000))
  local over = redis.call('ZCARD', finished) - cap
  if over > 0 then
    -- the earliest finished go, each claim only while it is still theirs
    local popped, tags, claims = redis.call('ZPOPMIN', finished, over), {}, {}
    for i = 1, #popped, 2 do
      local member = popped[i]
      local n = string.byte(member) + 1
      tags[#tags + 1] = string.sub(member, 1, n)
      claims[#claims + 1] = string.sub(member, n + 1)
    end
    for i = 1, #claims, 2000 do  -- two keys each to delete
      local last = math.min(i + 1999, #claims)
      local held, doomed = redis.call('MGET', unpack(claims, i, last)), {}
      for j = i, last do
        local tag, value = tags[j], held[j - i + 1]
        doomed[#doomed + 1] = prefix .. string.sub(tag, 2)
        if value and string.sub(value, 1, #tag) == tag then doomed[#doomed + 1] = claims[j] end
      end
      redis.call('DEL', unpack(doomed))
    end
  end
end
return missing
"""

# MessagePack by hand for the scripts' items: Redis's cmsgpack reads no bin type, so the record
# parts (bytes) go as str, which it takes as the bytes they are
_ARRAY_2, _ARRAY_3, _ARRAY_4 = b"\x92", b"\x93", b"\x94"
_OPEN, _FINAL = b"\xa1o", b"\xa1f"


def _str(data: bytes) -> bytes:
    size = len(data)
    if size < 32:
        return bytes((0xA0 | size,)) + data
    if size < 256:
        return b"\xd9" + bytes((size,)) + data
    if size < 65536:
        return b"\xda" + size.to_bytes(2, "big") + data
    return b"\xdb" + size.to_bytes(4, "big") + data


def _array(size: int) -> bytes:
    if size < 16:
        return bytes((0x90 | size,))
    if size < 65536:
        return b"\xdc" + size.to_bytes(2, "big")
    return b"\xdd" + size.to_bytes(4, "big")


def _tag(upstream_uuid: str) -> bytes:
    """What a record's keys and members start with: the upstream UUID's length (one byte, so
    the script finds where it ends), then the UUID."""
    data = upstream_uuid.encode()
    return bytes((len(data),)) + data


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data  # the client does not decode


class Write(msgspec.Struct, frozen=True, gc=False):
    """One record of a flush: whole (its static part too) the first time, else its state;
    final (its retention starts) or open."""

    record: TaskRecord
    whole: bool
    final: bool


class RedisSharedTasks:
    def __init__(self, redis: RedisConnection, *, max_retained: int, open_ttl: float = DAY) -> None:
        self._redis = redis
        self._call = redis.call
        self._max_retained = max_retained
        self._open_ttl_ms = max(1, round(open_ttl * 1000))
        self._prefix = redis.prefix
        self._claims = f"{redis.prefix}:task:"
        self._states = f"{redis.prefix}:state:"
        self._member = self.member
        self._finished_key = f"{redis.prefix}:finished"
        self._parts = RecordParts()
        self._claim = redis.script(_CLAIM)
        self._release = redis.script(_RELEASE)
        self._load = redis.script(_LOAD)
        self._write = redis.script(_WRITE)

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
        return f"{self._claims}{key_part(tenant)}:{key_part(task_uuid)}"

    def state_key(self, upstream_uuid: str) -> str:
        return self._states + upstream_uuid

    def open_key(self, replica: str) -> str:
        """The open records a replica runs (tag .. claim key): what a takeover finds."""
        return f"{self._prefix}:open:{key_part(replica)}"

    def member(self, tenant: str, task_uuid: str, upstream_uuid: str) -> bytes:
        """A record's member of the finished set and of the open lists: its tag, then its
        claim's key. (One string, made at once: the upstream UUID is ASCII, shorter than 128,
        so its length is one byte in UTF-8.)"""
        return (
            f"{chr(len(upstream_uuid))}{upstream_uuid}{self._claims}"
            f"{key_part(tenant)}:{key_part(task_uuid)}"
        ).encode()

    async def claim(self, tenant: str, task_uuid: str, upstream_uuid: str) -> bool:
        [won] = await self.claim_many(tenant, [(task_uuid, upstream_uuid)])
        return won

    async def claim_many(self, tenant: str, claims: Sequence[tuple[str, str]]) -> list[bool]:
        return await self.claim_batch([(tenant, task, upstream) for task, upstream in claims])

    async def claim_batch(self, claims: Sequence[tuple[str, str, str]]) -> list[bool]:
        """``claim`` for each (tenant, taskUUID, upstream UUID), of any tenants, in order, in one
        round trip."""
        if not claims:
            return []
        packed = [_array(len(claims))]
        for tenant, task_uuid, upstream_uuid in claims:
            packed += (
                _ARRAY_2,
                _str(self.claim_key(tenant, task_uuid).encode()),
                _str(_tag(upstream_uuid)),
            )
        return await self._claimed(b"".join(packed), "")

    async def create_batch(self, records: Sequence[TaskRecord], replica: str) -> list[bool]:
        """Claim each record's (tenant, taskUUID) and, where won, write the record whole and
        list it as ``replica``'s: in one round trip, a loop turn's new tasks of every frame.
        A task is then known to every replica before it is dispatched, with no write of its
        own; a claim lost writes nothing. A record as it was received (the gateway's case)
        writes no state: none reads as that."""
        if not records:
            return []
        static, state, fresh = self._parts.static, self._parts.state, self._parts.fresh
        packed = [_array(len(records))]
        for record in records:
            key = _str(self.claim_key(record.tenant, record.task_uuid).encode())
            head = _str(_tag(record.upstream_uuid) + static(record))
            if fresh(record):
                packed += (_ARRAY_2, key, head)
            else:
                packed += (_ARRAY_3, key, head, _str(state(record)))
        return await self._claimed(b"".join(packed), self.open_key(replica))

    async def _claimed(self, packed: bytes, index: str) -> list[bool]:
        args: list[EncodableT] = [self._open_ttl_ms, index, self._states, packed]
        won = _bytes(await self._call(lambda: self._claim(args=args)))
        return [w == 49 for w in won]  # b'1'

    async def release(
        self, tenant: str, task_uuid: str, upstream_uuid: str, replica: str | None = None
    ) -> None:
        """Give back a claim still held for ``upstream_uuid``, with its record (and its place
        in ``replica``'s open list)."""
        keys = [
            self.claim_key(tenant, task_uuid),
            self.state_key(upstream_uuid),
            self._finished_key,
            self.open_key(replica if replica is not None else ""),
        ]
        tag = _tag(upstream_uuid)
        await self._call(lambda: self._release(keys=keys, args=[tag]))

    async def save(self, record: TaskRecord) -> None:
        await self.write([Write(record, True, False)], retention=0.0)

    async def finish(self, record: TaskRecord, retention: float) -> None:
        await self.write([Write(record, True, True)], retention=retention)

    async def write(
        self, writes: Sequence[Write], *, retention: float, replica: str | None = None
    ) -> list[str]:
        """Many records (open or final, as each is) in one script, and with them ``replica``'s
        list of open records; the upstream UUIDs of those Redis lost, to be written whole."""
        if not writes:
            return []
        static, state, member = self._parts.static, self._parts.state, self._member
        packed = [_array(len(writes))]
        for write in writes:
            record = write.record
            packed += (
                _ARRAY_4 if write.whole else _ARRAY_3,
                _FINAL if write.final else _OPEN,
                _str(member(record.tenant, record.task_uuid, record.upstream_uuid)),
                _str(state(record)),
            )
            if write.whole:
                packed.append(_str(static(record)))
        args: list[EncodableT] = [
            max(0, round(retention * 1000)),
            self._max_retained,
            self._open_ttl_ms,
            self.open_key(replica) if replica is not None else "",
            self._finished_key,
            self._states,
            b"".join(packed),
        ]
        missing = await self._call(lambda: self._write(args=args))
        return [_bytes(m).decode() for m in missing]

    async def load(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        """One round trip: the claim, then the state of the record it names."""
        keys = [self.claim_key(tenant, task_uuid)]
        parts = await self._call(lambda: self._load(keys=keys, args=[self._states]))
        if not parts:
            return None
        return self._joined(_bytes(parts[0]), parts[1] if len(parts) > 1 else None)

    def _joined(self, claim: bytes, state: bytes | str | None) -> TaskRecord:
        """The record of a claim's value (tag, static part) and its state (None: not yet)."""
        return self._parts.join(claim[claim[0] + 1 :], None if state is None else _bytes(state))

    async def open_records(self, replica: str) -> list[TaskRecord]:
        """The open records ``replica`` listed (a dead one's, for its takeover), read in one
        pipeline (not a script: a long list does not hold Redis up for the other replicas)."""
        client = self._redis.client
        members = await self._call(lambda: client.smembers(self.open_key(replica)))
        listed = []
        for member in sorted(_bytes(m) for m in members):
            n = member[0] + 1
            listed.append((member[:n], member[n:], member[1:n]))  # tag, claim key, upstream
        if not listed:
            return []

        async def read() -> Any:
            async with client.pipeline(transaction=False) as pipe:
                for _, claim, upstream in listed:
                    pipe.get(claim)
                    pipe.get(self._states.encode() + upstream)
                return await pipe.execute()

        replies = await self._call(read)
        records = []
        for i, (tag, _, _) in enumerate(listed):
            claim, state = replies[2 * i], replies[2 * i + 1]
            if claim is None:  # finished meanwhile and gone, or lapsed
                continue
            claim = _bytes(claim)
            if claim[: len(tag)] != tag or len(claim) == len(tag):
                continue  # the taskUUID is another task's now
            record = self._joined(claim, state)
            if record.open:
                records.append(record)
        return records

    async def forget_open(self, replica: str) -> None:
        """The list of a replica whose records were taken over."""
        client = self._redis.client
        await self._call(lambda: client.delete(self.open_key(replica)))

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.close()
