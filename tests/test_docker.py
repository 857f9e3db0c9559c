"""The Dockerfile and docker-compose.yml, read (no Docker on CI): the properties a review asked
for, which a later edit could quietly lose."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

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


def _services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # anchors merged
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def test_compose_builds_the_right_targets() -> None:
    built = {
        name: service["build"]["target"]
        for name, service in _services().items()
        if "build" in service
    }
    assert built == {
        "provider": "provider",
        "gateway": "gateway",
        "gateway-a": "gateway",
        "gateway-b": "gateway",
    }


def test_plain_compose_up_is_still_one_gateway_and_its_provider() -> None:
    """The README's `docker compose up`; the replicas come with `--profile replicas`."""
    services = _services()
    assert {name for name, s in services.items() if "profiles" not in s} == {"provider", "gateway"}
    assert {name for name, s in services.items() if "replicas" in s.get("profiles", [])} == {
        "redis",
        "gateway-a",
        "gateway-b",
        "haproxy",
    }
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)


def test_every_service_has_a_health_check_a_restart_policy_and_a_user() -> None:
    for name, service in _services().items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
        if test[1] == "python":
            compile(test[3], name, "exec")
        assert service["restart"] in ("unless-stopped", "on-failure", "always"), name
        user = str(service["user"])
        assert user and user.split(":")[0] not in ("root", "0"), name


def test_every_image_pulled_is_pinned_to_a_patch_release() -> None:
    for name, service in _services().items():
        if "image" in service:
            assert re.fullmatch(
                r"[\w./-]+:\d+\.\d+\.\d+(-[\w.]+)?(@sha256:[0-9a-f]{64})?", service["image"]
            ), (name, service["image"])
        else:
            assert "build" in service, name


def test_the_replicas_share_redis_under_names_of_their_own() -> None:
    services = _services()
    replicas = [services["gateway-a"], services["gateway-b"]]
    assert {r["environment"]["TENEBRA_STORE_URL"] for r in replicas} == {"redis://redis:6379/0"}
    names = [r["environment"]["TENEBRA_STORE_REPLICA"] for r in replicas]
    assert len(set(names)) == 2
    assert "TENEBRA_STORE_URL" not in services["gateway"]["environment"]
    redis = services["redis"]
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    # no persistence: the README says what a restart loses
    assert redis["command"][redis["command"].index("--save") + 1] == ""
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "no"


def _haproxy() -> dict[str, list[list[str]]]:
    """deploy/haproxy.cfg by section ("backend gateways"): its directives, split in words."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in (ROOT / "deploy" / "haproxy.cfg").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if line[0].isspace():
            current.append(words)
        else:
            current = sections.setdefault(" ".join(words), [])
    return sections


def _seconds(duration: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit or "ms"]


def test_haproxy_balances_websockets_across_both_gateways_by_readiness() -> None:
    haproxy = _haproxy()
    backend = haproxy["backend gateways"]
    servers = {words[1]: words[2] for words in backend if words[0] == "server"}
    assert servers == {"gateway-a": "gateway-a:8080", "gateway-b": "gateway-b:8080"}
    assert ["balance", "leastconn"] in backend
    assert ["option", "httpchk"] in backend
    assert ["http-check", "send", "meth", "GET", "uri", "/readyz"] in backend
    assert ["http-check", "expect", "status", "200"] in backend
    (defaults,) = [w for w in backend if w[0] == "default-server"]
    assert "check" in defaults
    # an upgraded socket outlives the gateway's own idle close and a sync task's timeout
    (tunnel,) = [w[2] for w in haproxy["defaults"] if w[:2] == ["timeout", "tunnel"]]
    assert _seconds(tunnel) > 600
    service = _services()["haproxy"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in service["volumes"]
    # the container's health check asks the monitor frontend that watches the backend
    health = haproxy["frontend health"]
    assert ["bind", ":8404"] in health and ["monitor-uri", "/healthz"] in health
    assert "http://127.0.0.1:8404/healthz" in service["healthcheck"]["test"]
    assert ["bind", ":8080"] in haproxy["frontend tenebra"]
    assert service["ports"] == ["127.0.0.1:8088:8080"]
