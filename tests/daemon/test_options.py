"""Options: precedence, defaults, and one clear line for every missing or bad value."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gastown_sandboxd.errors import OptionsError, OptionsProblems
from gastown_sandboxd.options import (
    Listen,
    Secret,
    check_shim_dir,
    check_socket_path,
    load_client_options,
    load_options,
    parse_duration,
    parse_listen,
)

KEY = "k" * 24
BASE_ENV = {
    "TOWN_ID": "town-1",
    "CLOUD_API_URL": "https://cloud.example",
    "INTERNAL_API_KEY": KEY,
    "HOME": "/home/gt",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_follow_the_contract() -> None:
    """With only the required variables, every default is the contract's."""
    settings = load_options({}, dict(BASE_ENV), None)
    assert settings.town_root == Path("/home/gt/gt")
    assert settings.env_file == Path("/home/gt/.env.gateway")
    assert settings.listen == Listen("127.0.0.1", 8080)
    assert settings.socket == Path("/home/gt/.gastown-sandboxd.sock")
    assert settings.schedule.refresh_fraction == 0.5
    assert settings.schedule.jitter_fraction == 0.1
    assert settings.schedule.backoff_initial == 1.0
    assert settings.schedule.backoff_max == 300.0
    assert settings.schedule.max_sleep == 30.0
    assert settings.refresh_timeout == 10.0


def test_socket_defaults_to_the_runtime_dir() -> None:
    """XDG_RUNTIME_DIR, when set, holds the socket."""
    settings = load_options({}, {**BASE_ENV, "XDG_RUNTIME_DIR": "/run/user/1000"}, None)
    assert settings.socket == Path("/run/user/1000/gastown-sandboxd.sock")


def test_flag_beats_environment_beats_toml(tmp_path: Path) -> None:
    """A flag wins over the environment, which wins over the TOML file."""
    config = write(
        tmp_path, 'town_root = "/from/toml"\nenv_file = "/toml/env"\nlisten = "0.0.0.0:1"\n'
    )
    env = {**BASE_ENV, "GT_TOWN_ROOT": "/from/env", "GASTOWN_SANDBOXD_LISTEN": "127.0.0.1:9"}
    settings = load_options({"town_root": "/from/flag"}, env, config)
    assert settings.town_root == Path("/from/flag")
    assert settings.listen == Listen("127.0.0.1", 9)
    assert settings.env_file == Path("/toml/env")
    assert settings.config_file == config


def test_fallback_environment_names() -> None:
    """KILO_API_URL and GT_ROOT serve when CLOUD_API_URL and GT_TOWN_ROOT are unset."""
    env = {k: v for k, v in BASE_ENV.items() if k != "CLOUD_API_URL"}
    env |= {"KILO_API_URL": "https://kilo.example/", "GT_ROOT": "/srv/town"}
    settings = load_options({}, env, None)
    assert settings.cloud_url == "https://kilo.example"
    assert settings.town_root == Path("/srv/town")


@pytest.mark.parametrize(
    ("env_change", "named"),
    [
        ({"TOWN_ID": ""}, "TOWN_ID"),
        ({"TOWN_ID": "town 1; rm -rf"}, "TOWN_ID"),
        ({"CLOUD_API_URL": ""}, "CLOUD_API_URL"),
        ({"CLOUD_API_URL": "ftp://x"}, "CLOUD_API_URL"),
        ({"INTERNAL_API_KEY": ""}, "INTERNAL_API_KEY"),
        ({"INTERNAL_API_KEY": "short"}, "INTERNAL_API_KEY"),
        # Each passed `check`, then made every call fail or `run` crash (a review found them).
        ({"CLOUD_API_URL": "http://127.0.0.1:abc"}, "CLOUD_API_URL"),
        ({"CLOUD_API_URL": "http://127.0.0.1:99999"}, "CLOUD_API_URL"),
        ({"CLOUD_API_URL": "https://cloud.example\n"}, "CLOUD_API_URL"),
        ({"CLOUD_API_URL": "https://cloud.example/?x=1"}, "CLOUD_API_URL"),
        ({"CLOUD_API_URL": "https://cloud.example#top"}, "CLOUD_API_URL"),
        ({"CLOUD_API_URL": "https://user:s3cret-pw@cloud.example"}, "CLOUD_API_URL"),
        ({"INTERNAL_API_KEY": f" {KEY}"}, "INTERNAL_API_KEY"),
        ({"INTERNAL_API_KEY": f"{KEY}\r"}, "INTERNAL_API_KEY"),
        ({"INTERNAL_API_KEY": "cl\u00e9-0123456789abcdef"}, "INTERNAL_API_KEY"),
        ({"GASTOWN_SANDBOXD_LISTEN": "nonsense"}, "GASTOWN_SANDBOXD_LISTEN"),
        ({"GASTOWN_SANDBOXD_LISTEN": "127.0.0.1:70000"}, "GASTOWN_SANDBOXD_LISTEN"),
        ({"GASTOWN_SANDBOXD_LOG_FORMAT": "xml"}, "log_format"),
    ],
)
def test_bad_or_missing_values_name_the_setting(env_change: dict[str, str], named: str) -> None:
    """Each bad value raises OptionsError whose one line names the setting."""
    with pytest.raises(OptionsError) as caught:
        load_options({}, {**BASE_ENV, **env_change}, None)
    line = str(caught.value)
    assert named in line
    assert "\n" not in line
    for secret in (KEY, "s3cret-pw", "0123456789abcdef"):
        assert secret not in line


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("nonsense = 1\n", "nonsense"),
        ("[refresh]\nfraction = 1.5\n", "refresh.fraction"),
        ("[refresh]\nfraction = 0.0\njitter = 0.0\n", "refresh.fraction: must be above 0"),
        ("[refresh]\nfraction = 0.5\njitter = 0.6\n", "refresh.jitter: 0.6 is not under"),
        ("[refresh]\nfraction = 0.2\njitter = 0.2\n", "refresh.jitter: 0.2 is not under"),
        ('[refresh]\nbackoff_max = "soon"\n', "refresh.backoff_max"),
        ('[watcher]\ndebounce = "-5ms"\n', "watcher.debounce"),
        ('[[hooks]]\nevents = ["token.refreshed"]\ncommand = []\n', "hooks[0].command"),
        ('[[hooks]]\nevents = ["token.nope"]\ncommand = ["true"]\n', "hooks[0].events"),
        (
            '[[signals]]\npid_file = "/x"\nsignal = "SIGNOPE"\nevents = ["config.changed"]\n',
            "signals[0].signal",
        ),
        ('[[signals]]\nsignal = "SIGHUP"\nevents = ["config.changed"]\n', "signals[0].pid_file"),
        ("this is not toml", "--config"),
        ("town_root = 5\n", "town_root"),
    ],
)
def test_bad_toml_names_the_setting(tmp_path: Path, toml: str, named: str) -> None:
    """A bad TOML value is reported by its key."""
    with pytest.raises(OptionsError) as caught:
        load_options({}, dict(BASE_ENV), write(tmp_path, toml))
    assert named in str(caught.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist is a settings error."""
    with pytest.raises(OptionsError, match="does not exist"):
        load_options({}, dict(BASE_ENV), tmp_path / "absent.toml")


def test_hooks_and_signals_from_toml(tmp_path: Path) -> None:
    """[[hooks]] and [[signals]] become specs with parsed durations and signals."""
    config = write(
        tmp_path,
        """
[[hooks]]
events = ["token.refreshed", "config.changed"]
command = ["/bin/echo", "hi"]
timeout = "500ms"

[[signals]]
pid_file = "~/gt/daemon.pid"
signal = "USR1"
events = ["config.changed"]

[presets]
extra = ["house-model"]
""",
    )
    settings = load_options({}, dict(BASE_ENV), config)
    (hook,) = settings.hooks
    assert hook.command == ("/bin/echo", "hi")
    assert hook.timeout == 0.5
    assert hook.events == frozenset({"token.refreshed", "config.changed"})
    (spec,) = settings.signals
    assert spec.pid_file == Path("/home/gt/gt/daemon.pid")
    assert spec.signal == signal.SIGUSR1
    assert settings.extra_presets == ("house-model",)
    assert settings.deprecations == ()


def test_the_presets_table_old_name_is_still_read_with_a_deprecation(tmp_path: Path) -> None:
    """`[config] extra_presets` (the table's first name) still works and says it is deprecated."""
    config = write(tmp_path, '[config]\nextra_presets = ["house-model"]\n')
    options = load_options({}, dict(BASE_ENV), config)
    assert options.extra_presets == ("house-model",)
    assert options.deprecations == ("[config] extra_presets is now [presets] extra",)
    bad = write(tmp_path, "[config]\nextra_presets = 5\n[presets]\nother = 1\n")
    with pytest.raises(OptionsProblems) as caught:
        load_options({}, dict(BASE_ENV), bad)
    assert [p.setting for p in caught.value.problems] == ["presets.other", "config.extra_presets"]


def test_secret_never_shows() -> None:
    """The key is hidden in repr and str of the settings."""
    settings = load_options({}, dict(BASE_ENV), None)
    assert KEY not in repr(settings)
    assert KEY not in str(settings.internal_key)
    assert settings.internal_key.reveal() == KEY
    assert Secret("a") == Secret("a")


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), (7, 7.0)]
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    """Durations accept ms, s, m, h and bare numbers."""
    assert parse_duration(text, setting="x") == seconds


def test_parse_listen_ipv6() -> None:
    """A bracketed IPv6 host parses and prints back."""
    listen = parse_listen("[::1]:8080")
    assert listen == Listen("::1", 8080)
    assert str(listen) == "[::1]:8080"


def test_client_settings_need_nothing() -> None:
    """The client commands work with no required setting present."""
    settings = load_client_options({}, {"HOME": "/home/gt"}, None)
    assert settings.town_id is None
    assert settings.internal_key is None
    assert settings.socket == Path("/home/gt/.gastown-sandboxd.sock")


def test_run_exits_2_with_one_line_per_problem_all_at_once(tmp_path: Path) -> None:
    """`run` with three settings missing and no town root: exit 2, one line for each of the four."""
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    named = ["TOWN_ID", "CLOUD_API_URL", "INTERNAL_API_KEY", "GT_TOWN_ROOT"]
    assert len(lines) == len(named), done.stderr
    for line, name in zip(lines, named, strict=True):
        assert name in line
        assert line.startswith("gastown-sandboxd: setting ")
    assert "Traceback" not in done.stderr


def test_every_problem_is_collected_in_one_pass(tmp_path: Path) -> None:
    """Bad values in the environment and the TOML file come back together, in reading order."""
    config = write(
        tmp_path,
        'surprise = 1\nlog_level = "loud"\n[refresh]\nfraction = 2\nmax_sleep = "soon"\n'
        '[[hooks]]\nevents = ["no.such"]\ncommand = ["/bin/true"]\n'
        '[[hooks]]\nevents = ["token.refreshed"]\ncommand = []\n',
    )
    env = {**BASE_ENV, "INTERNAL_API_KEY": "k3y-t00-brief", "GASTOWN_SANDBOXD_LISTEN": "nowhere"}
    with pytest.raises(OptionsProblems) as caught:
        load_options({}, env, config)
    settings = [problem.setting for problem in caught.value.problems]
    assert settings == [
        "--config key 'surprise'",
        "internal API key (INTERNAL_API_KEY)",
        "refresh.fraction",
        "refresh.max_sleep",
        "listen (GASTOWN_SANDBOXD_LISTEN)",
        "hooks[0].events",
        "hooks[1].command",
        "log_level",
    ]
    lines = str(caught.value).splitlines()
    assert len(lines) == len(settings)
    assert "k3y-t00-brief" not in str(caught.value)


def test_an_unreadable_toml_file_is_one_problem_among_others(tmp_path: Path) -> None:
    """A broken TOML file does not hide a missing TOWN_ID."""
    config = write(tmp_path, 'town_root = "unterminated\n')
    env = {k: v for k, v in BASE_ENV.items() if k != "TOWN_ID"}
    with pytest.raises(OptionsProblems) as caught:
        load_options({}, env, config)
    assert [p.setting for p in caught.value.problems] == ["--config", "town id (TOWN_ID)"]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"# caf\xe9\n", "is not UTF-8 text"),
        (b"a = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ],
    ids=["latin1", "nested_5000"],
)
def test_a_toml_file_python_cannot_read_is_one_problem_not_a_traceback(
    tmp_path: Path, data: bytes, problem: str
) -> None:
    """Not UTF-8 (tomllib raises UnicodeDecodeError) or nested too deeply (RecursionError):
    a --config problem like any other, so `check` exits 2 and a reload keeps the old options."""
    config = tmp_path / "config.toml"
    config.write_bytes(data)
    with pytest.raises(OptionsProblems) as caught:
        load_options({}, BASE_ENV, config)
    [found] = caught.value.problems
    assert found.setting == "--config"
    assert problem in str(found)


def test_a_default_config_folder_this_user_cannot_enter_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/etc/gastown-sandboxd readable by root alone: is_file() raises EACCES for another user;
    one --config problem naming the file, not a traceback in every command."""
    import gastown_sandboxd.options as options_module

    class Unreachable(type(tmp_path)):  # type: ignore[misc]
        def is_file(self) -> bool:
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(options_module, "DEFAULT_CONFIG_FILE", Unreachable("/etc/x/config.toml"))
    with pytest.raises(OptionsProblems) as caught:
        load_options({}, BASE_ENV, None)
    [found] = caught.value.problems
    assert found.setting == "--config"
    assert "Permission denied" in str(found)


def test_relative_paths_are_made_absolute_against_the_starting_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paths go into the shims and Claude's helper line, which agents run from other
    folders: each is absolute, against the folder the daemon starts in (before, a shim held
    `--env-file env.gateway` and an agent in a rig read a file of that name there)."""
    monkeypatch.chdir(tmp_path)
    env = {
        **BASE_ENV,
        "GASTOWN_ENV_FILE": "env.gateway",
        "GASTOWN_SANDBOXD_SOCKET": "run/d.sock",
        "GT_TOWN_ROOT": "town",
        "GASTOWN_SANDBOXD_SHIM_DIR": "shims",
        "GASTOWN_SANDBOXD_STATE_DIR": "state",
    }
    options = load_options({}, env, None)
    found = (options.env_file, options.socket, options.town_root, options.shim_dir)
    assert found == (tmp_path / "env.gateway", tmp_path / "run" / "d.sock", tmp_path / "town",
                     tmp_path / "shims")  # fmt: skip
    assert options.state_dir == tmp_path / "state"


def test_check_paths_names_a_missing_env_file_folder(tmp_path: Path) -> None:
    """With check_paths, a town root and env-file folder that are missing are two problems."""
    env = {
        **BASE_ENV,
        "GT_TOWN_ROOT": str(tmp_path / "no-town"),
        "GASTOWN_ENV_FILE": str(tmp_path / "no-folder" / ".env.gateway"),
    }
    assert load_options({}, env, None).env_file.parent == tmp_path / "no-folder"
    with pytest.raises(OptionsProblems) as caught:
        load_options({}, env, None, check_paths=True)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert "GT_TOWN_ROOT" in lines[0]
    assert "GASTOWN_ENV_FILE" in lines[1]
    assert f"mkdir -p {tmp_path / 'no-folder'}" in lines[1]


def test_the_socket_path_may_hold_nothing_or_a_socket_but_nothing_else(tmp_path: Path) -> None:
    """A stale socket is the daemon's to replace; a file there is someone else's."""
    path = tmp_path / "d.sock"
    check_socket_path(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    check_socket_path(path)
    path.unlink()
    path.write_text("")
    with pytest.raises(OptionsError) as caught:
        check_socket_path(path)
    assert caught.value.setting == "local socket (GASTOWN_SANDBOXD_SOCKET)"
    assert str(caught.value).endswith(
        f"{path} is a file, not a socket (it is left as it is); remove it, or give the "
        "daemon another socket (--socket)"
    )


def test_state_folder_and_sync_interval_defaults() -> None:
    """The state folder is under ~/.local/state, or XDG_STATE_HOME; the sync every 5 min."""
    settings = load_options({}, dict(BASE_ENV), None)
    assert settings.state_dir == Path("/home/gt/.local/state/gastown-sandboxd")
    assert settings.config_sync_interval == 300.0
    xdg = load_options({}, {**BASE_ENV, "XDG_STATE_HOME": "/var/state"}, None)
    assert xdg.state_dir == Path("/var/state/gastown-sandboxd")


def test_state_folder_flag_beats_environment_beats_toml(tmp_path: Path) -> None:
    """--state-dir, then GASTOWN_SANDBOXD_STATE_DIR, then TOML state_dir (with ~ expanded)."""
    config = write(tmp_path, 'state_dir = "~/toml-state"\n[config_sync]\ninterval = "90s"\n')
    env = {**BASE_ENV, "GASTOWN_SANDBOXD_STATE_DIR": "/env/state"}
    assert load_options({}, dict(BASE_ENV), config).state_dir == Path("/home/gt/toml-state")
    assert load_options({}, env, config).state_dir == Path("/env/state")
    flagged = load_options({"state_dir": "/flag/state"}, env, config)
    assert flagged.state_dir == Path("/flag/state")
    assert flagged.config_sync_interval == 90.0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[config_sync]\ninterval = "0s"\n', "config_sync.interval"),
        ('[config_sync]\ninterval = "soon"\n', "config_sync.interval"),
        ('[config_sync]\ninterval = "5ms"\n', "'5ms' is under the least of 10 s"),
        ("[config_sync]\nperiod = 5\n", "config_sync.period"),
        ("config_sync = 5\n", "[config_sync]"),
        ("state_dir = 5\n", "state_dir"),
    ],
)
def test_bad_sync_settings_name_the_setting(tmp_path: Path, text: str, words: str) -> None:
    """A bad interval, an unknown key or a wrong type stops start-up naming the setting."""
    with pytest.raises(OptionsError) as caught:
        load_options({}, dict(BASE_ENV), write(tmp_path, text))
    assert words in str(caught.value)


def test_a_socket_path_too_long_for_a_unix_socket_is_one_clear_problem(tmp_path: Path) -> None:
    """A socket path over 107 bytes is refused naming the setting, not at bind time."""
    long_path = "/tmp/" + "s" * 120 + "/d.sock"
    with pytest.raises(OptionsProblems) as caught:
        load_options({}, {**BASE_ENV, "GASTOWN_SANDBOXD_SOCKET": long_path}, None)
    (problem,) = caught.value.problems
    assert problem.setting == "local socket (GASTOWN_SANDBOXD_SOCKET)"
    assert "more than the 107" in str(problem)
    with pytest.raises(OptionsProblems):
        load_client_options({"socket": long_path}, {}, None)


def test_an_unwritable_shim_folder_is_a_setting_error(tmp_path: Path) -> None:
    """A shim folder that cannot be created or written: one OptionsError naming it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OptionsError) as caught:
        check_shim_dir(blocker / "bin")
    assert "GASTOWN_SANDBOXD_SHIM_DIR" in str(caught.value)
    assert str(blocker / "bin") in str(caught.value)
    check_shim_dir(tmp_path / "made" / "bin")
    assert (tmp_path / "made" / "bin").is_dir()
