"""The Redis connection every replica's shared state goes through (gateway/store/connection.py),
against a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.store.connection import RedisConnection
from gateway.store.shared import StoreUnavailable
from tests.timing import MS

# holds Redis for ARGV[1] µs: another client's slow command
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1])
return 1
"""


async def test_a_command_redis_answers_late_is_not_sent_again(redis_url: str) -> None:
    """Redis busy for longer than the deadline: the call fails, and the command it sent runs
    once (sent again, a script that appends frames would append them twice)."""
    deadline = 300 * MS
    connection = RedisConnection.from_url(redis_url, deadline=deadline)
    admin = aioredis.Redis.from_url(redis_url)
    key = f"test-{uuid.uuid4().hex}"
    try:
        await connection.ping()  # a pooled connection, as on a replica that ran a while
        stall = asyncio.ensure_future(admin.eval(BUSY, 0, round(deadline * 1.5 * 1e6)))
        await asyncio.sleep(30 * MS)  # the busy script runs
        with pytest.raises(StoreUnavailable, match=r"did not answer|TimeoutError"):
            await connection.call(lambda: connection.client.incr(key))
        await stall
        assert await admin.get(key) == b"1"
    finally:
        await admin.aclose()
        await connection.close()
