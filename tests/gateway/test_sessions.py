"""The session table without sockets: its bounds, eviction order and sweep."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from gateway.sessions import ClientSession, SessionTable

RECORD: Any = SimpleNamespace(upstream_uuid="u1")


def table(**bounds: Any) -> tuple[SessionTable, list[int]]:
    evicted: list[int] = []
    settings = {
        "session_buffer_bytes": 100,
        "max_sessions": 100,
        "max_per_tenant": 100,
        "buffer_bytes": 1000,
        "resume_window": 10.0,
        **bounds,
    }
    return SessionTable(**settings, evicted=lambda: evicted.append(1)), evicted


def detached(sessions: SessionTable, tenant: str, now: float) -> ClientSession:
    session = sessions.open(tenant)
    assert session is not None
    sessions.detached(session, now)
    return session


def test_all_buffers_together_are_bounded_oldest_detached_session_evicted_first() -> None:
    sessions, evicted = table(buffer_bytes=250, session_buffer_bytes=1000)
    first, second, third = (detached(sessions, "alpha", now) for now in (1.0, 2.0, 3.0))
    for session in (first, second, third):
        session.deliver(RECORD, b"x" * 80)
    assert sessions.buffered == 240 and not evicted
    third.deliver(RECORD, b"y" * 80)  # 320 > 250: the oldest session goes, not the newest frame
    assert first.ended and first.uuid not in sessions.sessions and len(evicted) == 1
    assert sessions.buffered == 240 and list(third.buffer) == [b"x" * 80, b"y" * 80]
    first.deliver(RECORD, b"z" * 80)  # an ended session's tasks still end: their frames go
    assert sessions.buffered == 240 and not first.buffer


def test_a_session_with_a_socket_is_never_evicted_its_own_oldest_frames_go() -> None:
    sessions, evicted = table(buffer_bytes=100, session_buffer_bytes=1000)
    live = sessions.open("alpha")
    assert live is not None  # attached: never detached, so never evicted
    for frame in (b"a" * 60, b"b" * 60):
        live._keep(frame)
    assert not evicted and list(live.buffer) == [b"b" * 60] and sessions.buffered == 60


def test_per_tenant_and_total_bounds_evict_the_oldest_detached_or_refuse() -> None:
    sessions, evicted = table(max_per_tenant=2, max_sessions=3)
    a1, a2 = detached(sessions, "alpha", 1.0), detached(sessions, "alpha", 2.0)
    a3 = sessions.open("alpha")
    assert a3 is not None and a1.ended and not a2.ended and len(evicted) == 1
    b1 = detached(sessions, "beta", 3.0)
    assert b1 is not None and len(sessions) == 3
    b2 = sessions.open("beta")  # the total: the oldest detached of anyone's
    assert b2 is not None and a2.ended and len(evicted) == 2
    assert sessions.open("alpha") is not None  # alpha had a3 alone, b1 was evicted for room
    assert b1.ended and len(sessions) == 3
    assert sessions.open("gamma") is None  # every session left has a socket: refused


def test_resume_only_the_tenants_own_inside_the_window() -> None:
    sessions, _ = table()
    session = detached(sessions, "alpha", 1.0)
    assert sessions.resume(session.uuid, "beta", 2.0) is None
    assert sessions.resume(session.uuid, "alpha", 11.0) is session
    assert sessions.resume(session.uuid, "alpha", 11.5) is None and session.ended
    assert sessions.resume(None, "alpha", 1.0) is None


class Watched(dict[str, ClientSession]):
    def __init__(self, sessions: dict[str, ClientSession], looked: list[str]) -> None:
        super().__init__(sessions)
        self.looked = looked

    def values(self) -> Any:
        for session in super().values():
            self.looked.append(session.uuid)
            yield session


def test_the_sweep_looks_only_at_what_expired() -> None:
    sessions, evicted = table(max_sessions=10_000, max_per_tenant=10_000)
    old = [detached(sessions, "alpha", 1.0 + i) for i in range(3)]
    young = [detached(sessions, "alpha", 100.0 + i) for i in range(1000)]
    live = sessions.open("alpha")
    assert live is not None
    looked: list[str] = []
    sessions._detached = Watched(sessions._detached, looked)
    sessions.sweep(50.0)
    assert all(s.ended for s in old) and not any(s.ended for s in young)
    assert len(looked) == 4  # three expired, and the first that had not
    assert len(sessions) == 1001 and not evicted  # expiry is no eviction
    looked.clear()
    sessions.sweep(50.0)
    assert len(looked) == 1
    # a session attached again leaves the order, and comes back at its end when detached
    sessions.attached(young[0])
    sessions.detached(young[0], 200.0)
    sessions.sweep(111.5)
    assert young[1].ended and not young[2].ended and not young[0].ended


def test_a_session_detached_again_moves_to_the_end_of_the_order() -> None:
    """Detached afresh without an attach in between (a session back from another replica):
    its window starts again, and the sweep still reaches the ones detached after it."""
    sessions, _ = table()
    first, second = detached(sessions, "alpha", 1.0), detached(sessions, "alpha", 2.0)
    sessions.detached(first, 5.0)
    sessions.sweep(12.5)
    assert second.ended and not first.ended


def test_frames_handed_over_go_before_the_ones_that_waited_for_them() -> None:
    """A session taken from another replica: its own frames wait behind what the other hands
    over, which keeps its order, whatever the buffer's bound drops meanwhile."""
    sessions, _ = table(session_buffer_bytes=1000)
    session = detached(sessions, "alpha", 1.0)
    session.awaiting = 0
    session.push(b"mine-1")
    session.handed(b"theirs-1")
    session.push(b"mine-2")
    session.handed(b"theirs-2")
    assert list(session.buffer) == [b"theirs-1", b"theirs-2", b"mine-1", b"mine-2"]
    session.drop_oldest(session.buffered_bytes - len(b"theirs-1"))  # the bound drops one
    session.handed(b"theirs-3")
    assert list(session.buffer) == [b"theirs-2", b"theirs-3", b"mine-1", b"mine-2"]
    session.handed_over()
    session.handed(b"late")  # past the wait: in the order it comes
    assert session.awaiting is None and list(session.buffer)[-1] == b"late"
