"""The ``tenebra`` command: ``serve`` (the gateway) and ``provider`` (the local provider)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import json
import os
import re
import resource
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["build_parser", "main", "serve_config"]

# Installed by the [provider] extra: the local provider's renderer needs them, the gateway does not.
PROVIDER_EXTRA_MODULES = frozenset({"numpy", "PIL"})
PROVIDER_EXTRA_MISSING = "the local provider is not installed: pip install 'tenebra[provider]'"


def _version() -> str:
    try:
        return importlib.metadata.version("tenebra")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def _add_fault_flags(parser: argparse.ArgumentParser) -> None:
    faults = parser.add_argument_group("faults (also switchable at run time: POST /control/faults)")
    faults.add_argument("--latency-ms", type=float, default=0.0, help="added time per image")
    faults.add_argument("--latency-high-ms", type=float, default=0.0, help="upper bound (uniform)")
    faults.add_argument(
        "--latency-kind", choices=["fixed", "uniform", "lognormal"], default="fixed"
    )
    faults.add_argument("--latency-sigma", type=float, default=0.5, help="shape (lognormal)")
    faults.add_argument("--error-rate", type=float, default=0.0, help="probability a task fails")
    faults.add_argument("--error-code", default="timeoutProvider")
    faults.add_argument("--drop-after-frames", type=int, default=0)
    faults.add_argument("--drop-probability", type=float, default=0.0)
    faults.add_argument("--stall", action="store_true", help="answer nothing, pings included")
    faults.add_argument("--deaf", action="store_true", help="read nothing: senders back up")
    faults.add_argument("--refuse-auth", action="store_true")
    faults.add_argument("--send-delay-ms", type=float, default=0.0)
    faults.add_argument("--fast", action="store_true", help="one pre-rendered image, no rendering")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenebra",
        description="A WebSocket-streaming gateway for the Runware image-inference API.",
    )
    parser.add_argument("--version", action="version", version=f"tenebra {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the gateway (with its embedded local provider unless told otherwise)"
    )
    serve.add_argument("--config", type=Path, help="a TOML file (see README)")
    serve.add_argument("--host", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, help="default 8080")
    serve.add_argument(
        "--provider-url", help="default: wss://ws-api.runware.ai/v1 with a provider key"
    )
    serve.add_argument(
        "--provider-key",
        help="default: $RUNWARE_API_KEY; without any, the embedded local provider runs",
    )
    serve.add_argument(
        "--local-cost",
        action="store_true",
        default=None,
        help="the local provider's results cost catalogue prices instead of 0",
    )
    serve.add_argument("--demo-key", help="the demo tenant's key (default: $TENEBRA_DEMO_KEY)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="gateway processes sharing the port (SO_REUSEPORT); more than 1 needs store.url "
        "and a fixed port (default 1)",
    )

    generate = commands.add_parser("generate", help="generate images through a running gateway")
    generate.add_argument("prompt")
    generate.add_argument("-n", "--number", type=int, default=1, help="numberResults")
    generate.add_argument("--size", default="1264x848", help="WIDTHxHEIGHT from the catalogue")
    generate.add_argument("--format", default="JPG", help="JPG, PNG or WEBP")
    generate.add_argument("--ref", help="a reference image: a file, a URL or an imageUUID")
    generate.add_argument("--out", type=Path, default=Path("."), help="where to save the files")
    generate.add_argument("--url", default="ws://127.0.0.1:8080/v1", help="the gateway")
    generate.add_argument("--key", help="an API key of the gateway (default: $TENEBRA_DEMO_KEY)")

    keys = commands.add_parser("keys", help="API keys for the configuration's tenants")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser(
        "create", help="print a new key once, and the key_sha256 line that lets it in"
    )
    create.add_argument("--tenant", required=True, help="the [tenants.NAME] it is for")

    provider = commands.add_parser(
        "provider", help="run the local provider: a Runware-protocol server that renders images"
    )
    provider.add_argument("--host", default="127.0.0.1")
    provider.add_argument("--port", type=int, default=8765)
    provider.add_argument(
        "--key",
        action="append",
        default=[],
        help="an accepted API key (repeatable; default: $TENEBRA_PROVIDER_KEY)",
    )
    provider.add_argument("--public-url", help="base URL of /images as clients reach it")
    provider.add_argument("--workers", type=int, help="render processes (default: one per core)")
    provider.add_argument(
        "--max-queued",
        type=int,
        default=256,
        help="images accepted and not yet finished; a task past it is refused whole with "
        "rateLimitExceeded (default 256)",
    )
    provider.add_argument(
        "--control-key",
        help="turns /control/* on, behind 'Authorization: Bearer <key>' "
        "(default: $TENEBRA_PROVIDER_CONTROL_KEY; without one /control/* is 404)",
    )
    _add_fault_flags(provider)
    return parser


async def _run_provider(args: argparse.Namespace) -> int:
    from gateway.provider.faults import Faults, Latency
    from gateway.provider.server import LocalProvider, ProviderConfig

    keys = args.key or [os.environ.get("TENEBRA_PROVIDER_KEY", "")]
    if not any(keys):
        print(
            "tenebra provider: give at least one --key (or TENEBRA_PROVIDER_KEY)", file=sys.stderr
        )
        return 2
    faults = Faults(
        latency=Latency(
            kind=args.latency_kind,
            ms=args.latency_ms,
            high_ms=args.latency_high_ms,
            sigma=args.latency_sigma,
        ),
        error_rate=args.error_rate,
        error_code=args.error_code,
        drop_after_frames=args.drop_after_frames,
        drop_probability=args.drop_probability,
        stall=args.stall,
        deaf=args.deaf,
        refuse_auth=args.refuse_auth,
        send_delay_ms=args.send_delay_ms,
        fast=args.fast,
    )
    provider = LocalProvider(
        ProviderConfig(
            keys=frozenset(keys),
            public_url=args.public_url,
            render_workers=args.workers,
            render_queue=args.max_queued,
            faults=faults,
            control_key=args.control_key or os.environ.get("TENEBRA_PROVIDER_CONTROL_KEY") or None,
        )
    )
    await provider.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    print(f"tenebra provider: listening on {provider.url}", flush=True)
    await stop.wait()
    await provider.stop()
    return 0


def serve_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """The configuration ``tenebra serve`` runs with: flags over the environment over the file,
    checked as one (a --port out of range is refused like a TENEBRA_SERVER_PORT out of range)."""
    from gateway.config import load_config

    return load_config(
        args.config,
        env,
        overrides={
            "server.host": args.host or None,
            "server.port": args.port,
            "provider.url": args.provider_url or None,
            "provider.api_key": args.provider_key or None,
            "provider.local_cost": args.local_cost,
            "demo_key": args.demo_key or None,
        },
    )


async def _serve(args: argparse.Namespace) -> int:
    import secrets

    from gateway.app import Gateway
    from gateway.config import ConfigError
    from gateway.log import configure_logging

    configure_logging(args.log_level)
    try:
        config = serve_config(args)
    except ConfigError as exc:
        print(f"tenebra serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if not config.tenants and not config.demo_key:
        config.demo_key = secrets.token_urlsafe(16)
    demo_key = config.demo_key  # printed once below; the gateway keeps only its hash
    gateway = Gateway(config)
    try:
        await gateway.start()
    except ModuleNotFoundError as exc:  # raised before start() opens anything: nothing to stop
        return no_local_provider(exc)
    raise_open_files_limit()
    # What start-up made lives as long as the process: out of the collector's sight. A frame's
    # objects die young by reference counting, so young collections can be rarer.
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: no more waiting
            os._exit(1)
        stop.set()

    # before "listening" is printed: whoever reads that line may signal at once
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, on_signal)
    with contextlib.suppress(NotImplementedError):  # tenants and keys again, nothing else
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_tenants, lambda: serve_config(args))
    if gateway.cluster is not None:  # taken over by another replica: this one stops
        gateway.cluster.on_fenced.append(stop.set)
    print(f"tenebra: listening on {gateway.url}", flush=True)
    if demo_key:
        print(f"tenebra: demo API key: {demo_key}", flush=True)
    del demo_key
    if gateway.provider is not None:
        cost = "catalogue prices" if config.provider.local_cost else "no cost"
        print(f"tenebra: local provider: synthetic images, {cost}", flush=True)
    # the browser's way in (gateway/console/): the playground takes the demo key printed above
    base = gateway.url.replace("ws://", "http://", 1).removesuffix("/v1")
    print(f"tenebra: playground {base}/playground, console {base}/console", flush=True)
    await stop.wait()
    await gateway.stop()
    return 1 if gateway.fenced.is_set() else 0  # fenced: a supervisor starts it anew


def _create_key(tenant: str) -> int:
    """The key goes to stdout once, for the tenant; only its hash goes into the file."""
    from gateway.tenants import new_key

    key, digest = new_key()
    section = tenant if re.fullmatch(r"[A-Za-z0-9_-]+", tenant) else json.dumps(tenant)
    print(key)
    print(f"[tenants.{section}]")
    print(f'key_sha256 = ["{digest}"]')
    print(
        "tenebra keys: the key above is shown once; add the key_sha256 line to the tenant's "
        "section (beside its other hashes), then reload the gateway (SIGHUP)",
        file=sys.stderr,
    )
    return 0


def raise_open_files_limit() -> None:
    """Every socket is a file: a soft limit of 1,024 (a common default) refuses connections long
    before ``server.max_connections``, and connections that never upgrade count too. Raised to
    the hard limit, where the operator sets the real bound."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(coroutine: Any) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)  # type: ignore[no-any-return]
    return uvloop.run(coroutine)  # type: ignore[no-any-return]


def no_local_provider(exc: ModuleNotFoundError) -> int:
    """``tenebra serve`` without a provider key needs the local provider: exit 2 saying how to
    get it (or to use Runware); any other missing module is a bug, raised again."""
    if exc.name not in PROVIDER_EXTRA_MODULES:
        raise exc
    print(
        f"tenebra serve: no provider key, and {PROVIDER_EXTRA_MISSING}"
        " (or set RUNWARE_API_KEY to use Runware)",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "provider":
        try:
            return _run(_run_provider(args))
        except ModuleNotFoundError as exc:
            if exc.name not in PROVIDER_EXTRA_MODULES:
                raise
            print(f"tenebra provider: {PROVIDER_EXTRA_MISSING}", file=sys.stderr)
            return 2
    if args.command == "keys":
        return _create_key(args.tenant)
    if args.command == "generate":
        from gateway.generate import generate

        return _run(generate(args))
    if args.workers > 1:
        from gateway.workers import serve_workers

        return _run(serve_workers(args, args.workers))
    return _run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
