"""One pipelined connection to Redis for the task store's batches (store/redis.py).

A batch (a loop turn's claims, a flush's records) is hundreds of commands packed by hand and
written at once; its replies come back as one stream of bytes. Read through redis-py's pooled
connections, each reply cost a chain of coroutine calls in Python (a third of what the store
cost the gateway per task); here the replies of every batch are parsed by hiredis, in C, as the
bytes arrive (``data_received``), and a batch's caller wakes once, with all of them.

Batches of concurrent callers (the claims and the flush) follow one another on the connection
without waiting for each other: Redis answers in the order it reads, so each batch takes the
next ``replies`` replies. A batch whose deadline passes (a timer of the pipe's: twice the
store's deadline, a connect then the batch) closes the connection: the batches after it fail
at once rather than wait behind a Redis that stalls, and the next batch connects again. A
connection that drops fails the batches waiting on it (``ConnectionError``); whether Redis ran
them is not known, which the store's callers allow for (a claim reads as its own when it
carries its record's tag).

Every connect reads which data set Redis holds (its ``Incarnation``: a key that a restart
without persistence, or a flush, takes away, and the first connect after sets anew). A batch
built for one data set (``built``: the store's writes of records over their claims, which
assume their claims are there) is not written once another is seen: it fails unwritten, and
the store builds the next one for the new data set.

Connects with the URL's address, TLS (``rediss://``), credentials and database, each step
within the deadline. What redis-py's client does beyond that (RESP3, client-side caching,
Sentinel) is not used by the store's batches.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from typing import Any, cast

import hiredis
import structlog
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

__all__ = ["Incarnation", "RedisPipe", "command"]

log = structlog.get_logger("tenebra.store")


def command(*args: bytes) -> bytes:
    """One command in Redis's own protocol (RESP), packed by hand: a batch is hundreds of
    arguments, which redis-py's asyncio client would pack one by one in Python."""
    return b"*%d\r\n%b" % (len(args), b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args))


class Incarnation:
    """Which data set a Redis holds, as the store's connections last saw it: the server's
    ``run_id`` (every restart makes a new one: a data set reloaded from a snapshot or an
    append-only file may lack its last writes; where ``INFO`` is refused, every connect once
    the store's connections were up counts as another server), and the value of ``key``,
    which a flush takes away and whoever finds it missing sets to a random one (``probe``). A
    proxy that keeps the store's connections open across a failover to a replica that lags is
    not seen: the failover must drop them (Redis's own, Sentinel's and Cluster's do).
    ``generation`` counts the changes seen: a claim made before a change may be gone, or
    another task's by now (a taskUUID claimed again in the new data set)."""

    __slots__ = ("blind", "generation", "key", "opening", "server", "value")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.blind = False  # INFO was refused at least once (said once in the log)
        # until the store's connections are all up (store/connection.py): nothing was claimed
        # before, so a connect then is to the data set the claims will be made in
        self.opening = True
        self.server: bytes | None = None
        self.value: bytes | None = None
        self.generation = 0

    def probe(self) -> bytes:
        """Two commands (two replies, the second the value): set it if missing, then read it."""
        fresh = os.urandom(12).hex().encode()
        return command(b"SET", self.key, fresh, b"NX") + command(b"GET", self.key)

    def connected(self, value: Any, info: Any) -> bool:
        """A connect's replies: the probe's value and ``INFO server``; whether it found another
        data set than the one seen before (the first one seen is no change)."""
        server = _run_id(info)
        if server is None and not self.blind:  # an ACL that refuses INFO, or a BUSY server
            log.warning("redis refused INFO: a reconnect counts as a new data set")
            self.blind = True
        return self.seen(value, server, again=server is None and not self.opening)

    def seen(self, value: Any, server: bytes | None = None, again: bool = False) -> bool:
        """Whether ``value`` (a probe's second reply) or ``server`` (a connect's ``run_id``;
        ``again``: a connect with no run_id to read, past ``opening``) is another data set than
        the one seen before (the first one seen is no change)."""
        changed = again
        if server is not None and server != self.server:
            changed = self.server is not None
            self.server = server
        if isinstance(value, bytes) and value != self.value:
            changed = changed or self.value is not None
            self.value = value
        if changed:
            self.generation += 1
        return changed


def _run_id(info: Any) -> bytes | None:
    """The ``run_id`` of an ``INFO server`` reply."""
    if isinstance(info, bytes):
        for line in info.splitlines():
            if line.startswith(b"run_id:"):
                return line[7:]
    return None


class _Replies(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ResponseError)
        # the batches written and not yet answered, in order: replies wanted, those read, waiter
        self.waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        gets = self._reader.gets
        waiting = self.waiting
        while waiting:
            wanted, answers, future = waiting[0]
            while len(answers) < wanted:
                reply = gets()
                if reply is False:  # the rest of it is still on its way (RESP2 has no false)
                    return
                answers.append(reply)
            waiting.popleft()
            if not future.done():  # else its caller gave up: its replies are read all the same
                future.set_result(answers)
        if gets() is not False:  # a reply nobody asked for: the stream cannot be trusted
            self.close(ConnectionError("redis sent a reply no command asked for"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError(f"redis closed the connection: {exc or 'end of stream'}"))

    def close(self, reason: Exception) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()
        while self.waiting:
            _, _, future = self.waiting.popleft()
            if not future.done():
                future.set_exception(reason)


class RedisPipe:
    def __init__(
        self, url: str, *, deadline: float, incarnation: Incarnation | None = None
    ) -> None:
        self._options: dict[str, Any] = dict(parse_url(url))
        self._deadline = deadline
        self.incarnation = incarnation
        self._replies: _Replies | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    async def exchange(self, data: bytes, replies: int, built: int = -1) -> list[Any]:
        """Write ``data`` (packed commands) and return their ``replies`` replies, error replies
        as ``ResponseError`` in their place, within twice the deadline (a connect, then the
        batch) or ``TimeoutError``. A connection a Redis restart closed is replaced, and the
        batch written on it once more (at most once); not once the pipe is closed, nor once
        the incarnation's ``generation`` is past ``built`` (-1: any data set will do)."""
        if replies <= 0:
            raise ValueError("a batch waits for at least one reply")
        loop = asyncio.get_running_loop()
        until = loop.time() + 2 * self._deadline
        for attempt in (1, 2):
            if self._closed:
                raise ConnectionError("the store is closing")
            protocol = self._replies
            if protocol is None or protocol.lost:
                protocol = await self._connect(min(until, loop.time() + self._deadline))
            if built >= 0 and self.incarnation is not None and self.incarnation.generation > built:
                raise ConnectionError("redis holds another data set now (restarted or flushed)")
            try:
                return await self._write(protocol, data, replies, until)
            except ConnectionError:
                if attempt == 2 or self._closed:
                    raise
        raise AssertionError("unreachable")

    async def connect(self) -> None:
        """A connection, if there is none, within the deadline."""
        protocol = self._replies
        if protocol is None or protocol.lost:
            await self._connect(asyncio.get_running_loop().time() + self._deadline)

    async def _write(
        self, protocol: _Replies, data: bytes, replies: int, until: float
    ) -> list[Any]:
        """The deadline is a timer on the loop, not ``asyncio.timeout``: that one is two
        interpreted coroutines and a handle per batch, about 3 µs on every round trip."""
        loop = asyncio.get_running_loop()
        if loop.time() >= until:  # late (a connect, a retry): not written, nothing else fails
            raise TimeoutError(f"redis did not answer within {2 * self._deadline:g} s")
        future: asyncio.Future[list[Any]] = loop.create_future()
        if protocol.lost or protocol.transport is None:
            raise ConnectionError("redis connection closed")
        protocol.waiting.append((replies, [], future))
        protocol.transport.write(data)
        timer = loop.call_at(until, _expired, protocol, future, 2 * self._deadline)
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up: what follows must not wait behind it
            if future.cancelled() or not future.done():  # not when its replies were all in
                protocol.close(ConnectionError("an earlier batch on the connection was given up"))
            raise
        finally:
            timer.cancel()

    async def _connect(self, until: float) -> _Replies:
        loop = asyncio.get_running_loop()
        # one connection for every caller that finds none; waiting for it within the deadline
        async with asyncio.timeout_at(until), self._connecting:
            protocol = self._replies
            if protocol is not None and not protocol.lost:
                return protocol
            options = self._options
            if "path" in options:
                _, protocol = await loop.create_unix_connection(_Replies, options["path"])
            else:
                _, protocol = await loop.create_connection(
                    _Replies,
                    options.get("host", "localhost"),
                    options.get("port", 6379),
                    ssl=_tls(options),
                )
            await self._hello(protocol, options, until)
            if self._closed:  # closed while this connected: it is not kept
                protocol.close(ConnectionError("the store is closing"))
                raise ConnectionError("the store is closing")
            self._replies = protocol
            return protocol

    async def _hello(self, protocol: _Replies, options: dict[str, Any], until: float) -> None:
        """Credentials and database, as the URL gives them; then which data set Redis holds."""
        commands: list[list[bytes]] = []
        password = options.get("password")
        if password is not None:
            username = options.get("username")
            auth = [b"AUTH", *([username.encode()] if username else []), password.encode()]
            commands.append(auth)
        db = int(options.get("db", 0) or 0)
        if db:
            commands.append([b"SELECT", b"%d" % db])
        incarnation = self.incarnation
        if not commands and incarnation is None:
            return
        data = b"".join(command(*c) for c in commands)
        wanted = len(commands)
        if incarnation is not None:
            data += command(b"INFO", b"server") + incarnation.probe()
            wanted += 3
        answers = await self._write(protocol, data, wanted, until)
        for answer in answers[: len(commands)]:
            if isinstance(answer, ResponseError):
                protocol.close(ConnectionError("redis refused the connection's setup"))
                raise AuthenticationError(str(answer))
        if incarnation is not None:  # a probe refused (out of memory) tells nothing: not kept
            incarnation.connected(answers[-1], answers[-3])

    async def close(self) -> None:
        """For good: the batches waiting fail, and no batch connects again."""
        self._closed = True
        protocol, self._replies = self._replies, None
        if protocol is not None:
            protocol.close(ConnectionError("the store is closing"))


def _expired(protocol: _Replies, future: asyncio.Future[list[Any]], within: float) -> None:
    """A batch's deadline: it fails, and so does its connection, so that the batches written
    after it do not wait behind a Redis that stalls (the next batch connects again)."""
    if not future.done():
        future.set_exception(TimeoutError(f"redis did not answer within {within:g} s"))
        protocol.close(ConnectionError("an earlier batch on the connection timed out"))


def _tls(options: dict[str, Any]) -> ssl.SSLContext | None:
    """``rediss://``: the TLS context redis-py builds for its own connections from the URL's
    options (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_cert_reqs``, ``ssl_check_hostname`` ...),
    so that the pooled connections and this one verify alike."""
    kind = options.get("connection_class")
    if kind is None or not issubclass(kind, SSLConnection):
        return None
    settings = {k: v for k, v in options.items() if k != "connection_class"}
    context: ssl.SSLContext = kind(**settings).ssl_context.get()
    return context
