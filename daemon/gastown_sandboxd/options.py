"""The daemon's own options: flag > environment > TOML file > default (CONTRACT §2).

`load_options` returns a frozen `Options` or raises `OptionsProblems` naming every missing or
bad setting found (one line each, printed before exit 2): the loader collects problems rather
than stopping at the first. Secrets are `Secret` values that never show in `repr` or `str`.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gastown_sandboxd._files import NotRegularFile, read_regular
from gastown_sandboxd._http import TrustUnavailable, trust_locations
from gastown_sandboxd.errors import OptionsError, OptionsProblems
from gastown_sandboxd.events import specs
from gastown_sandboxd.events.specs import HookSpec, SignalSpec
from gastown_sandboxd.events.types import EVENT_TYPES
from gastown_sandboxd.token.schedule import SchedulePolicy

DEFAULT_CONFIG_FILE = Path("/etc/gastown-sandboxd/config.toml")
MIN_KEY_LENGTH = 16
# sun_path holds 108 bytes on Linux, the last one the terminating NUL.
MAX_SOCKET_PATH = 107
DEFAULT_AGENT_SHIMS = ("claude", "codex", "kilo", "gemini", "opencode")
DEFAULT_CLAUDE_HELPER_TTL = 300.0
_T = TypeVar("_T")


class _Problems:
    """Collects `OptionsError`s so that one pass reports every bad setting."""

    def __init__(self) -> None:
        self.found: list[OptionsError] = []

    def add(self, error: OptionsError) -> None:
        if isinstance(error, OptionsProblems):
            self.found.extend(error.problems)
        else:
            self.found.append(error)

    def take(self, read: Callable[[], _T], fallback: _T) -> _T:
        """`read()`, or `fallback` with its problem noted."""
        try:
            return read()
        except OptionsError as exc:
            self.add(exc)
            return fallback

    def raise_any(self) -> None:
        if self.found:
            raise OptionsProblems(self.found)


class Secret:
    """A secret string: `reveal()` gives it, `repr` and `str` never do."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Listen:
    """A TCP listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def family(self) -> socket.AddressFamily:
        """The family of the socket it is bound with: IPv6 for a `[V6]:PORT` address."""
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


@dataclass(frozen=True, kw_only=True)
class Options:
    """Everything the daemon needs to run; build it with `load_options`."""

    town_id: str
    cloud_url: str
    internal_key: Secret
    town_root: Path
    env_file: Path
    listen: Listen
    socket: Path
    schedule: SchedulePolicy = field(default_factory=SchedulePolicy)
    refresh_timeout: float = 10.0
    hooks: tuple[HookSpec, ...] = ()
    signals: tuple[SignalSpec, ...] = ()
    extra_presets: tuple[str, ...] = ()
    # Old spellings still read, each a sentence the daemon logs at start.
    deprecations: tuple[str, ...] = ()
    watch_debounce_ms: int = 50
    watch_step_ms: int = 10
    log_format: str = "auto"
    log_level: str = "info"
    config_file: Path | None = None
    state_dir: Path = Path("~/.local/state/gastown-sandboxd")
    config_sync_interval: float = 300.0
    shim_dir: Path = field(default_factory=lambda: default_shim_dir(os.environ))
    agent_shims: tuple[str, ...] = DEFAULT_AGENT_SHIMS
    claude_helper_ttl: float = DEFAULT_CLAUDE_HELPER_TTL


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """What the client commands (`status`, `events`, `refresh`, `exec`) need."""

    socket: Path
    env_file: Path
    town_id: str | None
    listen: Listen
    internal_key: Secret | None
    # True when a flag, the environment or the TOML file named the env file (not the default).
    env_file_given: bool = False


def parse_duration(value: object, *, setting: str) -> float:
    """Seconds from `30`, `2.5`, `"500ms"`, `"30s"`, `"5m"` or `"1h"`; must be positive."""
    try:
        seconds = specs.parse_duration(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionsError(
            setting, f"{value!r} is not a duration", 'write it like "30s" or "500ms"'
        ) from None
    if seconds <= 0:
        raise OptionsError(setting, "must be positive", 'write it like "30s"')
    return seconds


# Every sandbox of the fleet reads the cloud this often: a typo such as "5ms" for "5m" must
# not send 100,000 sandboxes to it 200 times a second. Changes pushed by the dashboard do not
# wait for the interval (CONTRACT §10): it only bounds how late a missed push is noticed.
MIN_SYNC_INTERVAL = 10.0


def _sync_interval(table: Mapping[str, Any]) -> float:
    setting = "config_sync.interval"
    value = table.get("interval", 300.0)
    seconds = parse_duration(value, setting=setting)
    if seconds < MIN_SYNC_INTERVAL:
        raise OptionsError(
            setting,
            f"{value!r} is under the least of {MIN_SYNC_INTERVAL:g} s (every sandbox reads "
            "the cloud this often)",
            'write it like "5m"',
        )
    return seconds


LISTEN_SETTING = "listen (GASTOWN_SANDBOXD_LISTEN)"


def parse_listen(value: str, *, setting: str = LISTEN_SETTING) -> Listen:
    """`HOST:PORT` or `[V6]:PORT` into a `Listen`."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s]+):(\d+)", value.strip())
    if match is None:
        raise OptionsError(setting, f"{value!r} is not HOST:PORT", "write it like 127.0.0.1:8080")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise OptionsError(setting, f"port {port} is out of range", "use a port up to 65535")
    return Listen(host, port)


def default_socket(env: Mapping[str, str]) -> Path:
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "gastown-sandboxd.sock"
    return _home(env) / ".gastown-sandboxd.sock"


def default_state_dir(env: Mapping[str, str]) -> Path:
    """`$XDG_STATE_HOME/gastown-sandboxd`, else `~/.local/state/gastown-sandboxd`."""
    state = env.get("XDG_STATE_HOME")
    if state:
        return Path(state) / "gastown-sandboxd"
    return _home(env) / ".local" / "state" / "gastown-sandboxd"


def default_shim_dir(env: Mapping[str, str]) -> Path:
    """`$XDG_DATA_HOME/gastown-sandboxd/bin`, else `~/.local/share/gastown-sandboxd/bin`."""
    data = env.get("XDG_DATA_HOME")
    base = Path(data) if data else _home(env) / ".local" / "share"
    return base / "gastown-sandboxd" / "bin"


def read_toml(path: Path | None, env: Mapping[str, str]) -> tuple[dict[str, Any], Path | None]:
    """The TOML file named by --config, else the default one when it exists."""
    if path is None:
        try:
            if not DEFAULT_CONFIG_FILE.is_file():
                return {}, None
        except OSError as exc:  # a folder this user may not enter: is_file raises EACCES
            raise OptionsError(
                "--config",
                f"cannot look for {DEFAULT_CONFIG_FILE}: {exc.strerror}",
                "let this user enter its folder, or name a file with --config",
            ) from None
        path = DEFAULT_CONFIG_FILE
    import tomllib  # only with a file: ~4 ms of each command otherwise

    path = _expand(str(path), env)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle), path
    except FileNotFoundError:
        raise OptionsError("--config", f"{path} does not exist", "give an existing file") from None
    except OSError as exc:
        raise OptionsError(
            "--config", f"cannot read {path}: {exc.strerror}", "fix its permissions"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionsError(
            "--config", f"{path} is not valid TOML ({exc})", "fix the file"
        ) from None
    except UnicodeDecodeError:
        raise OptionsError("--config", f"{path} is not UTF-8 text", "save it as UTF-8") from None
    except RecursionError:
        raise OptionsError("--config", f"{path} is nested too deeply", "fix the file") from None


def load_options(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    *,
    check_paths: bool = False,
    check_listen: bool = False,
) -> Options:
    """Resolve every setting; raise `OptionsProblems` naming every missing or bad one.

    `check_paths` also checks the folders the daemon needs (town root, env file's folder);
    `check_listen` binds the listen address for a moment, as `run` would (`check_listen_at`).
    """
    problems = _Problems()
    pick, used_file = _Picker.load(flags, env, config_file, problems)
    toml, env = pick.toml, pick.env
    problems.take(lambda: _check_keys(toml), None)

    town_id = problems.take(lambda: _town_id(pick), "")
    cloud_url = problems.take(lambda: _cloud_url(pick), "")
    if cloud_url.startswith("https://"):  # the CAs it is verified with (a bad one: exit 2)
        problems.take(lambda: _trust(env), None)
    key = problems.take(lambda: _internal_key(pick), "")

    empty: Mapping[str, Any] = {}
    refresh = problems.take(lambda: _table(toml, "refresh"), empty)
    watcher = problems.take(lambda: _table(toml, "watcher"), empty)
    presets = problems.take(lambda: _table(toml, "presets"), empty)
    # `[config] extra_presets` was the table's first name ("config" also names gt's files).
    legacy = problems.take(lambda: _table(toml, "config"), empty)
    deprecations: list[str] = []
    if legacy:
        deprecations.append("[config] extra_presets is now [presets] extra")
    config_sync = problems.take(lambda: _table(toml, "config_sync"), empty)
    for unknown in sorted(set(config_sync) - {"interval"}):
        problems.add(
            OptionsError(f"config_sync.{unknown}", "is not a setting", "only interval can be set")
        )
    state_dir = problems.take(
        lambda: pick.text("state_dir", ("GASTOWN_SANDBOXD_STATE_DIR",), setting="state_dir"), None
    )
    agents = problems.take(lambda: _table(toml, "agents"), empty)
    for unknown in sorted(set(agents) - {"shims", "shim_dir", "claude_helper_ttl"}):
        problems.add(
            OptionsError(
                f"agents.{unknown}", "is not a setting", "use shims, shim_dir or claude_helper_ttl"
            )
        )
    defaults = SchedulePolicy()

    def duration(table: Mapping[str, Any], name: str, default: float, setting: str) -> float:
        return problems.take(
            lambda: parse_duration(table.get(name, default), setting=setting), default
        )

    fraction = problems.take(lambda: _fraction(refresh, "fraction", 0.5), 0.5)
    if fraction == 0:
        # Refreshing at iat: every token is due as it arrives, a call every 2 s for ever.
        problems.add(OptionsError("refresh.fraction", "must be above 0", "use e.g. 0.5"))
    jitter = problems.take(lambda: _fraction(refresh, "jitter", 0.1), 0.1)
    if 0 < fraction <= jitter:
        problems.add(
            OptionsError(
                "refresh.jitter",
                f"{jitter!r} is not under refresh.fraction ({fraction!r})",
                "a refresh would be drawn at or before iat: use e.g. 0.1 with 0.5",
            )
        )
    schedule = SchedulePolicy(
        refresh_fraction=fraction,
        jitter_fraction=jitter,
        backoff_initial=duration(
            refresh, "backoff_initial", defaults.backoff_initial, "refresh.backoff_initial"
        ),
        backoff_max=duration(refresh, "backoff_max", defaults.backoff_max, "refresh.backoff_max"),
        max_sleep=duration(refresh, "max_sleep", defaults.max_sleep, "refresh.max_sleep"),
    )
    for table, known, name in ((presets, "extra", "presets"), (legacy, "extra_presets", "config")):
        for unknown in sorted(set(table) - {known}):
            problems.add(OptionsError(f"{name}.{unknown}", "is not a setting", f"only {known}"))
    extra_setting = "presets.extra" if "extra" in presets or not legacy else "config.extra_presets"
    extra = presets.get("extra", legacy.get("extra_presets", []))
    if not isinstance(extra, list) or not all(isinstance(x, str) and x for x in extra):
        problems.add(
            OptionsError(extra_setting, "must be a list of agent names", 'write ["name", …]')
        )
        extra = []

    options = Options(
        town_id=town_id,
        cloud_url=cloud_url.rstrip("/"),
        internal_key=Secret(key),
        town_root=_expand(pick.text("town_root", ("GT_TOWN_ROOT", "GT_ROOT")) or "~/gt", env),
        env_file=pick.env_file(),
        listen=pick.listen(),
        socket=problems.take(pick.socket, default_socket(env)),
        schedule=schedule,
        refresh_timeout=duration(refresh, "timeout", 10.0, "refresh.timeout"),
        hooks=tuple(_hooks(toml.get("hooks", []), problems)),
        signals=tuple(_signals(toml.get("signals", []), env, problems)),
        extra_presets=tuple(extra),
        deprecations=tuple(deprecations),
        watch_debounce_ms=problems.take(lambda: _millis(watcher, "debounce", 50), 50),
        watch_step_ms=problems.take(lambda: _millis(watcher, "step", 10), 10),
        log_format=problems.take(
            lambda: _choice(
                pick.text("log_format", ("GASTOWN_SANDBOXD_LOG_FORMAT",)) or "auto",
                "log_format",
                ("auto", "json", "console"),
            ),
            "auto",
        ),
        log_level=problems.take(
            lambda: _choice(
                pick.text("log_level", ("GASTOWN_SANDBOXD_LOG_LEVEL",)) or "info",
                "log_level",
                ("debug", "info", "warning", "error"),
            ),
            "info",
        ),
        config_file=used_file,
        state_dir=_expand(state_dir, env) if state_dir else default_state_dir(env),
        config_sync_interval=problems.take(lambda: _sync_interval(config_sync), 300.0),
        shim_dir=problems.take(lambda: pick.shim_dir(agents), default_shim_dir(env)),
        agent_shims=problems.take(lambda: _agent_names(agents), DEFAULT_AGENT_SHIMS),
        claude_helper_ttl=duration(
            agents, "claude_helper_ttl", DEFAULT_CLAUDE_HELPER_TTL, "agents.claude_helper_ttl"
        ),
    )
    listen_read = not any(problem.setting == LISTEN_SETTING for problem in problems.found)
    if check_listen and listen_read:
        problems.take(lambda: check_listen_at(options.listen, options.socket), None)
    if check_paths:
        problems.take(lambda: check_town_root(options.town_root), None)
        problems.take(lambda: check_env_folder(options.env_file), None)
        problems.take(lambda: check_env_file(options.env_file), None)
        problems.take(lambda: check_socket_path(options.socket), None)
        problems.take(lambda: check_socket_lock_path(options.socket), None)
        if not problems.found:
            # The folders `run` makes before it serves, made here the same way (so `check`
            # stops where `run` would), and only for options otherwise good: a `check` that
            # fails writes nothing.
            problems.take(lambda: check_shim_dir(options.shim_dir), None)
            problems.take(lambda: check_socket_folder(options.socket), None)
    problems.raise_any()
    return options


def _town_id(pick: _Picker) -> str:
    town_id = pick.text("town_id", ("TOWN_ID",), setting="town id (TOWN_ID)")
    if town_id is None or not town_id.strip():
        raise OptionsError(
            "town id (TOWN_ID)", "is missing", "set TOWN_ID or town_id in the TOML file"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", town_id):
        raise OptionsError(
            "town id (TOWN_ID)", "has characters outside A-Z a-z 0-9 _ . : -", "fix TOWN_ID"
        )
    return town_id


def _cloud_url(pick: _Picker) -> str:
    cloud_url = pick.text(
        "cloud_url", ("CLOUD_API_URL", "KILO_API_URL"), setting="cloud URL (CLOUD_API_URL)"
    )
    if not cloud_url:
        raise OptionsError(
            "cloud URL (CLOUD_API_URL)", "is missing", "set CLOUD_API_URL or KILO_API_URL"
        )
    setting = "cloud URL (CLOUD_API_URL)"
    parts = urlsplit(cloud_url)
    if parts.username is not None or parts.password is not None:
        # Not echoed: it would print the password.
        raise OptionsError(setting, "holds a user or a password", "give the URL without them")
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise OptionsError(
            setting, f"{cloud_url!r} is not an http(s) URL", "write it like https://app.kilo.ai"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        raise OptionsError(setting, f"{cloud_url!r} has no valid port", "give 1 to 65535") from None
    if parts.query or parts.fragment or cloud_url.endswith(("?", "#")):
        raise OptionsError(
            setting, f"{cloud_url!r} has a query or a fragment", "give the base URL alone"
        )
    if not cloud_url.isprintable() or any(c.isspace() for c in cloud_url):
        raise OptionsError(
            setting, f"{cloud_url!r} holds spaces or control characters", "remove them"
        )
    return cloud_url


def _trust(env: Mapping[str, str]) -> None:
    try:
        trust_locations(env)
    except TrustUnavailable as exc:
        raise OptionsError(exc.variable, exc.problem, exc.FIX) from None


def _internal_key(pick: _Picker) -> str:
    key = pick.text(
        "internal_api_key", ("INTERNAL_API_KEY",), setting="internal API key (INTERNAL_API_KEY)"
    )
    if not key:
        raise OptionsError(
            "internal API key (INTERNAL_API_KEY)", "is missing", "set INTERNAL_API_KEY"
        )
    if len(key) < MIN_KEY_LENGTH:
        raise OptionsError(
            "internal API key (INTERNAL_API_KEY)",
            f"is shorter than {MIN_KEY_LENGTH} characters",
            "use the key the cloud was given",
        )
    # It travels in an HTTP header, which holds printable ASCII; a space or line end around
    # it (an editor's, a shell's) would make every call an outage. Never echoed.
    if not (key.isascii() and key.isprintable()) or key != key.strip():
        raise OptionsError(
            "internal API key (INTERNAL_API_KEY)",
            "holds spaces around it, or characters other than printable ASCII",
            "use the key the cloud was given, exactly",
        )
    return key


def check_town_root(path: Path) -> None:
    """The town root must be a folder the daemon can read and enter; else `OptionsError`."""
    try:
        is_folder = path.is_dir()
    except OSError as exc:  # a folder above it that the daemon may not enter (EACCES)
        raise OptionsError(
            "town root (GT_TOWN_ROOT)",
            f"{path} cannot be reached ({exc.strerror})",
            "give the daemon's user access to the folders above it",
        ) from None
    if not is_folder:
        raise OptionsError(
            "town root (GT_TOWN_ROOT)", f"{path} is not a folder", "create it or set GT_TOWN_ROOT"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise OptionsError(
            "town root (GT_TOWN_ROOT)",
            f"{path} cannot be read",
            "give the daemon's user read access",
        )


def check_env_folder(env_file: Path) -> None:
    """The env file's folder must exist (atomic writes rename into it).

    A folder that exists but refuses writes (a read-only disk) is a runtime fault, not a bad
    option: the daemon serves, is not ready, and retries.
    """
    folder = env_file.parent
    setting = "env file (GASTOWN_ENV_FILE)"
    try:
        is_folder = folder.is_dir()
    except OSError as exc:
        raise OptionsError(
            setting,
            f"its folder {folder} cannot be reached ({exc.strerror})",
            "give the daemon's user access to the folders above it",
        ) from None
    if not is_folder:
        raise OptionsError(
            setting,
            f"its folder {folder} does not exist",
            f"create it (mkdir -p {folder}) or set GASTOWN_ENV_FILE",
        )


def check_env_file(env_file: Path) -> None:
    """What is at the env file's path, if anything, is a regular file the daemon's user can
    read (a symlink is followed): a folder, a FIFO or a device there, or a file of another
    user's with mode 0600, failed the first refresh with a traceback, where it is a setting
    to fix (`OptionsError`). Opened as `read_env` opens it (`read_regular`)."""
    setting = "env file (GASTOWN_ENV_FILE)"
    try:
        read_regular(env_file, 0)
    except FileNotFoundError:
        return  # the daemon makes it
    except NotRegularFile as exc:
        raise OptionsError(
            setting,
            f"{env_file} is {exc.strerror} (it is left as it is)",
            "remove it (the daemon makes the file), or set GASTOWN_ENV_FILE",
        ) from None
    except OSError as exc:
        raise OptionsError(
            setting,
            f"{env_file} cannot be read ({exc.strerror})",
            "give it to the daemon's user (chown), or set GASTOWN_ENV_FILE",
        ) from None


def check_socket_path(path: Path) -> None:
    """Nothing at the socket's path, or a socket (a stale one is replaced at start); anything
    else there is not the daemon's to remove, so it cannot start: `OptionsError`."""
    setting = "local socket (GASTOWN_SANDBOXD_SOCKET)"
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OptionsError(
            setting,
            f"{path} cannot be reached ({exc.strerror})",
            "give the daemon's user access to its folder, or set --socket",
        ) from None
    if not stat.S_ISSOCK(mode):
        raise OptionsError(
            setting,
            f"{path} is a {not_a_socket(mode)}, not a socket (it is left as it is)",
            "remove it, or give the daemon another socket (--socket)",
        )


def check_socket_lock_path(path: Path) -> None:
    """Nothing at the socket's lock (`<socket>.lock`), or a regular file (a symlink is
    followed, as the lock's open follows it): a folder there stopped `run` with exit 1,
    "cannot start", and `check` passed it."""
    from gastown_sandboxd.ops.socket_lock import lock_path

    lock = lock_path(path)
    try:
        mode = lock.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        problem = f"{lock} cannot be reached ({exc.strerror})"
    else:
        if stat.S_ISREG(mode):
            return
        problem = f"{lock}, the socket's lock, is a {not_a_socket(mode)}, not a file"
    raise OptionsError(
        "local socket (GASTOWN_SANDBOXD_SOCKET)",
        f"{problem} (it is left as it is)",
        "remove it, or give the daemon another socket (--socket)",
    )


def check_listen_at(listen: Listen, socket_path: Path) -> None:
    """The listen address can be bound, as `run` binds it (`OptionsError` else): its host
    resolves to an address of this machine, and the port is free and allowed. When a daemon
    holds `socket_path`'s lock the port is its own: then the host is only resolved."""
    from gastown_sandboxd.ops.socket_lock import owner_pid

    try:
        socket.getaddrinfo(listen.host, listen.port, listen.family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OptionsError(
            LISTEN_SETTING,
            f"{listen.host} cannot be resolved ({exc.strerror})",
            "use an IP address, or a name this machine resolves",
        ) from None
    if owner_pid(socket_path) is not None:
        return
    with socket.socket(listen.family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((listen.host, listen.port))
        except OSError as exc:
            raise OptionsError(
                LISTEN_SETTING,
                f"{listen} cannot be bound ({exc.strerror})",
                _BIND_FIXES.get(exc.errno or 0, "choose another listen address"),
            ) from None


_BIND_FIXES = {
    errno.EADDRINUSE: "stop the program that listens there, or choose another port",
    errno.EADDRNOTAVAIL: "use an address of this machine (or 0.0.0.0 for all of them)",
    errno.EACCES: "choose a port from 1024 up, or give the daemon the right to bind below it",
}


def check_shim_dir(path: Path) -> None:
    """Create the shim folder if needed and prove it writable; else `OptionsError` (exit 2)."""
    setting = "agent shim folder (GASTOWN_SANDBOXD_SHIM_DIR)"
    fix = "give the daemon's user a writable folder, or set --shim-dir"
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OptionsError(setting, f"{path} cannot be written ({exc.strerror})", fix) from None


def check_socket_folder(path: Path) -> None:
    """Make the socket's folder as the daemon's lock does, and prove it writable; else
    `OptionsError` (a folder under procfs, one this user cannot write)."""
    folder = path.parent
    fix = "give a path in a folder the daemon's user can write (--socket)"
    setting = "local socket (GASTOWN_SANDBOXD_SOCKET)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"its folder {folder} cannot be made ({exc.strerror})"
        raise OptionsError(setting, message, fix) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionsError(setting, f"its folder {folder} cannot be written in", fix)


def not_a_socket(mode: int) -> str:
    """What is at a socket's path instead of a socket, by its `st_mode`, as one word."""
    return "folder" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "file"


def load_client_options(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ClientOptions:
    """The subset the client commands need; nothing here is required."""
    problems = _Problems()
    pick, _ = _Picker.load(flags, env, config_file, problems)
    key = pick.text("internal_api_key", ("INTERNAL_API_KEY",))
    options = ClientOptions(
        socket=problems.take(pick.socket, default_socket(pick.env)),
        env_file=pick.env_file(),
        town_id=pick.text("town_id", ("TOWN_ID",)),
        listen=pick.listen(),
        internal_key=Secret(key) if key else None,
        env_file_given=pick.text("env_file", ("GASTOWN_ENV_FILE",)) is not None,
    )
    problems.raise_any()
    return options


_TOP_KEYS = frozenset(
    {
        "town_id",
        "cloud_url",
        "internal_api_key",
        "town_root",
        "env_file",
        "listen",
        "socket",
        "log_format",
        "log_level",
        "refresh",
        "watcher",
        "config",
        "presets",
        "hooks",
        "signals",
        "state_dir",
        "config_sync",
        "agents",
    }
)


def _check_keys(toml: Mapping[str, Any]) -> None:
    unknown = sorted(set(toml) - _TOP_KEYS)
    if unknown:
        raise OptionsProblems(
            [
                OptionsError(
                    f"--config key {name!r}",
                    "is not a setting",
                    "see config/gastown-sandboxd.example.toml",
                )
                for name in unknown
            ]
        )


@dataclass(frozen=True)
class _Picker:
    """Reads one value from the three sources; a bad value is noted in `problems`."""

    flags: Mapping[str, Any]
    env: Mapping[str, str]
    toml: Mapping[str, Any]
    problems: _Problems

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None,
        env: Mapping[str, str] | None,
        config_file: Path | None,
        problems: _Problems,
    ) -> tuple[_Picker, Path | None]:
        """The three sources, flags without unset values; and the TOML file used, if any.

        A TOML file that cannot be read is a problem; the flags and environment are still read.
        """
        env = os.environ if env is None else env
        nothing: tuple[dict[str, Any], Path | None] = ({}, None)
        toml, used_file = problems.take(lambda: read_toml(config_file, env), nothing)
        given = {k: v for k, v in (flags or {}).items() if v is not None}
        return cls(given, env, toml, problems), used_file

    def env_file(self) -> Path:
        return _expand(self.text("env_file", ("GASTOWN_ENV_FILE",)) or "~/.env.gateway", self.env)

    def shim_dir(self, agents: Mapping[str, Any]) -> Path:
        if "shim_dir" in self.flags:
            return _expand(str(self.flags["shim_dir"]), self.env)
        value = self.env.get("GASTOWN_SANDBOXD_SHIM_DIR") or agents.get("shim_dir")
        if value is None:
            return default_shim_dir(self.env)
        if not isinstance(value, str) or not value:
            raise OptionsError(
                "agents.shim_dir", "must be a folder path", 'write shim_dir = "/path/to/bin"'
            )
        return _expand(value, self.env)

    def listen(self) -> Listen:
        value = self.text("listen", ("GASTOWN_SANDBOXD_LISTEN",)) or "127.0.0.1:8080"
        return self.problems.take(lambda: parse_listen(value), Listen("127.0.0.1", 8080))

    def socket(self) -> Path:
        value = self.text("socket", ("GASTOWN_SANDBOXD_SOCKET",))
        path = _expand(value, self.env) if value else default_socket(self.env)
        size = len(os.fsencode(path))
        if size > MAX_SOCKET_PATH:
            raise OptionsError(
                "local socket (GASTOWN_SANDBOXD_SOCKET)",
                f"{path} is {size} bytes, more than the {MAX_SOCKET_PATH} a Unix socket path "
                "may have",
                "choose a shorter path",
            )
        return path

    def text(
        self, name: str, env_names: Sequence[str], *, setting: str | None = None
    ) -> str | None:
        if name in self.flags:
            return str(self.flags[name])
        for env_name in env_names:
            value = self.env.get(env_name)
            if value:
                return value
        value = self.toml.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            self.problems.add(
                OptionsError(setting or name, "must be a string", f"quote {name} in the TOML file")
            )
            return None
        return value


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or os.path.expanduser("~"))


def _expand(value: str, env: Mapping[str, str]) -> Path:
    # Absolute, against the folder the daemon starts in: these paths go into the shims and
    # Claude's helper line, which agents run from other folders (a rig's worktree).
    if value == "~" or value.startswith("~/"):
        return (_home(env) / value[2:]).absolute()
    return Path(value).absolute()


def _table(toml: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = toml.get(name, {})
    if not isinstance(value, dict):
        raise OptionsError(f"[{name}]", "must be a table", f"write it as [{name}] in the TOML file")
    return value


def _agent_names(agents: Mapping[str, Any]) -> tuple[str, ...]:
    names = agents.get("shims", list(DEFAULT_AGENT_SHIMS))
    if not isinstance(names, list) or not all(
        isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", n) for n in names
    ):
        raise OptionsError(
            "agents.shims", "must be a list of command names", 'write ["claude", "codex"]'
        )
    return tuple(dict.fromkeys(names))


def _fraction(table: Mapping[str, Any], name: str, default: float) -> float:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise OptionsError(
            f"refresh.{name}", f"{value!r} is not a fraction in [0, 1)", "use e.g. 0.5"
        )
    return float(value)


def _millis(table: Mapping[str, Any], name: str, default: int) -> int:
    if name not in table:
        return default
    return max(1, round(parse_duration(table[name], setting=f"watcher.{name}") * 1000))


def _choice(value: str, setting: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise OptionsError(
            setting,
            f"{value!r} is not one of {', '.join(allowed)}",
            f"use one of {', '.join(allowed)}",
        )
    return value


def _events(value: object, setting: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise OptionsError(
            setting, "must be a non-empty list of event types", 'write ["token.refreshed"]'
        )
    unknown = sorted(set(value) - EVENT_TYPES)
    if unknown:
        raise OptionsError(
            setting,
            f"{unknown[0]!r} is not an event type",
            "use " + ", ".join(sorted(EVENT_TYPES)),
        )
    return frozenset(value)


def _hooks(value: object, problems: _Problems) -> list[HookSpec]:
    """Every well-formed hook; each bad entry is noted in `problems`."""
    if not isinstance(value, list):
        problems.add(
            OptionsError("hooks", "must be an array of tables", "write [[hooks]] sections")
        )
        return []
    hooks: list[HookSpec] = []
    for index, item in enumerate(value):
        try:
            hooks.append(_hook(index, item))
        except OptionsError as exc:
            problems.add(exc)
    return hooks


def _hook(index: int, item: object) -> HookSpec:
    where = f"hooks[{index}]"
    if not isinstance(item, dict):
        raise OptionsError(where, "must be a table", "write a [[hooks]] section")
    command = item.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(c, str) and c for c in command)
    ):
        raise OptionsError(
            f"{where}.command",
            "must be a non-empty argv list",
            'write ["/path/to/hook", "arg"]',
        )
    timeout = parse_duration(item.get("timeout", "30s"), setting=f"{where}.timeout")
    return HookSpec(
        events=_events(item.get("events"), f"{where}.events"),
        command=tuple(command),
        timeout=timeout,
    )


def _signals(value: object, env: Mapping[str, str], problems: _Problems) -> list[SignalSpec]:
    """Every well-formed signal entry; each bad entry is noted in `problems`."""
    if not isinstance(value, list):
        problems.add(
            OptionsError("signals", "must be an array of tables", "write [[signals]] sections")
        )
        return []
    specs: list[SignalSpec] = []
    for index, item in enumerate(value):
        try:
            specs.append(_signal(index, item, env))
        except OptionsError as exc:
            problems.add(exc)
    return specs


def _signal(index: int, item: object, env: Mapping[str, str]) -> SignalSpec:
    where = f"signals[{index}]"
    if not isinstance(item, dict):
        raise OptionsError(where, "must be a table", "write a [[signals]] section")
    pid_file = item.get("pid_file")
    if not isinstance(pid_file, str) or not pid_file:
        raise OptionsError(f"{where}.pid_file", "is missing", "name the pid file to read")
    name = item.get("signal", "SIGHUP")
    try:
        signum = specs.parse_signal(name)
    except ValueError:
        raise OptionsError(
            f"{where}.signal", f"{name!r} is not a signal", 'write e.g. "SIGHUP"'
        ) from None
    return SignalSpec(
        pid_file=_expand(pid_file, env),
        signal=signum,
        events=_events(item.get("events"), f"{where}.events"),
    )
