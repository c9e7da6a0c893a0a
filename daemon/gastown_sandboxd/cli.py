"""The command line (CONTRACT §8): run, check, status, events, refresh, inspect-token, exec,
token.

Exit codes: 0 success, 1 a runtime failure, 2 bad usage or options. Output into a closed pipe
(`status | head -1`) ends quietly with exit 0: the reader had what it wanted.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from gastown_sandboxd import __version__, agents
from gastown_sandboxd._lazy import exit_without_teardown, imports_without_gc
from gastown_sandboxd.client import DaemonClient, DaemonUnavailable, running_daemon_env_file
from gastown_sandboxd.errors import OptionsError
from gastown_sandboxd.options import (
    ClientOptions,
    Options,
    load_client_options,
    load_options,
)
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
        "--state-dir",
        "state_dir",
        "state folder: the last-applied desired configuration (env GASTOWN_SANDBOXD_STATE_DIR; "
        "default $XDG_STATE_HOME/gastown-sandboxd, else ~/.local/state/gastown-sandboxd)",
    ),
    (
        "--shim-dir",
        "shim_dir",
        "agent shim folder (env GASTOWN_SANDBOXD_SHIM_DIR; default "
        "$XDG_DATA_HOME/gastown-sandboxd/bin, else ~/.local/share/gastown-sandboxd/bin)",
    ),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Given the `command` the arguments start with, only that
    command's parser is built; otherwise every command's, for help and errors.

    Every parser uses the agents' `help_formatter`, which finds the terminal's width without
    importing `shutil`. Measured on 2 cores, the first `build_parser()` of a process: 6.0 ms
    for every command with argparse's own formatter (2.7 of it importing `shutil`, `bz2` and
    `lzma`), against 1.1 ms for `run` alone.
    """
    parser = argparse.ArgumentParser(
        prog="gastown-sandboxd",
        description="Keeps a Gas Town sandbox's gateway token alive and applies the cloud's "
        "model configuration to gt's settings files.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 bad usage or options. "
        "The internal API key is read from INTERNAL_API_KEY (or the TOML file), never a flag.",
        formatter_class=agents.help_formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in _COMMANDS.items():
        if command in (None, name):
            sub = commands.add_parser(
                name,
                help=spec.summary,
                description=spec.description,
                formatter_class=agents.help_formatter,
            )
            spec.add_arguments(sub)
    return parser


def _add_run(run: argparse.ArgumentParser) -> None:
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


def _add_check(check: argparse.ArgumentParser) -> None:
    _add_config(check)
    for flag, dest, text in _RUN_FLAGS:
        check.add_argument(flag, dest=dest, metavar=dest.upper(), help=text)


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `least`, else bad usage (exit 2) naming it."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if number < least:
            raise argparse.ArgumentTypeError(f"{number} is under {least}")
        return number

    return parse


def _add_status(status: argparse.ArgumentParser) -> None:
    _add_client(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON answer")


def _add_events(events: argparse.ArgumentParser) -> None:
    _add_client(events)
    events.add_argument(
        "--last-event-id", type=_at_least(0), metavar="N", help="replay the events after N"
    )
    events.add_argument(
        "--type",
        action="append",
        dest="types",
        metavar="TYPE",
        help="only this event type (repeatable)",
    )
    events.add_argument("--count", type=_at_least(1), metavar="N", help="exit after N events")
    events.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="end when the daemon ends the stream (a stop, a restart) instead of resuming",
    )


def _add_inspect(inspect: argparse.ArgumentParser) -> None:
    inspect.add_argument("file", nargs="?", metavar="FILE", help="env file, token file, or '-'")
    _add_config(inspect)
    inspect.add_argument("--town-id", dest="town_id", help="judge against this town (env TOWN_ID)")
    inspect.add_argument(
        "--env-file", dest="env_file", help="default env file (env GASTOWN_ENV_FILE)"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")


def _add_exec(exec_: argparse.ArgumentParser) -> None:
    exec_.usage = "gastown-sandboxd exec [--socket PATH] [--env-file FILE] -- CMD [ARGS...]"
    agents.add_exec_arguments(exec_)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML options file (default /etc/gastown-sandboxd/config.toml when it exists)",
    )


def _add_client(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument(
        "--socket", dest="socket", help="local socket (env GASTOWN_SANDBOXD_SOCKET)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _dispatch(argv)
        # Flush here, not at interpreter exit, so that a closed pipe is caught below.
        sys.stdout.flush()
    except (BrokenPipeError, _ReaderGone):
        _silence_stdout()
        return EXIT_OK
    return code


def _dispatch(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else argv
    command = words[0] if words and words[0] in _COMMANDS else None
    args = build_parser(command).parse_args(words)
    try:
        return _COMMANDS[args.command].run(args)
    except OptionsError as exc:
        for line in str(exc).splitlines():
            print(f"gastown-sandboxd: {line}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnavailable as exc:
        print(f"gastown-sandboxd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush meets no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _client_options(args: argparse.Namespace) -> ClientOptions:
    flags = {
        "socket": getattr(args, "socket", None),
        "env_file": getattr(args, "env_file", None),
        "town_id": getattr(args, "town_id", None),
    }
    return load_client_options(flags, config_file=args.config)


def _cmd_run(args: argparse.Namespace) -> int:
    # SIGHUP's default action ends the process: ignored until the reload handler takes it
    # (supervisorctl can send one at any moment; a reload during start has nothing to do).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with imports_without_gc():
        import anyio

        from gastown_sandboxd.daemon import run_daemon
        from gastown_sandboxd.ops.logs import configure_logging
        from gastown_sandboxd.ops.socket_lock import check_free

    flags = {dest: getattr(args, dest) for _, dest, _ in _RUN_FLAGS}
    flags["log_format"] = args.log_format
    flags["log_level"] = args.log_level
    # Before logging starts: bad options or folders end start-up with their lines alone.
    options = load_options(flags, config_file=args.config, check_paths=True)
    check_free(options.socket)
    configure_logging(
        format=options.log_format,
        level=options.log_level,
        secrets=[options.internal_key.reveal()],
    )

    def reload() -> Options:
        # SIGHUP: the same flags and environment, the TOML file read again.
        return load_options(flags, config_file=args.config)

    try:
        anyio.run(functools.partial(run_daemon, options, reload=reload))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gastown-sandboxd: cannot start: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    return exit_without_teardown(EXIT_OK)


def _cmd_check(args: argparse.Namespace) -> int:
    from gastown_sandboxd.gtsettings.last_applied import LastApplied
    from gastown_sandboxd.ops.socket_lock import SocketInUse, owner_pid, serving_pid

    flags = {dest: getattr(args, dest) for _, dest, _ in _RUN_FLAGS}
    # Raises OptionsProblems with every problem: printed one per line, exit 2.
    options = load_options(flags, config_file=args.config, check_paths=True, check_listen=True)
    pid = owner_pid(options.socket)
    if pid is None and (peer := serving_pid(options.socket)) is not None:
        # Served, but not by a daemon holding its lock: `run` refuses it (exit 2), so must
        # `check` (it said "every option is valid").
        raise SocketInUse(options.socket, peer or None)
    lines = [
        f"ok: {options.config_file or 'no TOML file'}; every option is valid",
        f"town            {options.town_id}",
        f"cloud           {options.cloud_url}",
        f"town root       {options.town_root}",
        f"env file        {options.env_file}",
        f"listen          {options.listen}",
        f"socket          {options.socket}"
        + (f" (served by the running daemon, pid {pid})" if pid else ""),
        f"state folder    {options.state_dir}",
        f"hooks, signals  {len(options.hooks)}, {len(options.signals)}",
    ]
    print("\n".join(lines))
    copy = LastApplied(state_dir=options.state_dir, town_id=options.town_id)
    if (problem := copy.folder_problem()) is not None:
        # Not fatal, as for `run`: the sync keeps its last-applied copy in memory only.
        print(
            f"warning: state folder: {problem}; the last-applied copy of the desired"
            " configuration would be kept in memory only, so a restart forgets which keys the"
            " cloud set (set --state-dir or GASTOWN_SANDBOXD_STATE_DIR)",
            file=sys.stderr,
        )
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    with DaemonClient(_client_options(args).socket) as client:
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
        f"last error      {_error_line(status.get('last_error'))}",
        f"env file        {status.get('env_file') or '-'}",
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


def _error_line(error: dict[str, Any] | None) -> str:
    if not error:
        return "-"
    return f"{error['reason']} at {error['at']}: {error['detail']}"


def _duration(seconds: int) -> str:
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _cmd_events(args: argparse.Namespace) -> int:
    wanted = set(args.types or ())
    seen = 0
    _end_when_the_reader_leaves()
    with DaemonClient(_client_options(args).socket, timeout=None) as client:
        for event in client.events(last_event_id=args.last_event_id, follow=args.follow):
            if wanted and event.get("type") not in wanted:
                continue
            print(json.dumps(event), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return EXIT_OK


class _ReaderGone(Exception):
    """Stdout is a pipe whose reader has gone."""


def _end_when_the_reader_leaves() -> None:
    """`events | head -1`: end once the pipe's reader is gone, not at the next event's write.

    A thread polls stdout for POLLERR (a pipe whose read end closed) and then interrupts the
    main thread's blocking read with SIGUSR1, whose handler raises `_ReaderGone` (not an
    OSError, which httpx would turn into a connection error).
    """
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
    except (OSError, ValueError):
        return

    def reader_gone(signum: int, frame: object) -> None:
        raise _ReaderGone

    signal.signal(signal.SIGUSR1, reader_gone)
    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
        while True:
            if any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll()):
                signal.pthread_kill(main_thread, signal.SIGUSR1)
                return

    threading.Thread(target=watch, name="stdout-reader-watch", daemon=True).start()


def _cmd_refresh(args: argparse.Namespace) -> int:
    with DaemonClient(_client_options(args).socket, timeout=30.0) as client:
        answer = client.post("/token/refresh", ok=(200, 409, 502))
    if "error" in answer:
        print(f"gastown-sandboxd: refresh failed: {answer['message']}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(answer["token"], indent=2))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    options = _client_options(args)
    source = args.file or str(
        options.env_file
        if options.env_file_given
        else running_daemon_env_file(options.socket) or options.env_file
    )
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
        report["claims"] = claims._asdict()
        # Whole seconds, rounded down: a token "expires in 0" only in its last second.
        report["expires_in"] = math.floor(claims.exp - now) if isinstance(claims.exp, int) else None
    reasons = acceptability_reasons(token, town_id=options.town_id or "", now=now)
    if options.town_id is None:
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
    # Bytes, as the daemon reads an env file: a line that is not UTF-8 (a comment in latin-1)
    # keeps its bytes and hides no token.
    raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    text = raw.decode("utf-8", "surrogateescape")
    stripped = text.strip()
    if stripped and "\n" not in stripped and "=" not in stripped:
        return stripped
    values = read_env_values(text)
    return values.get("KILO_JWT")


class Command(NamedTuple):
    """One command: what adds its arguments, what runs it, its line in the command list,
    and its description."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    summary: str
    description: str


_COMMANDS: dict[str, Command] = {
    "run": Command(
        _add_run,
        _cmd_run,
        "run the daemon in the foreground",
        "Run the daemon: refresh the token, serve the API on the listen address and the local "
        "socket, watch the settings files. Stops on SIGTERM or SIGINT.",
    ),
    "check": Command(
        _add_check,
        _cmd_check,
        "check the options without starting",
        "Check every option (flags, environment, TOML file), the town root, the env file's "
        "folder and the socket's path as `run` would, without starting; report every problem "
        "at once. Exit 0 when all is well, 2 when anything is wrong.",
    ),
    "status": Command(
        _add_status,
        _cmd_status,
        "show the daemon's status",
        "Ask the daemon over the local socket for its status.",
    ),
    "events": Command(
        _add_events,
        _cmd_events,
        "print the event stream",
        "Print the daemon's events, one JSON object per line, until interrupted. When the "
        "daemon stops or restarts, wait for it and resume after the last event printed.",
    ),
    "refresh": Command(
        _add_client,
        _cmd_refresh,
        "refresh the token now",
        "Ask the daemon to refresh the token now and print its metadata.",
    ),
    "inspect-token": Command(
        _add_inspect,
        _cmd_inspect,
        "show a token's claims and acceptability",
        "Show the claims, expiry and acceptability of a token: from FILE (an env file with "
        "KILO_JWT= or a file holding the bare token), '-' for stdin, or the env file by "
        "default. Never prints the token or its signature.",
    ),
    "exec": Command(
        _add_exec,
        agents.run_exec,
        "run a command with the current token",
        agents.EXEC_COMMAND_HELP,
    ),
    "token": Command(
        agents.add_common_arguments,
        agents.run_token,
        "print the current token",
        agents.PRINT_COMMAND_HELP,
    ),
}
