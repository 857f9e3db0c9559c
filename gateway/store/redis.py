"""``SharedTasks`` in Redis (``store.url``): what several gateway replicas share about tasks.

Keys, under one prefix (``tenebra`` unless told; tenant and taskUUID escaped so that a ':' in a
tenant's name cannot make two tenants' keys meet):

- ``{prefix}:task:{tenant}:{taskUUID}``  string, the upstream UUID: the claim (SET NX)
- ``{prefix}:rec:{upstreamUUID}``        hash: ``static`` (what never changes: tenant, the task,
  its UUIDs, when it came), ``state`` (what does: state, results, error, deliveries), both
  MessagePack, and ``claim`` (the claim's key, so that a trimmed record takes its claim with it).
  A record is written whole once, then its state alone: the task (prompt and all) is not sent
  to Redis again at every change
- ``{prefix}:finished``                  sorted set of upstream UUIDs by finish time (Redis's
  own clock, microseconds): the count bound ``max_retained`` trims it from the oldest
- ``{prefix}:open:{replica}``            set of the upstream UUIDs a replica runs (its takeover)

An open record and its claim live at most ``open_ttl`` (a safety net: a replica that died with the
task and was never taken over); a final write sets both to ``retention``. Steps that must be
atomic are Lua scripts, and a batch (the claims of a loop turn, a flush's records) is one
script with its items in one MessagePack argument (Redis's ``cmsgpack``): the client packs one
argument, not four per record. Scripts touch keys they compute, so this is for a single Redis or
a primary with replicas, not Redis Cluster. Redis 5 or later (scripts read ``TIME``).

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

# ARGV[1]: TTL (ms), ARGV[2]: the record keys' prefix, ARGV[3]: the replica's open list ('' for
# none), ARGV[4]: [[claim key, upstream UUID, static, state], ...] packed, the record parts
# optional: a claim won with them writes its record whole at once, listed as open. 1 for each
# claim won, else 0.
_CLAIM = """
local ttl, prefix, index, won, listed = ARGV[1], ARGV[2], ARGV[3], {}, false
for i, claim in ipairs(cmsgpack.unpack(ARGV[4])) do
  if redis.call('SET', claim[1], claim[2], 'NX', 'PX', ttl) then
    won[i] = 1
    if claim[3] ~= nil then
      local record = prefix .. claim[2]
      redis.call('HSET', record, 'static', claim[3], 'state', claim[4], 'claim', claim[1])
      redis.call('PEXPIRE', record, ttl)
      if index ~= '' then redis.call('SADD', index, claim[2]); listed = true end
    end
  else
    won[i] = 0
  end
end
if listed then redis.call('PEXPIRE', index, ttl) end
return won
"""

# KEYS[1]: claim, KEYS[2]: record, KEYS[3]: finished, KEYS[4]: the replica's open list (or
# any key, unused); ARGV[1]: upstream UUID.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[1])
end
return 0
"""

# KEYS[1]: claim; ARGV[1]: the record keys' prefix. The record's {static, state}, or false.
_LOAD = """
local upstream = redis.call('GET', KEYS[1])
if not upstream then return false end
return redis.call('HMGET', ARGV[1] .. upstream, 'static', 'state')
"""

# A flush. ARGV: retention (ms), max_retained, open ttl (ms), the replica's open list ('' for
# none), the finished set, the record keys' prefix, then [[kind, upstream UUID, claim key,
# state, static], ...] packed: kind o (open) or f (final); static only where the record is not
# in Redis yet. Returns the upstream UUIDs of records whose state came without their static
# part and that Redis does not have (it restarted empty): they are to be written whole again.
_WRITE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local retention, cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local index, finished, prefix = ARGV[4], ARGV[5], ARGV[6]
local listed, ended, missing = false, false, {}
for _, item in ipairs(cmsgpack.unpack(ARGV[7])) do
  local kind, upstream, claim, state, static = item[1], item[2], item[3], item[4], item[5]
  local record = prefix .. upstream
  if static == nil and redis.call('EXISTS', record) == 0 then
    missing[#missing + 1] = upstream
  elseif kind == 'o' then
    if static ~= nil then
      redis.call('HSET', record, 'static', static, 'state', state, 'claim', claim)
      redis.call('PEXPIRE', record, ttl)
      -- a claim a Redis restarted empty lost comes back, unless another task took it
      redis.call('SET', claim, upstream, 'NX', 'PX', ttl)
      if index ~= '' then redis.call('SADD', index, upstream); listed = true end
    else
      redis.call('HSET', record, 'state', state)
    end
  else
    if index ~= '' then redis.call('SREM', index, upstream) end
    local held = redis.call('GET', claim)
    if retention <= 0 then
      if held == upstream then redis.call('DEL', claim) end
      redis.call('DEL', record)
      redis.call('ZREM', finished, upstream)
    else
      if static ~= nil then
        redis.call('HSET', record, 'static', static, 'state', state, 'claim', claim)
      else
        redis.call('HSET', record, 'state', state)
      end
      redis.call('PEXPIRE', record, retention)
      if held == upstream then redis.call('PEXPIRE', claim, retention)
      elseif not held then redis.call('SET', claim, upstream, 'PX', retention) end
      redis.call('ZADD', finished, string.format('%d', now), upstream)
      ended = true
    end
  end
end
if listed then redis.call('PEXPIRE', index, ttl) end
if ended then
  redis.call('ZREMRANGEBYSCORE', finished, '-inf', string.format('(%d', now - retention * 1000))
  local over = redis.call('ZCARD', finished) - cap
  if over > 0 then
    local gone = redis.call('ZPOPMIN', finished, over)
    for i = 1, #gone, 2 do
      local record = prefix .. gone[i]
      local claim = redis.call('HGET', record, 'claim')
      if claim and redis.call('GET', claim) == gone[i] then redis.call('DEL', claim) end
      redis.call('DEL', record)
    end
  end
end
return missing
"""

# MessagePack by hand for the write script's items: Redis's cmsgpack reads no bin type, so the
# record parts (bytes) go as str, which it takes as the bytes they are
_ARRAY_4, _ARRAY_5 = b"\x94", b"\x95"
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
        self._records = f"{redis.prefix}:rec:"
        self._finished_key = f"{redis.prefix}:finished"
        self._parts = RecordParts()
        self._pack = msgspec.msgpack.Encoder().encode
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
        return f"{self._prefix}:task:{key_part(tenant)}:{key_part(task_uuid)}"

    def record_key(self, upstream_uuid: str) -> str:
        return self._records + upstream_uuid

    def open_key(self, replica: str) -> str:
        """The upstream UUIDs of the open records a replica runs: what a takeover finds."""
        return f"{self._prefix}:open:{key_part(replica)}"

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
        packed = self._pack([(self.claim_key(t, task), up) for t, task, up in claims])
        args: list[EncodableT] = [self._open_ttl_ms, self._records, "", packed]
        won = await self._call(lambda: self._claim(args=args))
        return [bool(w) for w in won]

    async def create_batch(self, records: Sequence[TaskRecord], replica: str) -> list[bool]:
        """Claim each record's (tenant, taskUUID) and, where won, write the record whole and
        list it as ``replica``'s: in one round trip, a loop turn's new tasks of every frame.
        A task is then known to every replica before it is dispatched, with no write of its
        own; a claim lost writes nothing."""
        if not records:
            return []
        static, state = self._parts.static, self._parts.state
        packed = [_array(len(records))]
        for record in records:
            packed += (
                _ARRAY_4,
                _str(self.claim_key(record.tenant, record.task_uuid).encode()),
                _str(record.upstream_uuid.encode()),
                _str(static(record)),
                _str(state(record)),
            )
        args: list[EncodableT] = [
            self._open_ttl_ms,
            self._records,
            self.open_key(replica),
            b"".join(packed),
        ]
        won = await self._call(lambda: self._claim(args=args))
        return [bool(w) for w in won]

    async def release(
        self, tenant: str, task_uuid: str, upstream_uuid: str, replica: str | None = None
    ) -> None:
        """Give back a claim still held for ``upstream_uuid``, with its record (and its place
        in ``replica``'s open list)."""
        keys = [
            self.claim_key(tenant, task_uuid),
            self.record_key(upstream_uuid),
            self._finished_key,
            self.open_key(replica if replica is not None else ""),
        ]
        await self._call(lambda: self._release(keys=keys, args=[upstream_uuid]))

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
        static, state = self._parts.static, self._parts.state
        packed = [_array(len(writes))]
        for write in writes:
            record = write.record
            packed += (
                _ARRAY_5 if write.whole else _ARRAY_4,
                _FINAL if write.final else _OPEN,
                _str(record.upstream_uuid.encode()),
                _str(self.claim_key(record.tenant, record.task_uuid).encode()),
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
            self._records,
            b"".join(packed),
        ]
        missing = await self._call(lambda: self._write(args=args))
        return [_bytes(m).decode() for m in missing]

    async def load(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        keys = [self.claim_key(tenant, task_uuid)]
        parts = await self._call(lambda: self._load(keys=keys, args=[self._records]))
        return self._joined(parts) if parts else None

    async def by_upstream(self, upstream_uuid: str) -> TaskRecord | None:
        key = self.record_key(upstream_uuid)
        parts = await self._call(lambda: self._redis.client.hmget(key, ["static", "state"]))
        return self._joined(parts)

    def _joined(self, parts: Sequence[Any]) -> TaskRecord | None:
        static, state = parts
        if static is None or state is None:
            return None
        return self._parts.join(_bytes(static), _bytes(state))

    async def open_records(self, replica: str) -> list[TaskRecord]:
        """The open records ``replica`` listed (a dead one's, for its takeover), read in one
        pipeline."""
        client = self._redis.client
        members = await self._call(lambda: client.smembers(self.open_key(replica)))
        upstreams = sorted(_bytes(m).decode() for m in members)
        if not upstreams:
            return []

        async def read() -> Any:
            async with client.pipeline(transaction=False) as pipe:
                for upstream in upstreams:
                    pipe.hmget(self.record_key(upstream), ["static", "state"])
                return await pipe.execute()

        records = []
        for parts in await self._call(read):
            record = self._joined(parts)
            if record is not None and record.open:
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
