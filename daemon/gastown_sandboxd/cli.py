"""The command line (CONTRACT §8): run, status, events, refresh, inspect-token, exec, token.

Exit codes: 0 success, 1 a runtime failure, 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from gastown_sandboxd import __version__, agents
from gastown_sandboxd.client import DaemonClient, DaemonUnavailable
from gastown_sandboxd.errors import SettingsError
from gastown_sandboxd.options import ClientSettings, load_client_settings, load_settings
from gastown_sandboxd.token.claims import acceptability_reasons, decode_unverified, fingerprint
from gastown_sandboxd.token.envfile import read_env_values

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_RUN_FLAGS = (
    ("--town-id", "town_id", "town id (env TOWN_ID; required)"),
    ("--cloud-url", "cloud_url", "cloud base URL (env CLOUD_API_URL, else KILO_API_URL; required)"),
    ("--town-root", "town_root", "gt town root (env GT_TOWN_ROOT, else GT_ROOT; default ~/gt)"),
    (
        "--env-file",
        "env_file",
        "env file agents source (env GASTOWN_ENV_FILE; default ~/.env.gateway)",
    ),
    (
        "--listen",
        "listen",
        "API listen address HOST:PORT (env GASTOWN_SANDBOXD_LISTEN; default 127.0.0.1:8080)",
    ),
    (
        "--socket",
        "socket",
        "local socket path (env GASTOWN_SANDBOXD_SOCKET; default "
        "$XDG_RUNTIME_DIR/gastown-sandboxd.sock, else ~/.gastown-sandboxd.sock)",
    ),
    (
        "--shim-dir",
        "shim_dir",
        "agent shim folder (env GASTOWN_SANDBOXD_SHIM_DIR; default "
        "$XDG_DATA_HOME/gastown-sandboxd/bin, else ~/.local/share/gastown-sandboxd/bin)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gastown-sandboxd",
        description="Keeps a Gas Town sandbox's gateway token alive and applies the cloud's "
        "model configuration to gt's settings files.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 bad usage or settings. "
        "The internal API key is read from INTERNAL_API_KEY (or the TOML file), never a flag.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Run the daemon: refresh the token, serve the API on the listen address "
        "and the local socket, watch the settings files. Stops on SIGTERM or SIGINT.",
    )
    _add_config(run)
    for flag, dest, text in _RUN_FLAGS:
        run.add_argument(flag, dest=dest, metavar=dest.upper(), help=text)
    run.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        help="log format (env GASTOWN_SANDBOXD_LOG_FORMAT; auto: console on a terminal, else json)",
    )
    run.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log level (env GASTOWN_SANDBOXD_LOG_LEVEL; default info)",
    )

    status = commands.add_parser(
        "status",
        help="show the daemon's status",
        description="Ask the daemon over the local socket for its status.",
    )
    _add_client(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON answer")

    events = commands.add_parser(
        "events",
        help="print the event stream",
        description="Print the daemon's events, one JSON object per line, until interrupted.",
    )
    _add_client(events)
    events.add_argument("--last-event-id", type=int, metavar="N", help="replay the events after N")
    events.add_argument(
        "--type",
        action="append",
        dest="types",
        metavar="TYPE",
        help="only this event type (repeatable)",
    )
    events.add_argument("--count", type=int, metavar="N", help="exit after N events")

    refresh = commands.add_parser(
        "refresh",
        help="refresh the token now",
        description="Ask the daemon to refresh the token now and print its metadata.",
    )
    _add_client(refresh)

    inspect = commands.add_parser(
        "inspect-token",
        help="show a token's claims and acceptability",
        description="Show the claims, expiry and acceptability of a token: from FILE (an env "
        "file with KILO_JWT= or a file holding the bare token), '-' for stdin, or the env "
        "file by default. Never prints the token or its signature.",
    )
    inspect.add_argument("file", nargs="?", metavar="FILE", help="env file, token file, or '-'")
    _add_config(inspect)
    inspect.add_argument("--town-id", dest="town_id", help="judge against this town (env TOWN_ID)")
    inspect.add_argument(
        "--env-file", dest="env_file", help="default env file (env GASTOWN_ENV_FILE)"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")

    exec_ = commands.add_parser(
        "exec",
        help="run a command with the current token",
        description=agents.EXEC_COMMAND_HELP,
        usage="gastown-sandboxd exec [--socket PATH] [--env-file FILE] -- CMD [ARGS...]",
    )
    agents.add_exec_arguments(exec_)
    token = commands.add_parser(
        "token", help="print the current token", description=agents.PRINT_COMMAND_HELP
    )
    agents.add_common_arguments(token)
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML settings file (default /etc/gastown-sandboxd/config.toml when it exists)",
    )


def _add_client(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument(
        "--socket", dest="socket", help="local socket (env GASTOWN_SANDBOXD_SOCKET)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = _HANDLERS[args.command]
        return handler(args)
    except SettingsError as exc:
        print(f"gastown-sandboxd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnavailable as exc:
        print(f"gastown-sandboxd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _client_settings(args: argparse.Namespace) -> ClientSettings:
    flags = {
        "socket": getattr(args, "socket", None),
        "env_file": getattr(args, "env_file", None),
        "town_id": getattr(args, "town_id", None),
    }
    return load_client_settings(flags, config_file=args.config)


def _cmd_run(args: argparse.Namespace) -> int:
    from gastown_sandboxd.daemon import check_town_root, run_daemon
    from gastown_sandboxd.ops.logs import configure_logging

    flags = {dest: getattr(args, dest) for _, dest, _ in _RUN_FLAGS}
    flags["log_format"] = args.log_format
    flags["log_level"] = args.log_level
    settings = load_settings(flags, config_file=args.config)
    # Before logging starts: a bad town root must end start-up with its one line alone.
    check_town_root(settings.town_root)
    agents.check_shim_dir(settings.shim_dir)
    configure_logging(
        format=settings.log_format,
        level=settings.log_level,
        secrets=[settings.internal_key.reveal()],
    )
    try:
        anyio.run(run_daemon, settings)
    except OSError as exc:
        print(f"gastown-sandboxd: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    with DaemonClient(_client_settings(args).socket) as client:
        status = client.get("/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    token = status.get("token") or {}
    lines = [
        f"town            {status['town_id']}",
        f"state           {status['state']}",
        f"token           {_token_line(token)}",
        f"next refresh    {status.get('next_refresh_at') or '-'}",
        f"last refresh    {status.get('last_refresh_at') or '-'}",
        f"failures        {status['consecutive_failures']}",
        f"config revision {status['config_revision']}",
        f"watcher         {'running' if status['watcher'].get('running') else 'stopped'}",
        f"subscribers     {status['subscribers']}",
    ]
    print("\n".join(lines))
    return EXIT_OK


def _token_line(token: dict[str, Any]) -> str:
    if not token:
        return "none"
    return (
        f"…{token['fingerprint']} sub={token['sub']} org={token['organization_id'] or '-'} "
        f"expires in {_duration(int(token['expires_in']))}"
    )


def _duration(seconds: int) -> str:
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _cmd_events(args: argparse.Namespace) -> int:
    wanted = set(args.types or ())
    seen = 0
    with DaemonClient(_client_settings(args).socket, timeout=None) as client:
        for event in client.events(last_event_id=args.last_event_id):
            if wanted and event.get("type") not in wanted:
                continue
            print(json.dumps(event), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return EXIT_OK


def _cmd_refresh(args: argparse.Namespace) -> int:
    with DaemonClient(_client_settings(args).socket, timeout=30.0) as client:
        answer = client.post("/token/refresh", ok=(200, 409, 502))
    if "error" in answer:
        print(f"gastown-sandboxd: refresh failed: {answer['message']}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(answer["token"], indent=2))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    settings = _client_settings(args)
    source = args.file or str(settings.env_file)
    try:
        token = _read_token_source(source)
    except OSError as exc:
        print(f"gastown-sandboxd: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    if not token:
        print(f"gastown-sandboxd: no token in {source}", file=sys.stderr)
        return EXIT_FAILURE
    now = time.time()
    report: dict[str, Any] = {"source": source, "fingerprint": fingerprint(token)}
    try:
        claims = decode_unverified(token)
    except Exception as exc:
        report["claims"] = None
        report["problem"] = str(exc)
    else:
        report["claims"] = dataclasses.asdict(claims)
        report["expires_in"] = claims.exp - now if isinstance(claims.exp, int) else None
    reasons = acceptability_reasons(token, town_id=settings.town_id or "", now=now)
    if settings.town_id is None:
        reasons = [r for r in reasons if r != "wrong_town"]
    report["acceptable"] = not reasons
    report["reasons"] = reasons
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:12} {json.dumps(value) if not isinstance(value, str) else value}")
    return EXIT_OK if not reasons else EXIT_FAILURE


def _read_token_source(source: str) -> str | None:
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    stripped = text.strip()
    if stripped and "\n" not in stripped and "=" not in stripped:
        return stripped
    values = read_env_values(text)
    return values.get("KILO_JWT")


_HANDLERS = {
    "run": _cmd_run,
    "status": _cmd_status,
    "events": _cmd_events,
    "refresh": _cmd_refresh,
    "inspect-token": _cmd_inspect,
    "exec": agents.run_exec,
    "token": agents.run_token,
}
