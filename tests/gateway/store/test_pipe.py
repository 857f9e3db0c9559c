"""The task store's pipelined connection (gateway/store/pipe.py), against a real redis-server."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

from gateway.store.connection import RedisConnection
from gateway.store.pipe import Incarnation, RedisPipe, _tls
from gateway.store.shared import StoreUnavailable
from tests.timing import MS


def packed(*command: str) -> bytes:
    args = [a.encode() for a in command]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[RedisPipe]:
    pipe = RedisPipe(redis_url, deadline=2000 * MS)
    try:
        yield pipe
    finally:
        await pipe.close()


async def test_concurrent_batches_each_get_their_own_replies(pipe: RedisPipe) -> None:
    key = f"test-{uuid.uuid4().hex}"

    async def batch(n: int) -> list[Any]:
        data = b"".join(packed("INCR", key) for _ in range(n)) + packed("ECHO", f"end {n}")
        return await pipe.exchange(data, n + 1)

    answers = await asyncio.gather(*(batch(n) for n in (3, 1, 50, 2)))
    for n, replies in zip((3, 1, 50, 2), answers, strict=True):
        assert len(replies) == n + 1 and replies[-1] == f"end {n}".encode()
    counts = [c for replies in answers for c in replies[:-1]]
    assert sorted(counts) == list(range(1, 57))  # every INCR once, each reply to its batch


async def test_an_error_reply_takes_its_place_and_the_batch_goes_on(pipe: RedisPipe) -> None:
    key = f"test-{uuid.uuid4().hex}"
    data = packed("SET", key, "text") + packed("INCR", key) + packed("GET", key)
    ok, error, value = await pipe.exchange(data, 3)
    assert ok == b"OK" and isinstance(error, ResponseError) and value == b"text"


async def test_a_dropped_connection_is_replaced_and_the_batch_goes_again(
    pipe: RedisPipe, redis_url: str
) -> None:
    [mine] = await pipe.exchange(packed("CLIENT", "ID"), 1)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        assert await admin.client_kill_filter(_id=str(mine)) == 1  # as a Redis restart would
    finally:
        await admin.aclose()
    [again] = await pipe.exchange(packed("CLIENT", "ID"), 1)
    assert again != mine


async def test_a_batch_built_for_a_data_set_that_is_gone_is_not_written(redis_url: str) -> None:
    """Every connect reads the data set's incarnation. After a restart without persistence (a
    flush and dropped connections here), a batch built for the data set before fails unwritten:
    what it assumes of its claims no longer holds. Batches that assume nothing go as before."""
    prefix = f"test-{uuid.uuid4().hex}"
    incarnation = Incarnation(f"{prefix}:incarnation".encode())
    pipe = RedisPipe(redis_url, deadline=2000 * MS, incarnation=incarnation)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        assert await pipe.exchange(packed("PING"), 1, built=0) == [b"PONG"]
        first = incarnation.value
        assert first is not None and incarnation.generation == 0
        assert await admin.get(f"{prefix}:incarnation") == first
        await admin.flushdb()
        await admin.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(ConnectionError, match="another data set"):
            await pipe.exchange(packed("SET", f"{prefix}:x", "1"), 1, built=0)
        assert incarnation.generation == 1 and incarnation.value not in (None, first)
        assert await admin.exists(f"{prefix}:x") == 0
        assert await pipe.exchange(packed("SET", f"{prefix}:x", "1"), 1, built=1) == [b"OK"]
        assert await pipe.exchange(packed("PING"), 1) == [b"PONG"]  # built for any data set
        # seen again by a probe (a flush under a connection that stays): the value it set
        await admin.flushdb()
        _, value = await pipe.exchange(incarnation.probe(), 2)
        assert incarnation.seen(value) and incarnation.generation == 2
        assert not incarnation.seen(value) and not incarnation.seen(None)
    finally:
        await pipe.close()
        await admin.aclose()


async def test_a_redis_out_of_memory_still_takes_connections(redis_url: str) -> None:
    """Past ``maxmemory`` (noeviction) the probe's SET is refused: the connect goes on (reads
    still work), and the incarnation is read at a later connect."""
    incarnation = Incarnation(f"test-{uuid.uuid4().hex}:incarnation".encode())
    pipe = RedisPipe(redis_url, deadline=2000 * MS, incarnation=incarnation)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.config_set("maxmemory", "1")
        assert await pipe.exchange(packed("PING"), 1) == [b"PONG"]
        assert incarnation.value is None and incarnation.generation == 0
    finally:
        await admin.config_set("maxmemory", "0")
        await pipe.close()
        await admin.aclose()


async def test_a_batch_past_its_deadline_closes_the_connection_for_those_after_it(
    redis_url: str,
) -> None:
    """Redis stalls (CLIENT PAUSE): the batch's deadline (the pipe's own timer) raises
    StoreUnavailable, and once Redis answers again the next batch goes on a new connection, not
    behind the stalled one."""
    connection = RedisConnection.from_url(redis_url, deadline=50 * MS)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        pipe = connection.writes
        [before] = await connection.batch(pipe, packed("CLIENT", "ID"), 1)  # both connected
        await admin.client_pause(round(5000 * MS * 1000), all=False)  # writes held: not reads
        key = f"test-{uuid.uuid4().hex}"
        with pytest.raises(StoreUnavailable, match="did not answer within"):
            await connection.batch(pipe, packed("SET", key, "1"), 1)
        await admin.client_unpause()
        [after] = await connection.batch(pipe, packed("CLIENT", "ID"), 1)
        assert after != before
    finally:
        await admin.client_unpause()
        await admin.aclose()
        await connection.close()


async def test_credentials_and_database_come_from_the_url(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    user, secret = f"piper-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    address = urlsplit(redis_url).netloc
    await admin.acl_setuser(
        user, enabled=True, passwords=[f"+{secret}"], keys=["*"], commands=["+@all"]
    )
    pipe = RedisPipe(f"redis://{user}:{secret}@{address}/5", deadline=2000 * MS)
    wrong = RedisPipe(f"redis://{user}:not-{secret}@{address}/0", deadline=2000 * MS)
    try:
        key = f"test-{uuid.uuid4().hex}"
        assert await pipe.exchange(packed("SET", key, "in five"), 1) == [b"OK"]
        assert await admin.get(key) is None
        assert await aioredis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/5").get(key) == (
            b"in five"
        )
        with pytest.raises(AuthenticationError):
            await wrong.exchange(packed("PING"), 1)
    finally:
        await pipe.close()
        await wrong.close()
        await admin.acl_deluser(user)
        await admin.aclose()


async def test_a_reply_nobody_asked_for_closes_the_connection(pipe: RedisPipe) -> None:
    """A batch that says it wants fewer replies than it gets (a bug) must not shift the replies
    of the batches after it: once the stray reply is in, the connection is closed, and the next
    batch has a new one."""
    [before] = await pipe.exchange(packed("CLIENT", "ID"), 1)
    assert await pipe.exchange(packed("PING") + packed("PING"), 1) == [b"PONG"]
    await asyncio.sleep(100 * MS)  # the stray reply arrives
    [after] = await pipe.exchange(packed("CLIENT", "ID"), 1)
    assert isinstance(after, int) and after != before


async def test_a_closed_pipe_fails_what_waits_and_never_sends_it_again(redis_url: str) -> None:
    """A batch in flight when the store closes fails; it is not written again on a new
    connection (its INCR runs once), and nothing connects after the close."""
    pipe = RedisPipe(redis_url, deadline=2000 * MS)
    admin = aioredis.Redis.from_url(redis_url)
    key = f"test-{uuid.uuid4().hex}"
    try:
        await pipe.exchange(packed("PING"), 1)  # connected
        await admin.client_pause(round(5000 * MS * 1000), all=False)  # the INCR waits
        waiting = asyncio.ensure_future(pipe.exchange(packed("INCR", key), 1))
        await asyncio.sleep(50 * MS)
        await pipe.close()
        with pytest.raises(ConnectionError):
            await waiting
        await admin.client_unpause()
        await asyncio.sleep(100 * MS)
        assert await admin.get(key) in (None, b"1")  # once at most: never again
        with pytest.raises(ConnectionError):
            await pipe.exchange(packed("PING"), 1)
    finally:
        await admin.client_unpause()
        await admin.aclose()


async def test_claims_and_writes_go_on_connections_of_their_own(redis_url: str) -> None:
    """A new task's claim never waits behind a long flush of records on one TCP stream."""
    connection = RedisConnection.from_url(redis_url)
    try:
        [claims] = await connection.claims.exchange(packed("CLIENT", "ID"), 1)
        [writes] = await connection.writes.exchange(packed("CLIENT", "ID"), 1)
        assert claims != writes
    finally:
        await connection.close()


def test_tls_takes_the_url_options_as_redis_py_does() -> None:
    assert _tls(dict(parse_url("redis://h:6379/0"))) is None
    strict = _tls(dict(parse_url("rediss://h:6379/0")))
    assert strict is not None and strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    relaxed = _tls(dict(parse_url("rediss://h:6379/0?ssl_cert_reqs=none")))
    assert relaxed is not None and relaxed.verify_mode == ssl.CERT_NONE
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    if not Path(bundle).exists():
        pytest.skip(f"no CA bundle at {bundle} to load")
    private = _tls(
        dict(parse_url(f"rediss://h:6379/0?ssl_ca_certs={bundle}&ssl_check_hostname=false"))
    )
    assert private is not None and not private.check_hostname
    assert private.cert_store_stats()["x509_ca"] > 0  # the URL's CA file, loaded


async def test_a_batch_waits_for_a_reply(pipe: RedisPipe) -> None:
    with pytest.raises(ValueError):
        await pipe.exchange(packed("PING"), 0)


async def test_a_connect_waits_for_another_within_its_deadline(redis_url: str) -> None:
    """Callers that find no connection wait for the one being made, within their deadline, not
    for as long as it takes."""
    pipe = RedisPipe(redis_url, deadline=50 * MS)
    try:
        async with pipe._connecting:  # a connect that hangs
            waiting = asyncio.ensure_future(pipe.exchange(packed("PING"), 1))
            await asyncio.wait([waiting], timeout=2000 * MS)
            assert waiting.done()  # while the other connect still holds on
            assert isinstance(waiting.exception(), TimeoutError)
        assert await pipe.exchange(packed("PING"), 1) == [b"PONG"]
    finally:
        await pipe.close()


async def test_a_batch_late_for_its_deadline_is_not_written_and_fails_alone(
    pipe: RedisPipe,
) -> None:
    """A batch that reaches its connection past its deadline (after a connect, a retry) fails
    without being written, and the batches waiting on the connection keep it."""
    [before] = await pipe.exchange(packed("CLIENT", "ID"), 1)
    protocol = pipe._replies
    assert protocol is not None
    late = asyncio.get_running_loop().time() - 1
    with pytest.raises(TimeoutError):
        await pipe._write(protocol, packed("PING"), 1, late)
    assert not protocol.lost
    assert await pipe.exchange(packed("CLIENT", "ID"), 1) == [before]
