"""`gastown-sandboxd exec -- CMD` and `gastown-sandboxd token` (CONTRACT §5, §8).

`exec` becomes CMD (same PID) with the env file's variables, `KILOCODE_TOKEN` and each CLI's
credential variable set to the current token, and every inherited variable that holds an
older gateway token replaced. `claude` gets no `ANTHROPIC_AUTH_TOKEN` while the daemon's
`apiKeyHelper` stands in its settings (the helper then keeps a running session current).
`token` prints the current token and nothing else. Both ask the daemon to refresh a missing or
expired token and wait up to 10 s; `exec` then runs CMD anyway and says so on stderr, `token`
exits 1 with nothing on stdout.

Every agent start through a shim runs this module, so it imports the standard library and the
token rules alone; the socket client (httpx) and the option loader only when it must use them.
It keeps paths as text: `pathlib` is imported only where a `Path` is handed to those.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from gastown_sandboxd._types import SECRETS_OF_THE_DAEMON
from gastown_sandboxd.agents import claude
from gastown_sandboxd.errors import TokenError
from gastown_sandboxd.token.claims import TOKEN_TYPE, acceptability_reasons, decode_unverified
from gastown_sandboxd.token.envfile import TOKEN_KEY, read_env

if TYPE_CHECKING:
    from pathlib import Path

    from _typeshed import StrPath

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
REFRESH_WAIT = 10.0
DEFAULT_HELPER_TTL_MS = 300_000
# Set to the token for every command: the gateway's own variables.
GATEWAY_VARIABLES = ("ANTHROPIC_AUTH_TOKEN", "KILOCODE_TOKEN")
# What each agent CLI reads as its credential (README "Agents"); set when unset or stale.
CLI_CREDENTIALS: Mapping[str, tuple[str, ...]] = {
    "claude": ("ANTHROPIC_AUTH_TOKEN",),
    "kilo": ("KILOCODE_TOKEN",),
    "kilocode": ("KILOCODE_TOKEN",),
    "codex": ("OPENAI_API_KEY",),
    "gemini": (),
    "opencode": (),
}

Say = Callable[[str], None]


def _say(message: str) -> None:
    print(f"gastown-sandboxd: {message}", file=sys.stderr)


class Where(NamedTuple):
    """The env file and socket a command uses, and the town when one is configured."""

    env_file: str
    socket: str
    town_id: str | None


def _path(text: str) -> Path:
    """`--config`'s type: a `Path`, with pathlib imported only when the option is given."""
    from pathlib import Path

    return Path(text)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `exec` and `token` share (also used by `gastown-sandboxd`'s parser)."""
    parser.add_argument(
        "--config",
        type=_path,
        metavar="FILE",
        help="TOML options file (default /etc/gastown-sandboxd/config.toml when it exists)",
    )
    parser.add_argument(
        "--socket", dest="socket", help="local socket (env GASTOWN_SANDBOXD_SOCKET)"
    )
    parser.add_argument(
        "--env-file",
        dest="env_file",
        help="env file (env GASTOWN_ENV_FILE, TOML env_file; else the running daemon's)",
    )
    parser.add_argument(
        "--town-id",
        dest="town_id",
        help="the town whose tokens alone are taken (env TOWN_ID; shims and the helper carry it)",
    )


def add_exec_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--helper-ttl-ms",
        type=int,
        default=DEFAULT_HELPER_TTL_MS,
        metavar="MS",
        help=f"{claude.TTL_VARIABLE} given to claude when its environment has none "
        f"(default {DEFAULT_HELPER_TTL_MS}; shims carry agents.claude_helper_ttl)",
    )
    parser.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments"
    )


EXEC_COMMAND_HELP = (
    "Export the env file's variables, KILOCODE_TOKEN and the command's credential variable "
    "set to the current token (replacing older tokens it inherited), and exec CMD (same PID; "
    "signals and exit code pass through). claude gets no ANTHROPIC_AUTH_TOKEN while the "
    "daemon's apiKeyHelper is in its settings. An expired or missing token is refreshed "
    f"through the daemon first (waiting up to {REFRESH_WAIT:.0f} s); CMD runs anyway."
)
PRINT_COMMAND_HELP = (
    "Print the current token and nothing else (Claude Code's apiKeyHelper runs this). An "
    "expired or missing token is refreshed through the daemon first; with no acceptable "
    "token, exit 1 with nothing on stdout."
)


def run_exec(args: argparse.Namespace, *, say: Say = _say) -> int:
    """`exec`: returns only when CMD cannot be started (or on bad usage)."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        say("exec needs a command: exec -- CMD [ARGS...]")
        return EXIT_USAGE
    where = locate(args.env_file, args.socket, args.config, town_id=args.town_id)
    values, token = current_token(where, say=say)
    if where.town_id is not None and token is not None and token_town(token) != where.town_id:
        say(f"the env file's token is of another town than {where.town_id}; CMD gets none")
        token = None
    if not usable(token, where.town_id):
        # An expired token still goes out: it fails as loudly as none, and says which one.
        say("no unexpired token after asking the daemon; running the command anyway")
    program = os.path.basename(argv[0])
    helper = None
    if program == "claude":
        helper = _helper_for_claude(where, {**os.environ, **values}, say=say)
    env = agent_environment(
        os.environ,
        values,
        token,
        program=program,
        helper_ttl_ms=args.helper_ttl_ms,
        town_id=where.town_id,
        helper=helper,
    )
    # Tools the agent runs (`gastown-sandboxd status`, a nested exec) find the same daemon.
    env.setdefault("GASTOWN_SANDBOXD_SOCKET", str(where.socket))
    env.setdefault("GASTOWN_ENV_FILE", str(where.env_file))
    executable = resolve_command(argv[0], env.get("PATH", os.defpath))
    _default_signals()
    try:
        os.execve(executable, argv, env)  # noqa: S606 - exec without a shell is the point
    except OSError as exc:
        say(f"cannot exec {argv[0]}: {exc.strerror}")
        return 127 if isinstance(exc, FileNotFoundError) else 126


def run_token(args: argparse.Namespace, *, say: Say = _say) -> int:
    """`token`: the current token on stdout, or exit 1 with stdout empty."""
    where = locate(args.env_file, args.socket, args.config, town_id=args.town_id)
    _values, token = current_token(where, say=say)
    if token is None or not usable(token, where.town_id):
        say("no acceptable token, even after asking the daemon")
        return EXIT_FAILURE
    try:
        sys.stdout.write(token + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # A reader that went away: end quietly (stdout points at nothing from here on).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _helper_for_claude(where: Where, env: Mapping[str, str], *, say: Say) -> bool:
    """Whether the settings this claude reads (`$CLAUDE_CONFIG_DIR`'s, else `~/.claude`'s)
    hold the daemon's helper, set here first when they lack it or hold a stale one.

    The keeper keeps the default folder every 30 s, but a claude started before its pass
    gets the token in ANTHROPIC_AUTH_TOKEN, which beats the helper, and sent that one token
    for its whole life, expired included (a reviewer: `gt account switch` makes a fresh
    `~/.claude`); a gt account's folder (gt starts each role's claude with its own) the
    keeper never sees. A helper line of this daemon with other paths or another town (a
    restored volume, a moved package) printed nothing, while exec took the working token
    away: every request went out with an empty bearer. With the town known (shims pass it)
    the line must be the one the keeper would write, its interpreter aside; without it, any
    line of the daemon's whose files are there is taken as it is. A file that is not JSON,
    or empty (Claude Code may be writing it), is left, and claude gets the token instead."""
    command = claude.helper_command(
        python=sys.executable, env_file=where.env_file, socket=where.socket, town_id=where.town_id
    )
    found = claude.current_helper(env)
    if claude.same_helper(found, command):
        return True
    if where.town_id is None and claude.helper_can_run(found):
        return True  # the town unknown here: a line of the daemon's that can run is taken
    path = claude.settings_path(env)
    done = claude.set_helper(path, command)
    if done.outcome in ("written", "in_place"):
        return True
    say(f"apiKeyHelper not set in {path} ({done.outcome}): claude gets the token instead")
    return False


def _default_signals() -> None:
    """Give CMD the dispositions a shell would: CPython ignores SIGPIPE and SIGXFSZ, and an
    ignored signal stays ignored across exec, for CMD and every process it starts (an agent's
    `yes | head -1` would end in "Broken pipe" and 1, not quietly in 141). `_signal`, not
    `signal`, which imports enum: this runs at every agent start."""
    import _signal  # type: ignore[import-not-found]  # signal's own C module, no stub

    for number in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(number, _signal.SIG_DFL)


def locate(
    env_file: str | None,
    socket: str | None,
    config_file: Path | None,
    *,
    town_id: str | None = None,
) -> Where:
    """The env file by flag, environment or TOML; else the running daemon's; else the default.
    The town by flag (shims and the helper carry the daemon's), environment or TOML.

    With both paths given (as shims and the helper give them) nothing else is read.
    """
    if env_file and socket and config_file is None:
        return Where(env_file, socket, town_id or os.environ.get("TOWN_ID") or None)
    from gastown_sandboxd.client import running_daemon_env_file
    from gastown_sandboxd.options import load_client_options

    flags = {"env_file": env_file, "socket": socket}
    options = load_client_options(flags, config_file=config_file)
    named = options.env_file
    if not options.env_file_given:
        named = running_daemon_env_file(options.socket) or options.env_file
    return Where(os.fspath(named), os.fspath(options.socket), town_id or options.town_id)


def current_token(where: Where, *, say: Say = _say) -> tuple[dict[str, str], str | None]:
    """The env file's variables and token, after asking the daemon when it is not usable."""
    values = read_values(where.env_file, os.environ)
    token = values.get(TOKEN_KEY)
    if usable(token, where.town_id):
        return values, token
    _ask_daemon_to_refresh(where.socket, say=say)
    values = read_values(where.env_file, os.environ)
    return values, values.get(TOKEN_KEY) or None


def resolve_command(command: str, search_path: str) -> str:
    """`command` as `execvp` would find it, passing over agent shims (no second wrapping).

    A legacy `exec_wrapper` (`gastown-sandboxd exec -- claude`) would otherwise find the shim
    first on PATH and start Python twice. Unfound, the command is returned as given.
    """
    if "/" in command:
        return command
    from pathlib import Path

    from gastown_sandboxd.agents.shims import is_shim

    for folder in search_path.split(os.pathsep):
        candidate = os.path.join(folder or ".", command)
        runnable = os.path.isfile(candidate) and os.access(candidate, os.X_OK)
        if runnable and not is_shim(Path(candidate)):
            return candidate
    return command


def read_values(path: StrPath, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every variable the env file sets, as bash would see them (`$NAME` expanded from the
    lines before and then `environ`); empty when it cannot be read, is no regular file (a
    FIFO or /dev/zero held an agent's start, and the helper, for ever) or is over 1 MiB
    (`read_env`)."""
    try:
        env_file = read_env(path)
    except OSError:
        return {}
    return env_file.values(environ)


def usable(token: str | None, town_id: str | None, *, now: float | None = None) -> bool:
    """Acceptable and unexpired; the town is checked only when it is known."""
    if not token:
        return False
    now = time.time() if now is None else now
    reasons = acceptability_reasons(token, town_id=town_id or "", now=now)
    if town_id is None:
        reasons = [r for r in reasons if r != "wrong_town"]
    return not reasons


def is_gateway_token(value: str) -> bool:
    """True when `value` is a sandbox token (of any age or town): a credential to replace.

    Also with blanks or a line end around it, or in one pair of quotes (a value copied from
    a file or a shell): a CLI that trims its variable would still send that old token.
    """
    return token_town(value) is not None


def token_town(value: str) -> str | None:
    """The town of the sandbox token `value` (of any age; read as `is_gateway_token` reads
    it), or None when it is none."""
    value = value.strip()
    if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    if value.count(".") != 2 or len(value) > 8192:
        return None
    try:
        claims = decode_unverified(value)
    except (TokenError, ValueError):
        return None
    return claims.town_id if claims.type == TOKEN_TYPE else None


def agent_environment(
    inherited: Mapping[str, str],
    values: Mapping[str, str],
    token: str | None,
    *,
    program: str,
    helper_ttl_ms: int = DEFAULT_HELPER_TTL_MS,
    town_id: str | None = None,
    helper: bool | None = None,
) -> dict[str, str]:
    """The environment CMD gets: inherited + env file, tokens current, claude on its helper.

    Every sandbox token in it other than `token` is replaced by `token`; with none to put in
    its place, one of another town than `town_id` (when known) is removed: its usage would
    be billed to that town, and the daemon itself refuses it. `helper`: whether claude's
    settings hold the daemon's helper (None: read them to know)."""
    env = dict(inherited)
    env.update(values)
    for name in SECRETS_OF_THE_DAEMON:
        env.pop(name, None)  # an agent (a model) could read them; none needs them
    for name, value in list(env.items()):
        town = token_town(value)
        if town is None or value == token:
            continue
        if token is not None and name != TOKEN_KEY:
            env[name] = token
        elif town_id is not None and town != town_id:
            del env[name]
    if token is not None:
        for name in GATEWAY_VARIABLES:
            env[name] = token
        for name in CLI_CREDENTIALS.get(program, ()):
            if not env.get(name) or is_gateway_token(env[name]):
                env[name] = token
    if program == "claude" and (claude.helper_in_place(env) if helper is None else helper):
        # A set ANTHROPIC_AUTH_TOKEN beats the helper: drop it (and a gateway token posing
        # as an API key), so that a running session follows the helper's refreshes.
        env.pop("ANTHROPIC_AUTH_TOKEN", None)
        if is_gateway_token(env.get("ANTHROPIC_API_KEY", "")):
            del env["ANTHROPIC_API_KEY"]
        env.setdefault(claude.TTL_VARIABLE, str(helper_ttl_ms))
    return env


def _ask_daemon_to_refresh(socket: str, *, say: Say) -> None:
    from gastown_sandboxd.client import DaemonClient, DaemonUnavailable

    try:
        with DaemonClient(socket, timeout=REFRESH_WAIT) as client:
            client.post("/token/refresh", ok=(200, 409, 502))
    except DaemonUnavailable as exc:
        say(str(exc))
    except Exception as exc:
        if type(exc).__module__.startswith("httpx"):
            say(f"the daemon did not refresh within {REFRESH_WAIT:.0f} s")
            return
        raise


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The light entry's parser: `python -m gastown_sandboxd.agents exec|token …`.

    Given the `command` the arguments start with, only that command's parser is built (an
    agent start or a helper run builds one, not both); otherwise both, for help and errors.
    """
    parser = argparse.ArgumentParser(
        prog="gastown-sandboxd",
        description="The agent commands of gastown-sandboxd, without the daemon's imports.",
        formatter_class=help_formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in (None, "exec"):
        exec_ = commands.add_parser(
            "exec", help="run a command with the current token", formatter_class=help_formatter
        )
        exec_.description = EXEC_COMMAND_HELP
        add_exec_arguments(exec_)
    if command in (None, "token"):
        token = commands.add_parser(
            "token", help="print the current token", formatter_class=help_formatter
        )
        token.description = PRINT_COMMAND_HELP
        add_common_arguments(token)
    return parser


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's own formatter, as wide as the terminal, found without `shutil`.

    argparse makes a formatter for every argument it adds, and one given no width imports
    `shutil` (with `bz2`, `lzma` and `fnmatch`) to ask the terminal's width: a few ms of
    every agent start. The width comes from the same places (`COLUMNS`, then the terminal
    on stdout, else 80), less the 2 argparse takes off.
    """
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            columns = 0
    return argparse.HelpFormatter(prog, width=(columns or 80) - 2)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of shims and of Claude Code's helper; same grammar as `gastown-sandboxd`."""
    from gastown_sandboxd.errors import OptionsError

    words = sys.argv[1:] if argv is None else argv
    command = words[0] if words and words[0] in ("exec", "token") else None
    args = build_parser(command).parse_args(argv)
    try:
        return run_exec(args) if args.command == "exec" else run_token(args)
    except OptionsError as exc:
        for line in str(exc).splitlines():
            _say(line)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
