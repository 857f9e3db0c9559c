"""The Dockerfile and docker-compose.yml, read (no Docker on CI): the properties a review asked
for, which a later edit could quietly lose."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]


def _stages() -> tuple[dict[str, str], list[Stage]]:
    text = (ROOT / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()  # continuation lines joined
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.strip())
            stages.append(Stage(base, name.strip()))
        elif stages:
            stages[-1].instructions.append((word, rest))
        elif word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args, stages


def _by_name() -> dict[str, Stage]:
    return {stage.name: stage for stage in _stages()[1]}


def test_every_base_is_pinned_to_a_patch_release() -> None:
    stages = _stages()[1]
    names = {stage.name for stage in stages}
    for stage in stages:
        if stage.base in names:  # built on an earlier stage of this file
            continue
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", stage.base), (
            stage.base
        )


def test_the_wheel_is_built_apart_from_the_images_that_run() -> None:
    stages = _by_name()
    assert any("pip wheel" in run for run in stages["build"].all("RUN"))
    for target in ("gateway", "provider"):
        copies = stages[target].all("COPY")
        assert any(c.startswith("--from=build /wheels") for c in copies), target
        assert not any(c.startswith(("gateway", "protocol", ".")) for c in copies), target


def test_the_images_do_not_run_as_root() -> None:
    stages = _by_name()
    for target in ("gateway", "provider"):
        users = stages[target].all("USER")
        assert users and users[-1] not in ("root", "0"), target
        # the USER comes after the last install: nothing is installed as that user by mistake
        words = [word for word, _ in stages[target].instructions]
        assert max(i for i, w in enumerate(words) if w == "USER") > max(
            i for i, w in enumerate(words) if w == "RUN"
        )


def test_only_the_provider_image_has_the_provider_extra() -> None:
    stages = _by_name()
    assert any("[provider]" in run for run in stages["provider"].all("RUN"))
    assert not any("[provider]" in run for run in stages["gateway"].all("RUN"))
    assert _stages()[1][-1].name == "gateway", "a plain docker build should make the gateway"


def test_the_gateway_checks_its_health_on_readyz() -> None:
    (check,) = _by_name()["gateway"].all("HEALTHCHECK")
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "/readyz" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")
    (check,) = _by_name()["provider"].all("HEALTHCHECK")
    compile(json.loads(check.split(" CMD ", 1)[1])[2], "HEALTHCHECK", "exec")


def test_compose_builds_the_right_targets() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    services = dict(re.findall(r"^  (\w+):\n    build:\n.*?\n      target: (\w+)", text, re.M))
    assert services == {"provider": "provider", "gateway": "gateway"}
