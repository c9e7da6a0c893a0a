"""`gastown-cloud serve` and `gastown-cloud towns …`: the development cloud from a terminal.

Exit codes: 0 on success (for `serve`, after a clean stop on SIGTERM or SIGINT), 1 on a
runtime failure (the port cannot be bound, the town is unknown or destroyed), 2 on bad usage
or a bad setting (a database that cannot be opened included), with one line on stderr. Output
into a closed pipe ends quietly.
"""

from __future__ import annotations

import argparse
import logging
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
from .settings import CloudSettings, check_database, check_lifetime
from .tokens import DEFAULT_LIFETIME, TokenClaims

_ENVIRONMENT = """\
environment:
  NEXTAUTH_SECRET   HS256 secret the gateway tokens are signed with (at least 32 bytes)
  INTERNAL_API_KEY  key every route but the gateway requires in x-internal-api-key
                    (at least 16 characters, the same key the sandboxes hold)

Refresh binding: a refresh needs the town's token as "Authorization: Bearer" (expired is
fine); the internal key alone refreshes no town unless --allow-unbound-refresh is given.

Once bound, one line goes to stdout: "gastown-cloud listening on http://HOST:PORT"
(https:// with --tls-cert and --tls-key).
Logs go to stderr. SIGTERM or SIGINT stops the server cleanly (exit 0)."""

_TOWNS = """\
Each command prints JSON on stdout: `create` prints {"town": {...}, "token": "<jwt>"} (the
town's first token, for the sandbox's env file), the others {"town": {...}}.
A running `gastown-cloud serve` on the same --db sees the changes at once."""

_CREATE_ENVIRONMENT = """\
environment:
  NEXTAUTH_SECRET   the server's HS256 secret: the token is minted as the server would
                    (at least 32 bytes)"""


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
    _add_db(serve, "SQLite file, created if missing")
    _add_token_options(serve)
    serve.add_argument(
        "--allow-unbound-refresh",
        action="store_true",
        help="let the internal key alone refresh a town (the seed's key-only cron line); "
        "logged as a warning at start",
    )
    serve.add_argument(
        "--refresh-rate",
        type=int,
        metavar="N",
        help="admit at most N refreshes in any one second; the rest get 503 with a "
        "Retry-After spread over the backlog (default: no limit)",
    )
    serve.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with this PEM certificate chain (with --tls-key)",
    )
    serve.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="the private key of --tls-cert (PEM)"
    )
    _add_towns(commands)
    return parser


def _add_db(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--db", type=Path, required=True, metavar="FILE", help=what)


def _add_token_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-lifetime",
        type=int,
        default=DEFAULT_LIFETIME,
        metavar="SECONDS",
        help="lifetime of minted tokens in seconds, 10 to 604800 (%(default)s: 24 h)",
    )
    parser.add_argument(
        "--token-claims",
        type=TokenClaims,
        choices=list(TokenClaims),
        default=TokenClaims.SEED,
        metavar="{seed,kilo}",
        help="seed: the seed's six claims (default); kilo: also kiloUserId (= sub) and "
        "version 3, which Kilo's gateway requires (the gateway route then requires them too)",
    )


def _add_towns(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    towns = commands.add_parser(
        "towns",
        help="create, show, stop, start or destroy a town in the store",
        description="Drive the cloud's store from a terminal.",
        epilog=_TOWNS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = towns.add_subparsers(dest="action", metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="create a town and print it with its first token",
        description="Create an active town and mint its first token, as createTown does.",
        epilog=_CREATE_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_db(create, "SQLite file of the cloud, created if missing")
    create.add_argument("--user-id", required=True, metavar="U", help="the owner's user id")
    create.add_argument(
        "--organization-id", metavar="O", help="the organisation paying (default: none)"
    )
    create.add_argument("--name", required=True, metavar="N", help="the town's name")
    create.add_argument(
        "--sandbox-url",
        metavar="URL",
        help="the sandbox daemon's base URL, where config changes are pushed",
    )
    _add_token_options(create)
    for action, summary in (
        ("show", "print a town"),
        ("stop", "stop a town (its refreshes get 409)"),
        ("start", "start a stopped town again"),
        ("destroy", "destroy a town for good (its refreshes get 410)"),
    ):
        sub = actions.add_parser(action, help=summary, description=summary[0].upper() + summary[1:])
        _add_db(sub, "SQLite file of the cloud (must exist)")
        sub.add_argument("town_id", metavar="ID", help="the town's id")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve_command(args)
        if args.command == "towns" and args.action:
            return _towns_command(args)
    except BrokenPipeError:
        return _quiet_pipe()
    subparsers = parser if args.command is None else _subparser(parser, args.command)
    subparsers.print_help(sys.stderr)
    return 2


def _serve_command(args: argparse.Namespace) -> int:
    try:
        settings = CloudSettings.from_env(
            os.environ,
            db=args.db,
            host=args.host,
            port=args.port,
            token_lifetime=args.token_lifetime,
            token_claims=args.token_claims,
            allow_unbound_refresh=args.allow_unbound_refresh,
            refresh_rate=args.refresh_rate,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
        check_database(args.db, create=True)
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


def _towns_command(args: argparse.Namespace) -> int:
    from .towns_cli import TownCommandError, run_town_command  # late, as for serve

    # stdout is the answer's; warnings (not routine notes such as a migration) go to stderr.
    configure_logging(level=logging.WARNING)
    try:
        if args.action == "create":
            check_lifetime(args.token_lifetime)
        output = run_town_command(args, os.environ)
    except SettingsError as exc:
        print(f"gastown-cloud: {exc}", file=sys.stderr)
        return 2
    except TownCommandError as exc:
        print(f"gastown-cloud: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # the database failed after its check (locked meanwhile)
        print(f"gastown-cloud: the database {args.db} failed: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(output + "\n")
    sys.stdout.flush()
    return 0


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    return parser


def _quiet_pipe() -> int:
    """The reader left: point stdout at /dev/null so the exit flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
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
