"""`gastown-cloud serve`: the development cloud on one port with an SQLite store.

Exit codes: 0 after a clean stop (SIGTERM or SIGINT), 1 on a runtime failure (the port or the
database cannot be opened), 2 on bad usage or a bad setting, with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import structlog

from .errors import SettingsError
from .logs import configure_logging
from .settings import CloudSettings
from .tokens import DEFAULT_LIFETIME

_ENVIRONMENT = """\
environment:
  NEXTAUTH_SECRET   HS256 secret the gateway tokens are signed with (at least 32 bytes)
  INTERNAL_API_KEY  key every route but the gateway requires in x-internal-api-key
                    (at least 16 characters, the same key the sandboxes hold)

Once bound, one line goes to stdout: "gastown-cloud listening on http://HOST:PORT".
Logs go to stderr. SIGTERM or SIGINT stops the server cleanly (exit 0)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gastown-cloud",
        description="A small Gas Town cloud for development, tests and demos.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the cloud API, the token refresh and the gateway",
        description="Serve the cloud API (towns, token refresh, config forward, usage)\n"
        "and the OpenAI-compatible development gateway, on one port.",
        epilog=_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    serve.add_argument(
        "--port", type=int, default=3000, help="TCP port, 0 picks a free one (%(default)s)"
    )
    serve.add_argument(
        "--db", type=Path, required=True, metavar="FILE", help="SQLite file, created if missing"
    )
    serve.add_argument(
        "--token-lifetime",
        type=int,
        default=DEFAULT_LIFETIME,
        metavar="SECONDS",
        help="lifetime of minted tokens in seconds, 1 to 604800 (%(default)s: 24 h)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    try:
        settings = CloudSettings.from_env(
            os.environ,
            db=args.db,
            host=args.host,
            port=args.port,
            token_lifetime=args.token_lifetime,
        )
    except SettingsError as exc:
        print(f"gastown-cloud: {exc}", file=sys.stderr)
        return 2
    configure_logging(secrets=(settings.nextauth_secret, settings.internal_api_key))
    failures: list[BaseException] = []
    try:
        anyio.run(_serve, settings, backend="asyncio")
    except* (OSError, sqlite3.Error) as group:
        failures.extend(_leaves(group))
    if failures:
        print(f"gastown-cloud: cannot serve: {failures[0]}", file=sys.stderr)
        return 1
    return 0


async def _serve(settings: CloudSettings) -> None:
    from .server import Server  # imported late: --help and bad usage answer at once

    server = Server(settings)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            print(f"gastown-cloud listening on {server.url}", flush=True)
            async for signum in signals:
                structlog.get_logger(__name__).info("cloud_stopping", signal=signum.name)
                server.stop()
                break


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error
