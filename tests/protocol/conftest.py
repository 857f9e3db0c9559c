from __future__ import annotations

import uuid
from typing import Any

import pytest

from protocol.models import Catalogue, default_catalogue

MODEL = "exactly:photo@extreme-contrast"


@pytest.fixture
def catalogue() -> Catalogue:
    return default_catalogue()


def image_task(**overrides: Any) -> dict[str, Any]:
    """A valid imageInference task as a client sends it, with ``overrides`` applied."""
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": MODEL,
        "positivePrompt": "A lone fencer in a floodlit tunnel",
        "width": 1264,
        "height": 848,
    }
    for key, value in overrides.items():
        if value is DROP:
            task.pop(key, None)
        else:
            task[key] = value
    return task


DROP = object()
