"""``SharedTasks`` in Redis (``store.url``): what several gateway replicas share about tasks.

Keys, under one prefix (``tenebra`` unless told; tenant and taskUUID escaped so that a ':' in a
tenant's name cannot make two tenants' keys meet):

- ``{prefix}:task:{tenant}:{taskUUID}``  string, the upstream UUID: the claim (SET NX)
- ``{prefix}:rec:{upstreamUUID}``        hash: ``data`` (the record, msgspec MessagePack) and
  ``claim`` (the claim's key, so that a trimmed record takes its claim with it)
- ``{prefix}:finished``                  sorted set of upstream UUIDs by finish time (Redis's
  own clock, microseconds): the count bound ``max_retained`` trims it from the oldest

An open record and its claim live at most ``open_ttl`` (a safety net: a replica that died with the
task and was never taken over); ``finish`` sets both to ``retention``. Steps that must be atomic
are Lua scripts (one round trip each; they touch keys they compute, so this is for a single Redis
or a primary with replicas, not Redis Cluster). Redis 5 or later (scripts read ``TIME``).

Every call keeps the connection's deadline (store/connection.py): a Redis that refuses, stalls
or fails raises ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.typing import EncodableT

from gateway.store.base import TaskRecord
from gateway.store.connection import RedisConnection, key_part
from gateway.store.shared import RecordCodec

__all__ = ["RedisSharedTasks"]

DAY = 86_400.0

# KEYS: claim keys; ARGV[1]: their TTL (ms); ARGV[1 + i]: the upstream UUID of KEYS[i].
_CLAIM = """
local won = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[i + 1], 'NX', 'PX', ARGV[1]) then won[i] = 1 else won[i] = 0 end
end
return won
"""

# KEYS[1]: claim, KEYS[2]: record, KEYS[3]: finished; ARGV[1]: upstream UUID.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 0
"""

# KEYS[1]: claim; ARGV[1]: the record keys' prefix.
_LOAD = """
local upstream = redis.call('GET', KEYS[1])
if not upstream then return false end
return redis.call('HGET', ARGV[1] .. upstream, 'data')
"""

# KEYS[1]: record, KEYS[2]: claim, KEYS[3]: finished; ARGV: data, retention (ms), max_retained,
# upstream UUID, the record keys' prefix. Returns how many were trimmed by the count bound.
_FINISH = """
local time = redis.call('TIME')
-- microseconds (no ties), formatted whole: Lua's own number format keeps 14 digits only
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local ms = tonumber(ARGV[2])
local upstream = ARGV[4]
if ms <= 0 then
  if redis.call('GET', KEYS[2]) == upstream then redis.call('DEL', KEYS[2]) end
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], upstream)
  return 0
end
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'claim', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ms)
-- a claim a Redis restarted empty lost comes back, unless another task took the taskUUID
local held = redis.call('GET', KEYS[2])
if held == upstream then redis.call('PEXPIRE', KEYS[2], ms)
elseif not held then redis.call('SET', KEYS[2], upstream, 'PX', ms) end
redis.call('ZADD', KEYS[3], string.format('%d', now), upstream)
-- entries finished longer than a retention ago have expired by their TTL: out of the count
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('(%d', now - ms * 1000))
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[3])
if over <= 0 then return 0 end
local gone = redis.call('ZPOPMIN', KEYS[3], over)
for i = 1, #gone, 2 do
  local record = ARGV[5] .. gone[i]
  local claim = redis.call('HGET', record, 'claim')
  if claim and redis.call('GET', claim) == gone[i] then redis.call('DEL', claim) end
  redis.call('DEL', record)
end
return over
"""


# Many records' saves and finishes. ARGV: retention (ms), max_retained, open ttl (ms), the
# replica's open list, the finished set, the record keys' prefix; then per record: kind (s: an
# open record, f: a final one), upstream UUID, claim key, data. Returns how many were trimmed.
_WRITE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local retention, cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local index, finished, prefix = ARGV[4], ARGV[5], ARGV[6]
local saved, ended = false, false
for i = 7, #ARGV, 4 do
  local upstream, claim, data = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local record = prefix .. upstream
  if ARGV[i] == 's' then
    redis.call('HSET', record, 'data', data, 'claim', claim)
    redis.call('PEXPIRE', record, ttl)
    -- a claim a Redis restarted empty lost comes back, unless another task took the taskUUID
    redis.call('SET', claim, upstream, 'NX', 'PX', ttl)
    redis.call('SADD', index, upstream)
    saved = true
  else
    redis.call('SREM', index, upstream)
    local held = redis.call('GET', claim)
    if retention <= 0 then
      if held == upstream then redis.call('DEL', claim) end
      redis.call('DEL', record)
      redis.call('ZREM', finished, upstream)
    else
      redis.call('HSET', record, 'data', data, 'claim', claim)
      redis.call('PEXPIRE', record, retention)
      if held == upstream then redis.call('PEXPIRE', claim, retention)
      elseif not held then redis.call('SET', claim, upstream, 'PX', retention) end
      redis.call('ZADD', finished, string.format('%d', now), upstream)
      ended = true
    end
  end
end
if saved then redis.call('PEXPIRE', index, ttl) end
if not ended then return 0 end
redis.call('ZREMRANGEBYSCORE', finished, '-inf', string.format('(%d', now - retention * 1000))
local over = redis.call('ZCARD', finished) - cap
if over <= 0 then return 0 end
local gone = redis.call('ZPOPMIN', finished, over)
for i = 1, #gone, 2 do
  local record = prefix .. gone[i]
  local claim = redis.call('HGET', record, 'claim')
  if claim and redis.call('GET', claim) == gone[i] then redis.call('DEL', claim) end
  redis.call('DEL', record)
end
return over
"""


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data  # the client does not decode


class RedisSharedTasks:
    def __init__(self, redis: RedisConnection, *, max_retained: int, open_ttl: float = DAY) -> None:
        self._redis = redis
        self._call = redis.call
        self._max_retained = max_retained
        self._open_ttl_ms = max(1, round(open_ttl * 1000))
        self._prefix = redis.prefix
        self._records = f"{redis.prefix}:rec:"
        self._finished_key = f"{redis.prefix}:finished"
        self._codec = RecordCodec()
        self._claim = redis.script(_CLAIM)
        self._release = redis.script(_RELEASE)
        self._load = redis.script(_LOAD)
        self._finish = redis.script(_FINISH)
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
    def open_ttl_ms(self) -> int:
        return self._open_ttl_ms

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

    async def claim(self, tenant: str, task_uuid: str, upstream_uuid: str) -> bool:
        [won] = await self.claim_many(tenant, [(task_uuid, upstream_uuid)])
        return won

    async def claim_many(self, tenant: str, claims: Sequence[tuple[str, str]]) -> list[bool]:
        return await self.claim_batch([(tenant, task, upstream) for task, upstream in claims])

    async def claim_batch(self, claims: Sequence[tuple[str, str, str]]) -> list[bool]:
        """``claim`` for each (tenant, taskUUID, upstream UUID), of any tenants, in order, in one
        round trip (the claims of every frame that arrived in one loop turn)."""
        if not claims:
            return []
        keys = [self.claim_key(tenant, task_uuid) for tenant, task_uuid, _ in claims]
        args: list[EncodableT] = [self._open_ttl_ms, *(upstream for _, _, upstream in claims)]
        won = await self._call(lambda: self._claim(keys=keys, args=args))
        return [bool(w) for w in won]

    async def release(self, tenant: str, task_uuid: str, upstream_uuid: str) -> None:
        keys = [
            self.claim_key(tenant, task_uuid),
            self.record_key(upstream_uuid),
            self._finished_key,
        ]
        await self._call(lambda: self._release(keys=keys, args=[upstream_uuid]))

    async def save(self, record: TaskRecord) -> None:
        claim = self.claim_key(record.tenant, record.task_uuid)
        key = self.record_key(record.upstream_uuid)
        data = self._codec.encode(record)

        async def write() -> Any:
            async with self._redis.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"data": data, "claim": claim})
                pipe.pexpire(key, self._open_ttl_ms)
                pipe.pexpire(claim, self._open_ttl_ms)
                return await pipe.execute()

        await self._call(write)

    async def load(self, tenant: str, task_uuid: str) -> TaskRecord | None:
        keys = [self.claim_key(tenant, task_uuid)]
        data = await self._call(lambda: self._load(keys=keys, args=[self._records]))
        return None if data is None else self._codec.decode(data)

    async def by_upstream(self, upstream_uuid: str) -> TaskRecord | None:
        key = self.record_key(upstream_uuid)
        data = await self._call(lambda: self._redis.client.hget(key, "data"))
        return None if data is None else self._codec.decode(_bytes(data))

    async def finish(self, record: TaskRecord, retention: float) -> None:
        keys = [
            self.record_key(record.upstream_uuid),
            self.claim_key(record.tenant, record.task_uuid),
            self._finished_key,
        ]
        args: list[EncodableT] = [
            self._codec.encode(record),
            max(0, round(retention * 1000)),
            self._max_retained,
            record.upstream_uuid,
            self._records,
        ]
        await self._call(lambda: self._finish(keys=keys, args=args))

    def open_key(self, replica: str) -> str:
        """The upstream UUIDs of the open records a replica runs: what a takeover finds."""
        return f"{self._prefix}:open:{key_part(replica)}"

    async def write(
        self,
        saves: Sequence[TaskRecord],
        finishes: Sequence[TaskRecord],
        *,
        retention: float,
        replica: str,
    ) -> None:
        """``save`` and ``finish`` for many records in one script (one round trip, and Redis's
        clock and the count bound read once), keeping ``replica``'s list of open records."""
        if not saves and not finishes:
            return
        encode = self._codec.encode
        args: list[EncodableT] = [
            max(0, round(retention * 1000)),
            self._max_retained,
            self._open_ttl_ms,
            self.open_key(replica),
            self._finished_key,
            self._records,
        ]
        for kind, records in ((b"s", saves), (b"f", finishes)):
            for record in records:
                args += (
                    kind,
                    record.upstream_uuid,
                    self.claim_key(record.tenant, record.task_uuid),
                    encode(record),
                )
        await self._call(lambda: self._write(args=args))

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
                    pipe.hget(self.record_key(upstream), "data")
                return await pipe.execute()

        records = []
        for data in await self._call(read):
            if data is not None:
                record = self._codec.decode(_bytes(data))
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
