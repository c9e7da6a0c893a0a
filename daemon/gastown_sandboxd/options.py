"""The daemon's settings: flag > environment > TOML file > default (CONTRACT §2).

`load_settings` returns a frozen `Settings` or raises `SettingsError`, whose text is the one
line printed before exit 2. Secrets are `Secret` values that never show in `repr` or `str`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gastown_sandboxd.errors import SettingsError
from gastown_sandboxd.events import notify
from gastown_sandboxd.events.bus import EVENT_TYPES
from gastown_sandboxd.events.notify import HookSpec, SignalSpec
from gastown_sandboxd.token.schedule import SchedulePolicy

DEFAULT_CONFIG_FILE = Path("/etc/gastown-sandboxd/config.toml")
MIN_KEY_LENGTH = 16
DEFAULT_AGENT_SHIMS = ("claude", "codex", "kilo", "gemini", "opencode")
DEFAULT_CLAUDE_HELPER_TTL = 300.0


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


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the daemon needs to run; build it with `load_settings`."""

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
class ClientSettings:
    """What the client commands (`status`, `events`, `refresh`, `exec`) need."""

    socket: Path
    env_file: Path
    town_id: str | None
    listen: Listen
    internal_key: Secret | None


def parse_duration(value: object, *, setting: str) -> float:
    """Seconds from `30`, `2.5`, `"500ms"`, `"30s"`, `"5m"` or `"1h"`; must be positive."""
    try:
        seconds = notify.parse_duration(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingsError(
            setting, f"{value!r} is not a duration", 'write it like "30s" or "500ms"'
        ) from None
    if seconds <= 0:
        raise SettingsError(setting, "must be positive", 'write it like "30s"')
    return seconds


def parse_listen(value: str, *, setting: str = "listen (GASTOWN_SANDBOXD_LISTEN)") -> Listen:
    """`HOST:PORT` or `[V6]:PORT` into a `Listen`."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s]+):(\d+)", value.strip())
    if match is None:
        raise SettingsError(setting, f"{value!r} is not HOST:PORT", "write it like 127.0.0.1:8080")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise SettingsError(setting, f"port {port} is out of range", "use a port up to 65535")
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


def explicit_env_file(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Path | None:
    """The env file a flag, the environment or the TOML file names; None when none does."""
    pick, _ = _Picker.load(flags, env, config_file)
    value = pick.text("env_file", ("GASTOWN_ENV_FILE",))
    return _expand(value, pick.env) if value else None


def read_toml(path: Path | None, env: Mapping[str, str]) -> tuple[dict[str, Any], Path | None]:
    """The TOML file named by --config, else the default one when it exists."""
    if path is None:
        if not DEFAULT_CONFIG_FILE.is_file():
            return {}, None
        path = DEFAULT_CONFIG_FILE
    path = _expand(str(path), env)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle), path
    except FileNotFoundError:
        raise SettingsError("--config", f"{path} does not exist", "give an existing file") from None
    except OSError as exc:
        raise SettingsError(
            "--config", f"cannot read {path}: {exc.strerror}", "fix its permissions"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(
            "--config", f"{path} is not valid TOML ({exc})", "fix the file"
        ) from None


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Resolve every setting; raise `SettingsError` naming the first missing or bad one."""
    pick, used_file = _Picker.load(flags, env, config_file)
    toml, env = pick.toml, pick.env
    _check_keys(toml)

    town_id = pick.text("town_id", ("TOWN_ID",), setting="town id (TOWN_ID)")
    if town_id is None or not town_id.strip():
        raise SettingsError(
            "town id (TOWN_ID)", "is missing", "set TOWN_ID or town_id in the TOML file"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", town_id):
        raise SettingsError(
            "town id (TOWN_ID)", "has characters outside A-Z a-z 0-9 _ . : -", "fix TOWN_ID"
        )

    cloud_url = pick.text(
        "cloud_url", ("CLOUD_API_URL", "KILO_API_URL"), setting="cloud URL (CLOUD_API_URL)"
    )
    if not cloud_url:
        raise SettingsError(
            "cloud URL (CLOUD_API_URL)", "is missing", "set CLOUD_API_URL or KILO_API_URL"
        )
    parts = urlsplit(cloud_url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise SettingsError(
            "cloud URL (CLOUD_API_URL)",
            f"{cloud_url!r} is not an http(s) URL",
            "write it like https://app.kilo.ai",
        )

    key = pick.text(
        "internal_api_key", ("INTERNAL_API_KEY",), setting="internal API key (INTERNAL_API_KEY)"
    )
    if not key:
        raise SettingsError(
            "internal API key (INTERNAL_API_KEY)", "is missing", "set INTERNAL_API_KEY"
        )
    if len(key) < MIN_KEY_LENGTH:
        raise SettingsError(
            "internal API key (INTERNAL_API_KEY)",
            f"is shorter than {MIN_KEY_LENGTH} characters",
            "use the key the cloud was given",
        )

    refresh = _table(toml, "refresh")
    watcher = _table(toml, "watcher")
    config = _table(toml, "config")
    config_sync = _table(toml, "config_sync")
    unknown_sync = sorted(set(config_sync) - {"interval"})
    if unknown_sync:
        raise SettingsError(
            f"config_sync.{unknown_sync[0]}", "is not a setting", "only interval can be set"
        )
    state_dir = pick.text("state_dir", ("GASTOWN_SANDBOXD_STATE_DIR",), setting="state_dir")
    schedule = SchedulePolicy(
        refresh_fraction=_fraction(refresh, "fraction", 0.5),
        jitter_fraction=_fraction(refresh, "jitter", 0.1),
        backoff_initial=parse_duration(
            refresh.get("backoff_initial", 1), setting="refresh.backoff_initial"
        ),
        backoff_max=parse_duration(refresh.get("backoff_max", 300), setting="refresh.backoff_max"),
        max_sleep=parse_duration(refresh.get("max_sleep", 30), setting="refresh.max_sleep"),
    )
    agents = _table(toml, "agents")
    unknown_agent_keys = sorted(set(agents) - {"shims", "shim_dir", "claude_helper_ttl"})
    if unknown_agent_keys:
        raise SettingsError(
            f"agents.{unknown_agent_keys[0]}",
            "is not a setting",
            "use shims, shim_dir or claude_helper_ttl",
        )
    extra = config.get("extra_presets", [])
    if not isinstance(extra, list) or not all(isinstance(x, str) and x for x in extra):
        raise SettingsError(
            "config.extra_presets", "must be a list of agent names", 'write ["name", …]'
        )

    return Settings(
        town_id=town_id,
        cloud_url=cloud_url.rstrip("/"),
        internal_key=Secret(key),
        town_root=_expand(pick.text("town_root", ("GT_TOWN_ROOT", "GT_ROOT")) or "~/gt", env),
        env_file=pick.env_file(),
        listen=pick.listen(),
        socket=pick.socket(),
        schedule=schedule,
        refresh_timeout=parse_duration(refresh.get("timeout", 10), setting="refresh.timeout"),
        hooks=tuple(_hooks(toml.get("hooks", []))),
        signals=tuple(_signals(toml.get("signals", []), env)),
        extra_presets=tuple(extra),
        watch_debounce_ms=_millis(watcher, "debounce", 50),
        watch_step_ms=_millis(watcher, "step", 10),
        log_format=_choice(
            pick.text("log_format", ("GASTOWN_SANDBOXD_LOG_FORMAT",)) or "auto",
            "log_format",
            ("auto", "json", "console"),
        ),
        log_level=_choice(
            pick.text("log_level", ("GASTOWN_SANDBOXD_LOG_LEVEL",)) or "info",
            "log_level",
            ("debug", "info", "warning", "error"),
        ),
        config_file=used_file,
        state_dir=_expand(state_dir, env) if state_dir else default_state_dir(env),
        config_sync_interval=parse_duration(
            config_sync.get("interval", 300), setting="config_sync.interval"
        ),
        shim_dir=pick.shim_dir(agents),
        agent_shims=_agent_names(agents),
        claude_helper_ttl=parse_duration(
            agents.get("claude_helper_ttl", DEFAULT_CLAUDE_HELPER_TTL),
            setting="agents.claude_helper_ttl",
        ),
    )


def load_client_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ClientSettings:
    """The subset the client commands need; nothing here is required."""
    pick, _ = _Picker.load(flags, env, config_file)
    key = pick.text("internal_api_key", ("INTERNAL_API_KEY",))
    return ClientSettings(
        socket=pick.socket(),
        env_file=pick.env_file(),
        town_id=pick.text("town_id", ("TOWN_ID",)),
        listen=pick.listen(),
        internal_key=Secret(key) if key else None,
    )


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
        raise SettingsError(
            f"--config key {unknown[0]!r}",
            "is not a setting",
            "see config/gastown-sandboxd.example.toml",
        )


@dataclass(frozen=True)
class _Picker:
    flags: Mapping[str, Any]
    env: Mapping[str, str]
    toml: Mapping[str, Any]

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None,
        env: Mapping[str, str] | None,
        config_file: Path | None,
    ) -> tuple[_Picker, Path | None]:
        """The three sources, flags without unset values; and the TOML file used, if any."""
        env = os.environ if env is None else env
        toml, used_file = read_toml(config_file, env)
        given = {k: v for k, v in (flags or {}).items() if v is not None}
        return cls(given, env, toml), used_file

    def env_file(self) -> Path:
        return _expand(self.text("env_file", ("GASTOWN_ENV_FILE",)) or "~/.env.gateway", self.env)

    def shim_dir(self, agents: Mapping[str, Any]) -> Path:
        if "shim_dir" in self.flags:
            return _expand(str(self.flags["shim_dir"]), self.env)
        value = self.env.get("GASTOWN_SANDBOXD_SHIM_DIR") or agents.get("shim_dir")
        if value is None:
            return default_shim_dir(self.env)
        if not isinstance(value, str) or not value:
            raise SettingsError(
                "agents.shim_dir", "must be a folder path", 'write shim_dir = "/path/to/bin"'
            )
        return _expand(value, self.env)

    def listen(self) -> Listen:
        return parse_listen(self.text("listen", ("GASTOWN_SANDBOXD_LISTEN",)) or "127.0.0.1:8080")

    def socket(self) -> Path:
        value = self.text("socket", ("GASTOWN_SANDBOXD_SOCKET",))
        return _expand(value, self.env) if value else default_socket(self.env)

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
            raise SettingsError(
                setting or name, "must be a string", f"quote {name} in the TOML file"
            )
        return value


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or os.path.expanduser("~"))


def _expand(value: str, env: Mapping[str, str]) -> Path:
    if value == "~" or value.startswith("~/"):
        return _home(env) / value[2:]
    return Path(value)


def _table(toml: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = toml.get(name, {})
    if not isinstance(value, dict):
        raise SettingsError(
            f"[{name}]", "must be a table", f"write it as [{name}] in the TOML file"
        )
    return value


def _agent_names(agents: Mapping[str, Any]) -> tuple[str, ...]:
    names = agents.get("shims", list(DEFAULT_AGENT_SHIMS))
    if not isinstance(names, list) or not all(
        isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", n) for n in names
    ):
        raise SettingsError(
            "agents.shims", "must be a list of command names", 'write ["claude", "codex"]'
        )
    return tuple(dict.fromkeys(names))


def _fraction(table: Mapping[str, Any], name: str, default: float) -> float:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise SettingsError(
            f"refresh.{name}", f"{value!r} is not a fraction in [0, 1)", "use e.g. 0.5"
        )
    return float(value)


def _millis(table: Mapping[str, Any], name: str, default: int) -> int:
    if name not in table:
        return default
    return max(1, round(parse_duration(table[name], setting=f"watcher.{name}") * 1000))


def _choice(value: str, setting: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise SettingsError(
            setting,
            f"{value!r} is not one of {', '.join(allowed)}",
            f"use one of {', '.join(allowed)}",
        )
    return value


def _events(value: object, setting: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SettingsError(
            setting, "must be a non-empty list of event types", 'write ["token.refreshed"]'
        )
    unknown = sorted(set(value) - EVENT_TYPES)
    if unknown:
        raise SettingsError(
            setting,
            f"{unknown[0]!r} is not an event type",
            "use " + ", ".join(sorted(EVENT_TYPES)),
        )
    return frozenset(value)


def _hooks(value: object) -> list[HookSpec]:
    if not isinstance(value, list):
        raise SettingsError("hooks", "must be an array of tables", "write [[hooks]] sections")
    hooks = []
    for index, item in enumerate(value):
        where = f"hooks[{index}]"
        if not isinstance(item, dict):
            raise SettingsError(where, "must be a table", "write a [[hooks]] section")
        command = item.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) and c for c in command)
        ):
            raise SettingsError(
                f"{where}.command",
                "must be a non-empty argv list",
                'write ["/path/to/hook", "arg"]',
            )
        timeout = parse_duration(item.get("timeout", "30s"), setting=f"{where}.timeout")
        hooks.append(
            HookSpec(
                events=_events(item.get("events"), f"{where}.events"),
                command=tuple(command),
                timeout=timeout,
            )
        )
    return hooks


def _signals(value: object, env: Mapping[str, str]) -> list[SignalSpec]:
    if not isinstance(value, list):
        raise SettingsError("signals", "must be an array of tables", "write [[signals]] sections")
    specs = []
    for index, item in enumerate(value):
        where = f"signals[{index}]"
        if not isinstance(item, dict):
            raise SettingsError(where, "must be a table", "write a [[signals]] section")
        pid_file = item.get("pid_file")
        if not isinstance(pid_file, str) or not pid_file:
            raise SettingsError(f"{where}.pid_file", "is missing", "name the pid file to read")
        name = item.get("signal", "SIGHUP")
        try:
            signum = notify.parse_signal(name)
        except ValueError:
            raise SettingsError(
                f"{where}.signal", f"{name!r} is not a signal", 'write e.g. "SIGHUP"'
            ) from None
        specs.append(
            SignalSpec(
                pid_file=_expand(pid_file, env),
                signal=signum,
                events=_events(item.get("events"), f"{where}.events"),
            )
        )
    return specs
