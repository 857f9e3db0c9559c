"""Client sessions that move between replicas (``store.url``).

A client that reconnects to *another* replica with its ``connectionSessionUUID`` gets the auth
reply and then every frame it missed, in order, and the results of its tasks still running
keep coming, whichever replica carries them. How:

- **Directory.** ``{prefix}:session:{uuid}`` holds the session's tenant and the replica that
  holds it. Written when a session opens; it lives ``attached_ttl`` while a socket holds it and
  ``resume_window`` once it has none (a dead replica's sessions go by themselves). A loop
  turn's changes go in one script, in the order they were made, each only while this replica
  holds the session.
- **Adoption.** A replica asked to resume a session it does not know takes it over in the
  directory (one script: same tenant only), makes a local session of that UUID, and tells the
  replica that held it ("moved"). That one hands over what it buffered for the client, then a
  mark, and from then on forwards every frame of the session's tasks; the adopting replica's
  own frames of the session wait behind what is handed over, until the mark (or
  ``HANDOVER_WAIT``).
- **Forwarding.** A frame for a session held elsewhere (or by nobody yet: its client has not
  reconnected) is appended to the session's mailbox ``{prefix}:mailbox:{uuid}`` (a list, at
  most ``max_mailbox`` frames, the oldest dropped first; it lives ``resume_window``), and the
  holder is woken on the bus. The holder empties the mailbox into the session, in order. The
  append and the read of the holder are one script, and an adoption empties the mailbox after
  taking the session, so a frame is never left behind by a move; a frame sent while Redis is
  away is lost to the socket (``getResponse`` has it).

Within one replica nothing of this runs: a session's frames go to its socket as before.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
import structlog

from gateway.cluster import Cluster
from gateway.sessions import ClientSession, SessionTable
from gateway.store.base import TaskRecord
from gateway.store.connection import RedisConnection, key_part
from gateway.store.pipe import command
from gateway.store.shared import StoreUnavailable

if TYPE_CHECKING:
    from gateway.tasks import Subscriber

__all__ = ["Roaming"]

log = structlog.get_logger("tenebra.roaming")

# KEYS[1]: the session; ARGV: tenant, this replica, ttl (ms). The previous holder, or false for
# a session unknown or another tenant's.
_ADOPT = """
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if tenant ~= ARGV[1] then return false end
local previous = redis.call('HGET', KEYS[1], 'replica') or ''
redis.call('HSET', KEYS[1], 'replica', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return previous
"""

# KEYS[1]: mailbox, KEYS[2]: the session; ARGV[1]: max frames, ARGV[2]: ttl (ms), ARGV[3..]:
# frames. The replica that holds the session, or false.
_POST = """
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('HGET', KEYS[2], 'replica')
"""

# KEYS[1]: mailbox. Every frame in it, and it emptied.
_TAKE = """
local frames = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return frames
"""

# ARGV[1]: this replica; then each change in turn: its kind ('o' a session opened here, 'e' a
# new expiry), the session's key, its expiry (ms), and for 'o' its tenant. A session another
# replica holds now (it adopted it) is left to that one: a late change of this replica's (a
# socket that closed after the session moved, a batch sent again) must not shorten its entry.
_DIRECTORY = b"""
local me, i = ARGV[1], 2
while i <= #ARGV do
  local kind, key, ttl = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local holder = redis.call('HGET', key, 'replica')
  if kind == 'o' then
    if not holder or holder == me then
      redis.call('HSET', key, 'tenant', ARGV[i + 3], 'replica', me)
      redis.call('PEXPIRE', key, ttl)
    end
    i = i + 4
  else
    if holder == me then redis.call('PEXPIRE', key, ttl) end
    i = i + 3
  end
end
return 0
"""

# the directory's changes in one round trip at most (a burst of connections goes in several)
DIRECTORY_BATCH = 2_000
# changes waiting at most, while Redis is slow or away (each session's few, for every session
# that opened, attached or detached meanwhile); past it the newest are dropped, counted in a
# warning: a session missing from the directory is not resumed on another replica (its client
# gets a new session), as with Redis away; one whose detach is dropped keeps its entry for
# attached_ttl
MAX_DIRECTORY_UPDATES = 100_000

# the mark a replica that gave a session away posts after the frames it held for it (never a
# frame: those are JSON text)
_HANDED = b""
# how long a replica that took a session over holds its own frames of it at most, for the one
# before to hand over what it held
HANDOVER_WAIT = 2.0

_ENCODE = msgspec.msgpack.Encoder()
_DECODE_NAME = msgspec.msgpack.Decoder(str)


class _Remote:
    """The subscriber of a task whose session is not here: its frames are forwarded."""

    __slots__ = ("roaming", "session_uuid")

    def __init__(self, roaming: Roaming, session_uuid: str) -> None:
        self.roaming = roaming
        self.session_uuid = session_uuid

    def deliver(self, record: TaskRecord, frame: bytes) -> None:
        self.roaming.forward(self.session_uuid, frame)

    def settled(self, record: TaskRecord) -> None:
        pass


class Roaming:
    def __init__(
        self,
        redis: RedisConnection,
        cluster: Cluster,
        table: SessionTable,
        *,
        attached_ttl: float,
        max_mailbox: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.cluster = cluster
        self.table = table
        self.replica = cluster.name
        self._attached_ms = max(1, round(attached_ttl * 1000))
        self._detached_ms = max(1, round(table.resume_window * 1000))
        self.max_mailbox = max_mailbox
        self._clock = clock  # the session table's (its sessions' detach times)
        # sessions taken over here, waiting for the one before to hand over: each one's wait
        self._handovers: dict[str, asyncio.TimerHandle] = {}
        self._adopt = redis.script(_ADOPT)
        self._post = redis.script(_POST)
        self._take = redis.script(_TAKE)
        self._name = self.replica.encode()
        # the directory's changes waiting for their round trip (see _DIRECTORY)
        self._updates: list[tuple[bytes, ...]] = []
        self._updates_dropped = 0
        self._updating: asyncio.Task[None] | None = None
        self._outgoing: defaultdict[str, list[bytes]] = defaultdict(list)  # by session UUID
        self._sending: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        cluster.on("moved", self._moved)
        cluster.on("wake", self._wake)

    def _session_key(self, session_uuid: str) -> str:
        return self.redis.key("session", key_part(session_uuid))

    def _mailbox(self, session_uuid: str) -> str:
        return self.redis.key("mailbox", key_part(session_uuid))

    # ------------------------------------------------------------------ the directory

    def opened(self, session: ClientSession) -> None:
        self._update(
            b"o", self._session_key(session.uuid), self._attached_ms, session.tenant.encode()
        )

    def attached(self, session: ClientSession) -> None:
        self._update(b"e", self._session_key(session.uuid), self._attached_ms)

    def detached(self, session: ClientSession) -> None:
        if session.forward is not None:  # handed on: the replica that adopted it holds it now
            return
        self._update(b"e", self._session_key(session.uuid), self._detached_ms)

    def _update(self, kind: bytes, key: str, ms: int, tenant: bytes | None = None) -> None:
        """A change to the directory, written with the rest of this loop turn's."""
        if self._updating is None:
            self._updating = asyncio.get_running_loop().create_task(self._write_updates())
        if len(self._updates) >= MAX_DIRECTORY_UPDATES:
            self._updates_dropped += 1
            return
        change = (kind, key.encode(), b"%d" % ms)
        self._updates.append(change if tenant is None else (*change, tenant))

    async def _write_updates(self) -> None:
        """The directory's changes, in the order they were made: a loop turn's (at most
        ``DIRECTORY_BATCH``) in one script, one round trip on the store's pipelined
        connection. Sessions open, attach and detach in bursts (a fleet of clients connecting
        again): each through redis-py's pool was a round trip of its own and tens of µs of
        interpreted CPU."""
        try:
            while self._updates:
                await asyncio.sleep(0)  # the rest of this loop turn's changes join
                updates = self._updates[:DIRECTORY_BATCH]
                del self._updates[:DIRECTORY_BATCH]
                dropped, self._updates_dropped = self._updates_dropped, 0
                if dropped:
                    log.warning(
                        "session directory updates dropped: too many waiting",
                        dropped=dropped,
                        bound=MAX_DIRECTORY_UPDATES,
                    )
                args = [a for change in updates for a in change]
                data = command(b"EVAL", _DIRECTORY, b"0", self._name, *args)
                try:
                    await self.redis.batch(self.redis.writes, data, 1)
                except StoreUnavailable as exc:  # Redis away, or a script it refused
                    log.info("session directory not updated", error=str(exc))
                except Exception:  # a bug: these changes are lost, not the next turn's
                    log.exception("session directory not updated")
        finally:
            self._updating = None

    async def adopt(self, session_uuid: str, tenant: str, now: float) -> bool:
        """Make the session ``session_uuid`` of ``tenant``, held by another replica (or by a
        dead one), this replica's, detached, so that the authentication resumes it. False when
        the directory does not know it for that tenant (the client gets a new session)."""
        local = self.table.sessions.get(session_uuid)
        if local is not None and local.forward is None:
            return True  # ours already
        keys = [self._session_key(session_uuid)]
        try:
            previous = await self.redis.call(
                lambda: self._adopt(keys=keys, args=[tenant, self.replica, self._attached_ms])
            )
        except StoreUnavailable as exc:
            log.info("session not resumed: redis unavailable", error=str(exc))
            return False
        if previous is None:
            return False
        # again: another resume of the session may have adopted it while this one waited
        local = self.table.sessions.get(session_uuid)
        if local is None:
            session = self.table.open(tenant, session_uuid)
            if session is None:  # no room: the authentication opens none either, and says so
                return False
            self.table.detached(session, now)
        elif local.forward is not None:  # it comes back to a replica that had handed it on
            local.forward = None
            self.table.detached(local, now)  # its window starts again: it was held elsewhere
        holder = previous.decode() if isinstance(previous, bytes) else str(previous)
        if holder and holder != self.replica:  # told by whichever resume took it from there
            self._await_handover(session_uuid)
            self._spawn(lambda: self.cluster.send(holder, "moved", _ENCODE.encode(session_uuid)))
        self._spawn(lambda: self._empty(session_uuid))
        log.info("session adopted", session=session_uuid, previous=holder or None)
        return True

    def _await_handover(self, session_uuid: str) -> None:
        """This replica's own frames of the session wait until the replica that held it has
        handed over what it held (its frames come through the mailbox, then ``_HANDED``), at
        most ``HANDOVER_WAIT`` (a holder that died hands nothing over): else a result of a task
        here would reach the client before the ones it missed."""
        session = self.table.sessions.get(session_uuid)
        if session is None or session.awaiting is not None:
            return
        session.awaiting = len(session.buffer)
        wait = asyncio.get_running_loop().call_later(HANDOVER_WAIT, self._handed_over, session)
        earlier = self._handovers.pop(session_uuid, None)  # of an earlier move: not this one's
        if earlier is not None:
            earlier.cancel()
        self._handovers[session_uuid] = wait

    def _handed_over(self, session: ClientSession) -> None:
        wait = self._handovers.pop(session.uuid, None)
        if wait is not None:
            wait.cancel()
        session.handed_over()

    def subscriber(self, session_uuid: str) -> Subscriber:
        """Who takes the frames of a task of session ``session_uuid`` (a takeover's)."""
        session = self.table.sessions.get(session_uuid)
        if session is not None and session.forward is None:
            return session
        return _Remote(self, session_uuid)

    # ------------------------------------------------------------------ forwarding

    def forward(self, session_uuid: str, frame: bytes) -> None:
        """Send a frame to the session's mailbox: in order, one script per session per turn."""
        self._outgoing[session_uuid].append(frame)
        if self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._outgoing:
                await asyncio.sleep(0)  # what this loop turn forwards goes in one script
                outgoing, self._outgoing = self._outgoing, defaultdict(list)
                for session_uuid, frames in outgoing.items():
                    try:
                        await self._post_frames(session_uuid, frames)
                    except Exception:  # a bug: these frames are lost to the socket, not others
                        log.exception("frames not forwarded", frames=len(frames))
        finally:
            self._sending = None

    async def _post_frames(self, session_uuid: str, frames: list[bytes]) -> None:
        keys = [self._mailbox(session_uuid), self._session_key(session_uuid)]
        args: list[bytes | int] = [self.max_mailbox, self._detached_ms, *frames]
        try:
            holder = await self.redis.call(lambda: self._post(keys=keys, args=args))
        except StoreUnavailable as exc:
            log.info("frames not forwarded: redis unavailable", frames=len(frames), error=str(exc))
            return
        if holder is None:
            return  # nobody holds it yet: the adoption empties the mailbox
        name = holder.decode() if isinstance(holder, bytes) else str(holder)
        if name == self.replica:
            await self._empty(session_uuid)
        else:
            await self.cluster.send(name, "wake", _ENCODE.encode(session_uuid))

    async def _empty(self, session_uuid: str) -> None:
        """The mailbox into the local session, in order."""
        session = self.table.sessions.get(session_uuid)
        if session is None or session.forward is not None:
            return
        keys = [self._mailbox(session_uuid)]
        try:
            frames = await self.redis.call(lambda: self._take(keys=keys))
        except StoreUnavailable as exc:
            log.info("mailbox not read: redis unavailable", error=str(exc))
            return
        for frame in frames:
            data = frame if isinstance(frame, bytes) else frame.encode()
            if data == _HANDED:
                self._handed_over(session)
            else:
                session.handed(data)

    # ------------------------------------------------------------------ the bus

    def _wake(self, body: bytes) -> None:
        session_uuid = _DECODE_NAME.decode(body)
        self._spawn(lambda: self._empty(session_uuid))

    def _moved(self, body: bytes) -> None:
        """Our session was resumed on another replica: what it buffered goes there, and so
        does every later frame of its tasks."""
        session_uuid = _DECODE_NAME.decode(body)
        session = self.table.sessions.get(session_uuid)
        if session is not None and session.forward is None:
            if session.connection is not None:  # the newest socket wins, as on one replica
                session.detach(session.connection, self._clock())
            backlog = session.take_backlog()
            session.forward = lambda frame: self.forward(session_uuid, frame)
            for frame in backlog:
                self.forward(session_uuid, frame)
        # whatever this replica held of it, all of it is on its way: the new holder's own
        # frames may follow
        self.forward(session_uuid, _HANDED)

    def _spawn(self, step: Callable[[], Awaitable[object]]) -> None:
        """Run ``step`` in the background within the store's deadline; Redis away is logged."""

        async def run() -> None:
            try:
                await self.redis.call(step)
            except StoreUnavailable as exc:
                log.info("session directory not updated: redis unavailable", error=str(exc))

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        tasks = [t for t in (self._sending, self._updating, *self._background) if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.redis.deadline * 2)
        for task in tasks:
            task.cancel()
