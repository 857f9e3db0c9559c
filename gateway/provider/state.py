"""The local provider's memory: sessions with their resume buffers, and tasks with their
generations. No I/O: the server hands frames in and takes frames out.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from protocol.frames import ErrorItem, ImageResult, ImageTask

__all__ = ["Generation", "Outbox", "ProviderTask", "Session", "SessionTable", "TaskTable"]


class Outbox(Protocol):
    """Where a live connection queues frames for its writer."""

    def send(self, frame: bytes) -> None: ...


@dataclass(eq=False)
class Session:
    """A ``connectionSessionUUID``: outlives its socket by the resume window."""

    uuid: str
    key: str
    max_buffered: int
    connection: Outbox | None = None
    detached_at: float | None = None
    buffer: deque[bytes] = field(default_factory=deque)
    dropped: int = 0

    def deliver(self, frame: bytes) -> None:
        if self.connection is not None:
            self.connection.send(frame)
            return
        if len(self.buffer) >= self.max_buffered:
            self.buffer.popleft()  # the oldest frame is lost; getResponse still has its result
            self.dropped += 1
        self.buffer.append(frame)

    def detach(self, unsent: list[bytes], now: float) -> None:
        """The socket is gone: what it had not sent goes back in front of the buffer."""
        self.connection = None
        self.detached_at = now
        self.buffer.extendleft(reversed(unsent))
        while len(self.buffer) > self.max_buffered:
            self.buffer.popleft()
            self.dropped += 1


class SessionTable:
    def __init__(self, *, window: float, max_buffered: int, clock: Callable[[], float]) -> None:
        self.window = window
        self.max_buffered = max_buffered
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def resume(self, uuid: str | None, key: str) -> Session | None:
        """The live session ``uuid`` of ``key``, if it is still inside its resume window."""
        if uuid is None:
            return None
        session = self._sessions.get(uuid)
        if session is None or session.key != key or self._expired(session):
            return None
        return session

    def open(self, uuid: str, key: str) -> Session:
        session = Session(uuid, key, self.max_buffered)
        self._sessions[uuid] = session
        return session

    def _expired(self, session: Session) -> bool:
        detached = session.detached_at
        return detached is not None and self._clock() - detached > self.window

    def sweep(self) -> int:
        expired = [uuid for uuid, s in self._sessions.items() if self._expired(s)]
        for uuid in expired:
            del self._sessions[uuid]
        return len(expired)

    def clear(self) -> None:
        self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)


Status = Literal["processing", "success", "error"]


@dataclass(eq=False)
class Generation:
    status: Status = "processing"
    result: ImageResult | None = None
    error: ErrorItem | None = None


@dataclass(eq=False)
class ProviderTask:
    task: ImageTask
    session: Session
    created: float
    generations: list[Generation]
    failed: ErrorItem | None = None  # a failure of the whole task

    @property
    def done(self) -> bool:
        return self.failed is not None or all(g.status != "processing" for g in self.generations)


class TaskTable:
    """Tasks by (API key, taskUUID), kept for the retention window, oldest evicted first."""

    def __init__(self, *, retention: float, max_tasks: int, clock: Callable[[], float]) -> None:
        self.retention = retention
        self.max_tasks = max_tasks
        self._clock = clock
        self._tasks: OrderedDict[tuple[str, str], ProviderTask] = OrderedDict()

    def get(self, key: str, task_uuid: str) -> ProviderTask | None:
        return self._tasks.get((key, task_uuid))

    def add(self, key: str, entry: ProviderTask) -> None:
        self._tasks[(key, entry.task.taskUUID)] = entry
        while len(self._tasks) > self.max_tasks:
            self._tasks.popitem(last=False)

    def holds(self, entry: ProviderTask) -> bool:
        return self._tasks.get((entry.session.key, entry.task.taskUUID)) is entry

    def sweep(self) -> int:
        horizon = self._clock() - self.retention
        expired = 0
        while self._tasks:
            _, oldest = next(iter(self._tasks.items()))
            if oldest.created > horizon:
                break
            self._tasks.popitem(last=False)
            expired += 1
        return expired

    def clear(self) -> None:
        self._tasks.clear()

    def __iter__(self) -> Iterator[ProviderTask]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)
