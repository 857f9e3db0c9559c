"""Where task state lives: in memory for one process (the embedded default), shared through
Redis between replicas (gateway.replication)."""

from gateway.store.base import TaskRecord, TaskState
from gateway.store.memory import MemoryTaskStore

__all__ = ["MemoryTaskStore", "TaskRecord", "TaskState"]
