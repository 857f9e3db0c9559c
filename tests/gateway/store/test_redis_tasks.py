"""The Redis task store's own layout (gateway/store/redis.py), past the shared contract: the batched
claims and writes the gateway uses (gateway.replication), the per-replica open lists, what a
Redis that lost its data leads to, and the count bound's trim of a batch. A real redis-server
(tests/redis_server.py), one key prefix per test."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

import gateway.store.redis
from gateway.store.base import Delivery, TaskRecord, TaskState
from gateway.store.parts import StoredRecord
from gateway.store.pipe import Incarnation, RedisPipe
from gateway.store.redis import RecordCodec, RedisSharedTasks, Write, _tag
from gateway.store.shared import StoreUnavailable
from protocol.frames import ErrorItem, ImageResult
from tests.compiled import pure_python_only
from tests.gateway.store.test_shared_contract import record
from tests.redis_server import start_redis, stop_redis
from tests.timing import MS


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisSharedTasks]:
    shared = RedisSharedTasks.from_url(
        redis_url, max_retained=1000, deadline=2000 * MS, prefix=f"test-{uuid.uuid4().hex}"
    )
    yield shared
    await shared.close()


def done(r: TaskRecord) -> TaskRecord:
    r.state, r.finished = TaskState.DONE, 2.5
    r.results = (
        ImageResult(
            taskType="imageInference",
            taskUUID=r.task_uuid,
            imageUUID=str(uuid.uuid4()),
            imageURL="http://127.0.0.1:9/i.png",
        ),
    )
    return r


def test_a_record_goes_out_as_its_structs_array() -> None:
    """A record goes out as its fields in one tuple (no Struct made for each): the same bytes
    as the Struct the loads decode, every field of the record in its place."""
    r = done(record("studio"))
    r.session, r.link, r.window_epoch, r.sends, r.key_id, r.cost, r.trace = (
        "s-1", 2, 3, 4, "key-1", 0.5, "00-trace",
    )  # fmt: skip
    r.error = ErrorItem(code="timeout", message="late", taskType="imageInference")
    r.deliveries = (Delivery(id="d-1", kind="webhook", target="http://127.0.0.1:9/hook"),)
    names = [f.name for f in msgspec.structs.fields(StoredRecord)]
    assert sorted(names) == sorted(f.name for f in msgspec.structs.fields(TaskRecord))
    # the layout replicas share: a record written by a replica of before reads the same
    assert names == [
        "tenant", "task", "upstream_uuid", "created", "session", "state", "finished", "link",
        "window_epoch", "sends", "results", "error", "deliveries", "key_id", "cost", "trace",
    ]  # fmt: skip
    codec = RecordCodec()
    for each in (r, record("studio")):  # and one as received
        stored = StoredRecord(**{name: getattr(each, name) for name in names})
        assert codec.encode(each) == msgspec.msgpack.encode(stored)
        assert codec.decode(codec.encode(each)) == each


async def test_a_claim_records_the_task_as_received_and_lists_it(store: RedisSharedTasks) -> None:
    records = [record("studio") for _ in range(3)]
    assert await store.create_batch(records, "a") == [True] * 3
    client = store.connection.client
    for r in records:  # one key each: the claim is the record
        assert await store.load(r.tenant, r.task_uuid) == r
    prefix = store.connection.prefix
    keys = [k async for k in client.scan_iter(f"{prefix}:*")]
    assert len(keys) == 3 + 2  # and the open list, the incarnation
    assert sorted(await client.smembers(store.open_key("a"))) == sorted(
        store.member(r.tenant, r.task_uuid, r.upstream_uuid) for r in records
    )
    taken = sorted(await store.open_records("a"), key=lambda r: r.created)
    assert sorted(r.upstream_uuid for r in taken) == sorted(r.upstream_uuid for r in records)
    # a claim another task won writes nothing and lists nothing
    again, other = record("studio", records[0].task_uuid), record("studio")
    assert await store.create_batch([again, other], "b") == [False, True]
    assert (await store.load(again.tenant, again.task_uuid)) == records[0]
    assert await client.smembers(store.open_key("b")) == {
        store.member(other.tenant, other.task_uuid, other.upstream_uuid)
    }
    # a member whose claim never came (a replica that died in its batch) is passed by
    await client.sadd(store.open_key("b"), store.member("studio", "never", "up-never"))
    assert [r.upstream_uuid for r in await store.open_records("b")] == [other.upstream_uuid]
    # finished: off the open list
    await store.write([Write(done(records[0]), False, True)], retention=60, replica="a")
    assert len(await store.open_records("a")) == 2
    # a takeover moves the list into the taker's: done again, by anyone, it finds nothing
    taken = await store.take_open("a", "c")
    assert sorted(r.upstream_uuid for r in taken) == sorted(r.upstream_uuid for r in records[1:])
    assert await store.open_records("a") == []
    assert await store.take_open("a", "d") == [] and await store.take_open("a", "c") == []
    assert sorted(r.upstream_uuid for r in await store.open_records("c")) == sorted(
        r.upstream_uuid for r in records[1:]
    )


async def test_a_record_not_as_received_is_claimed_with_its_state(store: RedisSharedTasks) -> None:
    r = record("studio")
    r.key_id, r.state = "0123456789ab", TaskState.QUEUED
    assert await store.create_batch([r], "a") == [True]
    assert await store.load(r.tenant, r.task_uuid) == r


async def test_writes_of_state_alone_then_final(store: RedisSharedTasks) -> None:
    r = record("studio")
    assert await store.create_batch([r], "a") == [True]
    r.state, r.link, r.sends = TaskState.PARTIAL, 0, 1
    assert await store.write([Write(r, False, False)], retention=60, replica="a") == []
    assert await store.load(r.tenant, r.task_uuid) == r
    assert await store.write([Write(done(r), False, True)], retention=60, replica="a") == []
    assert await store.load(r.tenant, r.task_uuid) == r
    client = store.connection.client
    assert 0 < await client.pttl(store.claim_key(r.tenant, r.task_uuid)) <= 60_000
    assert await store.open_records("a") == []


async def test_writes_after_redis_lost_the_claims_say_so_and_the_whole_write_restores(
    store: RedisSharedTasks,
) -> None:
    running, ending = record("studio"), record("studio")
    assert await store.create_batch([running, ending], "a") == [True, True]
    assert await store.write([Write(running, False, False)], retention=60, replica="a") == []
    await store.connection.client.flushdb()  # flushed under connections that stay up
    running.state = TaskState.PARTIAL
    writes = [Write(running, False, False), Write(done(ending), False, True)]
    missing = await store.write(writes, retention=60, replica="a")
    assert sorted(missing) == sorted([running.upstream_uuid, ending.upstream_uuid])
    assert store.connection.incarnation.generation == 1  # the batch's probe saw the flush
    assert await store.load(running.tenant, running.task_uuid) is None
    # written whole (gateway.replication does it at its next flush): claims and records back
    writes = [Write(running, True, False), Write(ending, True, True)]
    assert await store.write(writes, retention=60, replica="a") == []
    assert await store.load(running.tenant, running.task_uuid) == running
    assert await store.load(ending.tenant, ending.task_uuid) == ending
    assert [r.upstream_uuid for r in await store.open_records("a")] == [running.upstream_uuid]
    assert not await store.claim(running.tenant, running.task_uuid, "another")


async def test_a_whole_write_never_takes_a_claim_another_task_holds(
    store: RedisSharedTasks,
) -> None:
    mine = record("studio")
    assert await store.create_batch([mine], "a") == [True]
    assert await store.write([Write(mine, False, False)], retention=60, replica="a") == []
    await store.connection.client.flushdb()
    theirs = record("studio", mine.task_uuid)  # the same taskUUID, claimed meanwhile
    assert await store.create_batch([theirs], "b") == [True]
    for final in (False, True):
        writes = [Write(done(mine) if final else mine, True, final)]
        assert await store.write(writes, retention=60, replica="a") == []  # nothing to redo
        assert await store.load(mine.tenant, mine.task_uuid) == theirs
    assert await store.open_records("a") == []
    assert [r.upstream_uuid for r in await store.open_records("b")] == [theirs.upstream_uuid]
    # nor does a release
    await store.release(mine.tenant, mine.task_uuid, mine.upstream_uuid, "a")
    assert await store.load(mine.tenant, mine.task_uuid) == theirs


async def test_a_release_takes_its_member_off_the_open_list_even_once_its_claim_lapsed(
    store: RedisSharedTasks,
) -> None:
    """A claim given back late (Redis away until it lapsed) leaves no member behind: the open
    list is renewed by every claim batch, so a member left there would stay for good."""
    mine = record("studio")
    assert await store.create_batch([mine], "a") == [True]
    client = store.connection.client
    await client.delete(store.claim_key(mine.tenant, mine.task_uuid))  # lapsed
    await store.release(mine.tenant, mine.task_uuid, mine.upstream_uuid, "a")
    assert await client.smembers(store.open_key("a")) == set()


@pytest.mark.parametrize("final", [False, True])
async def test_after_a_restart_a_write_built_before_is_not_sent_to_the_new_data_set(
    store: RedisSharedTasks, redis_url: str, final: bool
) -> None:
    """Redis restarted empty and B took A's taskUUID meanwhile. A's write over its claim was
    built for a claim that is gone: sent, its ``SET XX`` would write A's record over B's, with
    A's retention. The connect that finds the
    new data set fails it unwritten and says every claim made before is gone (``generation``:
    gateway.replication then writes each record whole, which checks): A's record goes nowhere,
    B's claim keeps its expiry."""
    mine = record("studio")
    assert await store.create_batch([mine], "a") == [True]
    assert await store.write([Write(mine, False, False)], retention=5, replica="a") == []
    client = store.connection.client
    await client.flushdb()
    await client.client_kill_filter(_type="normal", skipme=True)  # a restart drops them all
    b = RedisSharedTasks.from_url(
        redis_url, max_retained=1000, deadline=2000 * MS, prefix=store.connection.prefix
    )
    try:
        theirs = record("studio", mine.task_uuid)
        assert await b.create_batch([theirs], "b") == [True]
        claim = store.claim_key(theirs.tenant, theirs.task_uuid)
        before = await client.pttl(claim)
        write = Write(done(mine) if final else mine, False, final)
        with pytest.raises(StoreUnavailable, match="another data set"):
            await store.write([write], retention=5, replica="a")
        assert store.connection.incarnation.generation == 1
        assert await store.write([Write(write.record, True, final)], retention=5) == []
        assert await client.pttl(claim) > before - 5000  # not 5 s: still the open claim's
        assert await store.load(theirs.tenant, theirs.task_uuid) == theirs
        assert await store.open_records("a") == []
    finally:
        await b.close()


# a common hardening: every command but the @dangerous ones (INFO, KEYS, FLUSHALL, CONFIG ...)
NO_INFO = ("--user", "gw", "on", ">secret", "~*", "&*", "+@all", "-@dangerous")


@pytest.mark.parametrize("user", ["default", "without INFO"])
async def test_a_restart_from_a_snapshot_is_another_data_set(tmp_path: Path, user: str) -> None:
    """Redis restarted from a snapshot that lacks A's last claim, and B took its taskUUID. The
    incarnation key came back with the snapshot; the server's ``run_id`` did not (or, for a
    user that may not read it, every reconnect counts as another server): a new data set, and
    A's write over its claim is not sent (it would write A's record over B's)."""
    binary = shutil.which("redis-server")
    assert binary is not None
    kept = ("--dir", str(tmp_path), *(NO_INFO if user != "default" else ()))
    server, port = start_redis(binary, *kept)
    url = f"redis://{'gw:secret@' if user != 'default' else ''}127.0.0.1:{port}"
    admin = aioredis.Redis(port=port)
    a, b = (RedisSharedTasks.from_url(url, max_retained=100, prefix="p") for _ in range(2))
    try:
        assert await a.create_batch([record("studio")], "a") == [True]
        await admin.save()  # the snapshot: the incarnation key, the first claim
        mine = record("studio")
        assert await a.create_batch([mine], "a") == [True]
        blind = user != "default"
        assert await a.write([Write(mine, False, False)], retention=5, replica="a") == []
        assert a.connection.incarnation.blind is blind
        server.kill()  # a crash: the last claim is not in the snapshot
        server.wait()
        stop_redis(server)
        server, _ = start_redis(binary, *kept, port=port)
        theirs = record("studio", mine.task_uuid)
        assert await b.create_batch([theirs], "b") == [True]
        with pytest.raises(StoreUnavailable, match="another data set"):
            await a.write([Write(done(mine), False, True)], retention=5, replica="a")
        assert a.connection.incarnation.generation == 1
        assert await admin.pttl(a.claim_key(mine.tenant, mine.task_uuid)) > 60_000
        assert await b.load(theirs.tenant, theirs.task_uuid) == theirs
    finally:
        await a.close()
        await b.close()
        await admin.aclose()
        stop_redis(server)


@pure_python_only(gateway.store.redis)
@pure_python_only(gateway.store.pipe)
async def test_a_write_in_pieces_keeps_the_data_set_it_was_decided_in(
    store: RedisSharedTasks, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarts between two pieces of one write: the second piece, decided for the
    data set before like the first, is not sent to the new one; the first piece's probe (the
    data set before) is not taken for one more change."""
    monkeypatch.setattr(gateway.store.redis, "BATCH", 2)
    records = [record("studio") for _ in range(3)]
    assert await store.create_batch(records, "a") == [True] * 3
    writes = [Write(r, False, False) for r in records]
    assert await store.write(writes, retention=5, replica="a") == []
    client, pipe = store.connection.client, store.connection.writes
    exchange, b = (
        pipe.exchange,
        RedisSharedTasks.from_url(redis_url, max_retained=100, prefix=store.connection.prefix),
    )
    last = records[2]
    claim = store.claim_key(last.tenant, last.task_uuid)

    restarted = False

    async def restarted_after_the_first(data: bytes, replies: int, built: int = -1) -> list[Any]:
        nonlocal restarted
        answers: list[Any] = await exchange(data, replies, built)
        if not restarted:
            restarted = True
            await client.flushdb()
            await client.client_kill_filter(_type="normal", skipme=True)
            assert await b.create_batch([record("studio", last.task_uuid)], "b") == [True]
        return answers

    monkeypatch.setattr(pipe, "exchange", restarted_after_the_first)
    try:
        with pytest.raises(StoreUnavailable, match="another data set"):
            await store.write([Write(done(r), False, True) for r in records], retention=5)
        assert store.connection.incarnation.generation == 1
        assert await client.pttl(claim) > 60_000  # B's, not cut to A's retention
        assert await b.load(last.tenant, last.task_uuid) != last
    finally:
        await b.close()


async def test_a_batch_sent_again_after_a_dropped_reply_wins_its_own_claims(
    store: RedisSharedTasks,
) -> None:
    """Redis ran the batch but the connection dropped before its replies, and ``_send`` sent it
    again: its claims read as taken, by themselves. They are won (the client would otherwise be
    told conflictTaskUUID about its own task, for ``open_ttl``); another task's are not."""
    mine = record("studio")
    assert await store.create_batch([mine], "a") == [True]
    other = record("studio", mine.task_uuid)  # the same taskUUID, another task
    assert await store.create_batch([mine, other], "a") == [True, False]
    members = await store.connection.client.smembers(store.open_key("a"))
    assert members == {store.member(mine.tenant, mine.task_uuid, mine.upstream_uuid)}


@pure_python_only(gateway.store.redis)
async def test_claims_won_stand_when_tidying_after_a_lost_one_fails(
    store: RedisSharedTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's claims are in; the round trips after it (reading a lost claim's tag, taking
    its member off the open list) fail: the claims won are still reported won, not dropped as
    unavailable."""
    held = record("studio")
    assert await store.create_batch([held], "a") == [True]
    exchange, calls = store._exchange, 0

    async def failing_second(pipe: RedisPipe, commands: list[bytes], replies: int) -> list[object]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise StoreUnavailable("redis: gone after the batch")
        return await exchange(pipe, commands, replies)

    monkeypatch.setattr(store, "_exchange", failing_second)
    fresh, again = record("studio"), record("studio", held.task_uuid)
    assert await store.create_batch([fresh, again], "a") == [True, False]
    assert calls == 3
    assert await store.load(fresh.tenant, fresh.task_uuid) == fresh


async def test_past_the_count_bound_the_next_write_pops_the_earliest(redis_url: str) -> None:
    """The write that takes the finished list past ``max_retained`` learns it from the list's
    length; the next one pops it down (to the bound itself: under 100, 1% of it is none)."""
    store = RedisSharedTasks.from_url(
        redis_url, max_retained=3, deadline=2000 * MS, prefix=f"test-{uuid.uuid4().hex}"
    )
    try:
        first = [record("studio") for _ in range(2)]
        batch = [record("studio") for _ in range(4)]
        last = record("studio")
        assert await store.create_batch([*first, *batch, last], "a") == [True] * 7
        await store.write([Write(done(r), False, True) for r in first], retention=60, replica="a")
        # the first one's claim lapsed and another task took its taskUUID: the pop keeps it
        client = store.connection.client
        await client.delete(store.claim_key(first[0].tenant, first[0].task_uuid))
        other = record("studio", first[0].task_uuid)
        assert await store.create_batch([other], "b") == [True]
        await store.write([Write(done(r), False, True) for r in batch], retention=60, replica="a")
        finished = store._finished_key
        assert await client.llen(finished) == 6  # past, by this write's records at most
        await store.write([Write(done(last), False, True)], retention=60, replica="a")
        assert await client.llen(finished) == 3
        # the earliest finished (the first one's taskUUID another's now), then two of the batch
        assert await store.load(other.tenant, other.task_uuid) == other
        assert await store.load(first[1].tenant, first[1].task_uuid) is None
        assert await store.claim(first[1].tenant, first[1].task_uuid, "free again")
        kept = [r for r in batch if await store.load(r.tenant, r.task_uuid) == r]
        assert len(kept) == 2
        assert await store.load(last.tenant, last.task_uuid) == last
        one = record("studio")  # past again, by this write's one
        assert await store.create_batch([one], "a") == [True]
        await store.write([Write(done(one), False, True)], retention=60, replica="a")
        assert await client.llen(finished) == 4
        assert await store.load(last.tenant, last.task_uuid) == last
    finally:
        await store.close()


async def test_the_finished_are_listed_in_the_order_redis_saw_them_finish(
    store: RedisSharedTasks,
) -> None:
    """Whether written whole (a script) or over their claims: the count bound pops what
    finished first."""
    early, late = record("studio"), record("studio")
    assert await store.create_batch([early, late], "a") == [True, True]
    assert await store.write([Write(done(early), True, True)], retention=60, replica="a") == []
    assert await store.write([Write(done(late), False, True)], retention=60, replica="a") == []
    finished = await store.connection.client.lrange(store._finished_key, 0, -1)
    assert finished == [store.member(r.tenant, r.task_uuid, r.upstream_uuid) for r in (early, late)]


@pytest.mark.parametrize("first", ["over its claim", "whole"])
async def test_a_finished_record_written_again_is_listed_once(redis_url: str, first: str) -> None:
    """A delivery's outcome after the task ended writes its record again (whole: replication
    stores no final record): its mark says it is listed, so it is not listed twice, and the
    bound does not pop it for its first listing while counting it twice."""
    store = RedisSharedTasks.from_url(
        redis_url, max_retained=2, deadline=2000 * MS, prefix=f"test-{uuid.uuid4().hex}"
    )
    try:
        one, two = record("studio"), record("studio")
        assert await store.create_batch([one, two], "a") == [True, True]
        writes = [Write(done(r), first == "whole", True) for r in (one, two)]
        assert await store.write(writes, retention=60, replica="a") == []
        one.deliveries = (Delivery(id="d-1", kind="webhook", target="http://127.0.0.1:9/hook"),)
        for _ in range(3):
            assert await store.write([Write(one, True, True)], retention=60, replica="a") == []
        assert await store.connection.client.llen(store._finished_key) == 2
        three = record("studio")  # past the bound: the earliest goes, the other stays
        assert await store.create_batch([three], "a") == [True]
        assert await store.write([Write(done(three), False, True)], retention=60) == []
        assert await store.write([Write(three, True, True)], retention=60) == []  # the pop
        assert await store.load(one.tenant, one.task_uuid) is None
        assert await store.load(two.tenant, two.task_uuid) == two
        assert await store.load(three.tenant, three.task_uuid) == three
    finally:
        await store.close()


async def test_an_open_write_renews_the_safety_net(store: RedisSharedTasks) -> None:
    """An open record lives ``open_ttl`` from its last write; a final one its retention."""
    r = record("studio")
    assert await store.create_batch([r], "a") == [True]
    key, client = store.claim_key(r.tenant, r.task_uuid), store.connection.client
    await client.pexpire(key, 10_000)
    r.state = TaskState.PARTIAL
    assert await store.write([Write(r, False, False)], retention=5, replica="a") == []
    assert await client.pttl(key) > 86_000_000  # a day again
    assert await store.write([Write(done(r), False, True)], retention=5, replica="a") == []
    assert 0 < await client.pttl(key) <= 5_000


async def test_keys_of_the_layout_before_are_neither_read_nor_written(
    store: RedisSharedTasks,
) -> None:
    """Replicas stopped to upgrade leave the old layout's keys behind, its finished set among
    them (no expiry): the new layout's keys are others, and a value that is no record (written
    by hand, or by another version) reads as the store unavailable, not as a crash; a takeover
    passes it by and takes the others."""
    client, prefix = store.connection.client, store.connection.prefix
    await client.zadd(f"{prefix}:finished", {b"old": 1.0})
    r, odd = record("studio"), record("studio")
    assert await store.create_batch([r, odd], "a") == [True, True]
    assert await store.write([Write(done(r), False, True)], retention=60, replica="a") == []
    assert await store.load(r.tenant, r.task_uuid) == r
    key = store.claim_key(odd.tenant, odd.task_uuid)
    await client.set(key, _tag(odd.upstream_uuid) + b"o" + msgspec.msgpack.encode((odd.tenant,)))
    with pytest.raises(StoreUnavailable, match="does not read"):
        await store.load(odd.tenant, odd.task_uuid)
    other = record("studio")
    assert await store.create_batch([other], "a") == [True]
    assert [t.upstream_uuid for t in await store.take_open("a", "b")] == [other.upstream_uuid]
    await client.set(key, b"")
    with pytest.raises(StoreUnavailable, match="does not read"):
        await store.load(odd.tenant, odd.task_uuid)


def test_an_incarnation_tells_another_server_by_its_run_id_or_by_any_reconnect_without() -> None:
    """A restart gives a new ``run_id``; where INFO is refused (an ACL, a BUSY server), a
    connect once the store's connections were up counts as another server, that one only."""
    incarnation = Incarnation(b"p:incarnation")
    assert not incarnation.connected(b"v", b"# Server\r\nrun_id:aaa\r\n")
    refused = ResponseError("NOPERM this user has no permissions to run the 'info' command")
    assert not incarnation.connected(b"v", refused)  # the other of the two first ones
    assert incarnation.blind
    incarnation.opening = False
    assert not incarnation.connected(b"v", b"run_id:aaa\r\n")  # not blind for good
    assert incarnation.connected(b"v", refused)
    assert incarnation.connected(b"v", b"run_id:bbb\r\n")
    assert incarnation.connected(b"w", b"run_id:bbb\r\n")  # flushed: another key
    assert incarnation.generation == 3


async def test_a_batch_larger_than_a_script_can_unpack_at_once(store: RedisSharedTasks) -> None:
    """Past Lua's stack (8,000 values): the pop past the count bound goes in chunks."""
    records = [record("studio") for _ in range(4100)]
    assert await store.create_batch(records, "a") == [True] * len(records)
    client = store.connection.client
    assert await client.scard(store.open_key("a")) == len(records)
    writes = [Write(done(r), False, True) for r in records]
    assert await store.write(writes, retention=60, replica="a") == []
    assert await client.scard(store.open_key("a")) == 0
    # max_retained 1000: the write's pieces pop it down to 1% under, its last one leaves it
    # past by its own records, and the next write pops it down again
    finished = store._finished_key
    assert await client.llen(finished) == 990 + 100
    extra = record("studio")
    assert await store.create_batch([extra], "a") == [True]
    assert await store.write([Write(done(extra), False, True)], retention=60, replica="a") == []
    assert await client.llen(finished) == 990
    # 1% under the bound: the next ten finished need no pop
    more = [record("studio") for _ in range(10)]
    assert await store.create_batch(more, "a") == [True] * 10
    writes = [Write(done(r), False, True) for r in more]
    assert await store.write(writes, retention=60, replica="a") == []
    assert await client.llen(finished) == 1000 and not store._over
    prefix = store.connection.prefix
    claims = [k async for k in client.scan_iter(f"{prefix}:record:*", count=1000)]
    assert len(claims) == 1000
    assert await store.load(extra.tenant, extra.task_uuid) == extra  # among the latest finished
    loaded = [await store.load(r.tenant, r.task_uuid) for r in records]
    assert sum(1 for r, got in zip(records, loaded, strict=True) if got == r) == 989
    assert loaded.count(None) == 3111


async def test_an_error_reply_raises_and_leaves_the_connection_clean(redis_url: str) -> None:
    """Replies are read to the last even past an error: the one pooled connection serves the
    next batch right."""
    store = RedisSharedTasks.from_url(
        redis_url, max_retained=10, max_connections=1, prefix=f"test-{uuid.uuid4().hex}"
    )
    try:
        client = store.connection.client
        await client.set(store.open_key("broken"), "not a set")
        with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
            await store.create_batch([record("studio")], "broken")
        r = record("studio")
        assert await store.create_batch([r], "a") == [True]
        assert await store.load(r.tenant, r.task_uuid) == r
        assert await store.write([Write(done(r), False, True)], retention=60, replica="a") == []
        assert await store.load(r.tenant, r.task_uuid) == r
    finally:
        await store.close()
