"""Where task state lives: in memory for one process (the embedded default); Redis later."""

from gateway.store.base import TaskRecord, TaskState, TaskStore
from gateway.store.memory import MemoryTaskStore

__all__ = ["MemoryTaskStore", "TaskRecord", "TaskState", "TaskStore"]
