"""Client sessions: what a ``connectionSessionUUID`` names, and the table that bounds them.

A :class:`ClientSession` outlives its socket by the resume window; what its socket could not
take waits in its buffer, replayed in order on resume. The :class:`SessionTable` bounds sessions
per tenant and in total, and the bytes of every session's buffer together; past a bound the
oldest *detached* session is evicted (``tenebra_client_sessions_evicted_total``). A session with
a socket is never evicted: when every session in the way has one, a new session is refused.

Detached sessions are kept in the order they were detached, which is also the order they expire
in (one resume window for all), so the periodic sweep looks only at what has expired: an idle
gateway with 100,000 sessions pays nothing per sweep.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.store.base import TaskRecord
from protocol.codec import encode_data
from protocol.frames import AuthenticationResult

if TYPE_CHECKING:
    from gateway.clients import ClientConnection

__all__ = ["ClientSession", "SessionTable"]


class ClientSession:
    """A ``connectionSessionUUID`` of one tenant: the subscriber of its sync tasks."""

    def __init__(self, session_uuid: str, tenant: str, limit: int, table: SessionTable) -> None:
        self.uuid = session_uuid
        self.tenant = tenant
        self.limit = limit
        self.table = table
        self.connection: ClientConnection | None = None
        self.detached_at: float | None = None
        self.buffer: deque[bytes] = deque()
        self.buffered_bytes = 0
        self.open_tasks: set[str] = set()
        self.ended = False  # expired or evicted: its tasks' frames are no one's to keep
        # resumed on another replica (gateway.roaming): every frame goes there instead
        self.forward: Callable[[bytes], None] | None = None
        # taken from another replica, until it has handed over what it held (gateway.roaming):
        # where in the buffer its frames go, before this replica's own, which wait behind them
        self.awaiting: int | None = None

    def deliver(self, record: TaskRecord, frame: bytes) -> None:
        self.push(frame)

    def push(self, frame: bytes) -> None:
        if self.forward is not None:
            self.forward(frame)
        # behind a backlog still being replayed, or one still to come from the replica that
        # held the session, a new frame waits its turn: order is kept
        elif (
            self.buffer
            or self.awaiting is not None
            or self.connection is None
            or not self.connection.send(frame)
        ):
            self._keep(frame)

    def handed(self, frame: bytes) -> None:
        """A frame the replica that held the session kept or forwarded: older than any this
        replica pushed since it took the session over."""
        at = self.awaiting
        if at is None or self.forward is not None or self.ended:
            self.push(frame)
            return
        self.buffer.insert(at, frame)
        self.awaiting = at + 1
        self._grew(len(frame))

    def handed_over(self) -> None:
        """The replica that held the session has handed over all it held: what waited goes."""
        if self.awaiting is None:
            return
        self.awaiting = None
        if self.connection is not None:
            self.refill(self.connection)

    def take_backlog(self) -> list[bytes]:
        """Every frame waiting for the client, given once (to another replica)."""
        backlog = list(self.buffer)
        self.drop_oldest(0)
        self.awaiting = None  # what is still to come from the one before goes on too
        return backlog

    def settled(self, record: TaskRecord) -> None:
        self.open_tasks.discard(record.upstream_uuid)

    def _keep(self, frame: bytes) -> None:
        if self.ended:
            return
        self.buffer.append(frame)
        self._grew(len(frame))

    def _grew(self, size: int) -> None:
        self.buffered_bytes += size
        self.table.buffered += size
        self.drop_oldest(self.limit)
        self.table.fit(self)

    def drop_oldest(self, keep: int) -> None:
        """Down to ``keep`` bytes; the oldest frame is lost to the socket, not to the client:
        getResponse has it."""
        while self.buffered_bytes > keep and self.buffer:
            size = len(self.buffer.popleft())
            self.buffered_bytes -= size
            self.table.buffered -= size
            if self.awaiting:
                self.awaiting -= 1

    def detach(self, connection: ClientConnection, now: float) -> None:
        """The socket is gone, or a newer one takes the session: what it did not take of the
        session's frames comes first in the buffer."""
        if self.connection is not connection:
            return
        self.connection = None
        unsent = connection.take_unsent()
        self.buffer.extendleft(reversed(unsent))
        if self.awaiting is not None:
            self.awaiting += len(unsent)
        self.table.detached(self, now)
        if unsent:
            self._grew(sum(map(len, unsent)))

    def attach(self, connection: ClientConnection) -> None:
        """The auth reply goes first, then every missed frame in order, exactly once. The
        reply is the socket's own: should a newer socket take the session before it is
        written, it stays (:meth:`detach` moves the session's frames only)."""
        connection.send_own(encode_data([AuthenticationResult(connectionSessionUUID=self.uuid)]))
        self.connection = connection
        self.table.attached(self)
        self.refill(connection)

    def refill(self, connection: ClientConnection) -> None:
        """Replay the backlog as the socket takes it: half its bound at a time, so that a long
        absence never looks like a client that does not read. A frame larger than the socket's
        whole bound goes only into an empty queue (see ClientConnection.send)."""
        if connection is not self.connection or self.awaiting is not None:
            return
        room = connection.limit // 2
        while self.buffer and connection.queued_bytes < room:
            frame = self.buffer[0]
            if len(frame) > connection.limit and connection.queued_bytes:
                return  # after the queue is written, refill comes again
            if not connection.send(frame):
                return  # the socket is closing: the frame stays for the next one
            self.buffer.popleft()
            self.buffered_bytes -= len(frame)
            self.table.buffered -= len(frame)


class SessionTable:
    """Every client session, bounded; detached ones in expiry order."""

    def __init__(
        self,
        *,
        session_buffer_bytes: int,
        max_sessions: int,
        max_per_tenant: int,
        buffer_bytes: int,
        resume_window: float,
        evicted: Callable[[], None],
    ) -> None:
        self.session_buffer_bytes = session_buffer_bytes
        self.max_sessions = max_sessions
        self.max_per_tenant = max_per_tenant
        self.buffer_bytes = buffer_bytes
        self.resume_window = resume_window
        self._evicted = evicted
        self.sessions: dict[str, ClientSession] = {}
        self.buffered = 0  # bytes in every session's buffer
        # insertion-ordered: detach order, which is expiry order
        self._detached: dict[str, ClientSession] = {}
        self._tenants: dict[str, dict[str, ClientSession]] = {}  # tenant -> its detached ones
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def open(self, tenant: str, session_uuid: str | None = None) -> ClientSession | None:
        """A new session (``session_uuid``: one another replica held), room made by evicting
        the oldest detached one; None if there is none to evict (every session in the way has
        a socket)."""
        if self._counts.get(tenant, 0) >= self.max_per_tenant and not self._evict_oldest(
            self._tenants.get(tenant)
        ):
            return None
        if len(self.sessions) >= self.max_sessions and not self._evict_oldest(self._detached):
            return None
        session = ClientSession(
            session_uuid or str(uuid.uuid4()), tenant, self.session_buffer_bytes, self
        )
        self.sessions[session.uuid] = session
        self._counts[tenant] = self._counts.get(tenant, 0) + 1
        return session

    def resume(self, session_uuid: str | None, tenant: str, now: float) -> ClientSession | None:
        """Only the tenant's own session, inside the window."""
        session = self.sessions.get(session_uuid) if session_uuid is not None else None
        if session is None or session.tenant != tenant:
            return None
        detached = session.detached_at
        if detached is not None and now - detached > self.resume_window:
            self._end(session)
            return None
        return session

    def detached(self, session: ClientSession, now: float) -> None:
        if session.ended:
            return
        session.detached_at = now
        # at the end of the order even when it was detached already: the sweep stops at the
        # first one still in its window
        self._detached.pop(session.uuid, None)
        self._detached[session.uuid] = session
        of_tenant = self._tenants.setdefault(session.tenant, {})
        of_tenant.pop(session.uuid, None)
        of_tenant[session.uuid] = session

    def attached(self, session: ClientSession) -> None:
        session.detached_at = None
        self._detached.pop(session.uuid, None)
        of_tenant = self._tenants.get(session.tenant)
        if of_tenant is not None:
            of_tenant.pop(session.uuid, None)

    def fit(self, grown: ClientSession) -> None:
        """All buffers together within their bound: the oldest detached sessions go first,
        then the oldest frames of the buffer that grew."""
        while self.buffered > self.buffer_bytes and self._evict_oldest(self._detached):
            pass
        if self.buffered > self.buffer_bytes:
            grown.drop_oldest(max(0, grown.buffered_bytes - (self.buffered - self.buffer_bytes)))

    def sweep(self, now: float) -> None:
        """End the sessions whose window has passed: only those are looked at, oldest first."""
        deadline = now - self.resume_window
        expired = []
        for session in self._detached.values():
            detached = session.detached_at
            if detached is None or detached >= deadline:
                break
            expired.append(session)
        for session in expired:
            self._end(session)

    def _evict_oldest(self, detached: dict[str, ClientSession] | None) -> bool:
        if not detached:
            return False
        self._end(next(iter(detached.values())))
        self._evicted()
        return True

    def _end(self, session: ClientSession) -> None:
        self.attached(session)  # out of the detached order
        if self.sessions.pop(session.uuid, None) is not None:
            left = self._counts[session.tenant] - 1
            if left:
                self._counts[session.tenant] = left
            else:
                del self._counts[session.tenant]
        if not self._tenants.get(session.tenant, True):
            del self._tenants[session.tenant]
        session.ended = True
        self.buffered -= session.buffered_bytes
        session.buffer.clear()
        session.buffered_bytes = 0
