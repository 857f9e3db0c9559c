"""The ``tenebra`` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenebra",
        description="A WebSocket-streaming gateway for the Runware image-inference API.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        print(
            f"tenebra serve: the gateway will listen on ws://{args.host}:{args.port}/v1 "
            "with its embedded local provider (not built yet: see the open issues)."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
