"""The ``tenebra`` command: ``serve`` (the gateway) and ``provider`` (the local provider)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

__all__ = ["main"]


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
    faults.add_argument("--refuse-auth", action="store_true")
    faults.add_argument("--send-delay-ms", type=float, default=0.0)
    faults.add_argument("--fast", action="store_true", help="one pre-rendered image, no rendering")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenebra",
        description="A WebSocket-streaming gateway for the Runware image-inference API.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)

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
        refuse_auth=args.refuse_auth,
        send_delay_ms=args.send_delay_ms,
        fast=args.fast,
    )
    provider = LocalProvider(
        ProviderConfig(
            keys=frozenset(keys),
            public_url=args.public_url,
            render_workers=args.workers,
            faults=faults,
        )
    )
    await provider.start(args.host, args.port)
    print(f"tenebra provider: listening on {provider.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await provider.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "provider":
        return asyncio.run(_run_provider(args))
    print(
        f"tenebra serve: the gateway will listen on ws://{args.host}:{args.port}/v1 "
        "with its embedded local provider (not built yet: see the open issues)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
