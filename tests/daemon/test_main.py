"""The process entry: it hides the packages the daemon never uses, and only in its process;
`exec` and `token` go to the agents' light entry."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gastown_sandboxd.__main__ import DAEMON_NEVER_USED
from gastown_sandboxd.cli import build_parser
from gastown_sandboxd.token.claims import fingerprint
from tests.daemon.minting import mint
from tests.fixtures.entry import run_help, run_importing

PROBE = """
import importlib.util, sys
from gastown_sandboxd.__main__ import DAEMON_NEVER_USED, hide_never_used
installed = [n for n in DAEMON_NEVER_USED if importlib.util.find_spec(n) is not None]
hide_never_used(DAEMON_NEVER_USED)
import httpx, structlog, gastown_sandboxd.cli, gastown_sandboxd.daemon
loaded = [n for n in DAEMON_NEVER_USED if sys.modules.get(n) is not None]
print(",".join(installed) + "|" + ",".join(loaded) + "|" + str(callable(httpx.get)))
"""


def test_the_entry_keeps_httpx_and_structlog_from_loading_what_the_daemon_never_uses() -> None:
    """In a fresh interpreter of this venv (where the test tools install rich, click and
    pygments; bz2 and lzma are the standard library's), the daemon's whole import loads none
    of them, and httpx still works."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    installed, loaded, works = done.stdout.strip().split("|")
    if not installed:
        pytest.skip("none of rich, click, pygments is installed: nothing to hide")
    assert loaded == ""
    assert works == "True"


def test_importing_the_package_hides_nothing() -> None:
    """Only the entry's `main` hides: a program importing the package keeps its modules."""
    code = (
        "import sys, gastown_sandboxd.cli, gastown_sandboxd.__main__\n"
        f"print(any(sys.modules.get(n, 0) is None for n in {DAEMON_NEVER_USED!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


def test_the_command_runs_through_the_entry() -> None:
    """`python -m gastown_sandboxd --help` goes through `main` and prints the usage; the
    command runs with the garbage collector on and the entry's imports frozen."""
    run = run_help("gastown_sandboxd", "gastown-sandboxd", DAEMON_NEVER_USED)
    assert "usage:" in run.usage
    assert run.gc_on
    assert run.frozen > 10000


GC_PROBE = """
import gc, sys
from gastown_sandboxd._lazy import imports_without_gc
enabled_inside = []
with imports_without_gc():
    enabled_inside.append(gc.isenabled())
    made_inside = [object(), {}]  # tracked by the collector
# Frozen: in the permanent generation, in none of the three the collector walks.
walked = any(made_inside is o for g in range(3) for o in gc.get_objects(generation=g))
after = (gc.isenabled(), gc.get_freeze_count() > 0, not walked)
gc.disable()
with imports_without_gc():
    pass
print(enabled_inside[0], *after, gc.isenabled())
"""


def test_imports_run_without_the_collector_and_what_they_made_is_frozen() -> None:
    """Inside `imports_without_gc` no collection runs; after it the collector is back as it
    was (on, or off when it was off) and what was alive sits in the permanent generation."""
    done = subprocess.run(
        [sys.executable, "-c", GC_PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    inside, enabled_after, frozen, not_walked, stays_off = done.stdout.split()
    assert (inside, enabled_after, frozen, not_walked, stays_off) == (
        "False", "True", "True", "True", "False"
    )  # fmt: skip


def test_exec_and_token_go_to_the_light_entry(tmp_path: Path) -> None:
    """`gastown-sandboxd token` prints the token through the agents' light entry: the command
    line module and the daemon's libraries are never imported."""
    token = mint(time.time())
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={token}\n")
    paths = ["--env-file", str(env_file), "--socket", str(tmp_path / "none.sock")]
    done = run_importing([], ["-m", "gastown_sandboxd", "token", *paths])
    assert (done.returncode, done.stdout, done.stderr) == (0, token + "\n", "")
    assert "gastown_sandboxd.agents.exec" in done.imported
    assert done.imported & {"gastown_sandboxd.cli", "anyio", "httpx", "structlog"} == set()


def test_options_before_the_command_still_reach_the_command_line() -> None:
    """Only a first word of `exec` or `token` takes the light entry: `--version` first is the
    command line's own, and `exec --help` is the same grammar's help."""
    version = subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", "--version"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert version.stdout.startswith("gastown-sandboxd ")
    help_ = subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", "exec", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert help_.stdout.startswith("usage: gastown-sandboxd exec ")
    assert "--helper-ttl-ms" in help_.stdout


def test_each_command_built_alone_is_the_command_of_the_whole_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command line builds only the parser of the command its arguments start with; that
    parser's help (every option, default and text) is the one the whole parser has."""
    monkeypatch.setenv("COLUMNS", "100")
    whole = _commands(build_parser())
    assert set(whole) == {
        *("run", "check", "status", "events", "refresh", "inspect-token", "exec", "token"),
    }
    for name, parser in whole.items():
        alone = _commands(build_parser(name))
        assert list(alone) == [name]
        assert alone[name].format_help() == parser.format_help(), name


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_a_command_that_asks_the_daemon_loads_none_of_the_daemons_machinery(
    tmp_path: Path,
) -> None:
    """`status` reads the options (events' types and hook specs among them) and asks the
    socket: neither structlog, asyncio nor the bus and the notifier are imported on the way.
    With no daemon there, it says so and exits 1."""
    done = run_importing([], ["-m", "gastown_sandboxd", "status", "--socket", str(tmp_path / "s")])
    assert done.returncode == 1
    assert "cannot reach the daemon" in done.stderr
    assert "gastown_sandboxd.options" in done.imported
    assert "gastown_sandboxd.events.specs" in done.imported
    machinery = {
        "structlog",
        "asyncio",
        "gastown_sandboxd.events.bus",
        "gastown_sandboxd.events.notify",
    }
    assert done.imported & machinery == set()


@pytest.mark.parametrize("command", ["token", "inspect-token"])
def test_with_no_daemon_and_no_env_file_named_the_default_env_file_is_read(
    tmp_path: Path, command: str
) -> None:
    """`token` (the light entry) and `inspect-token` with neither a daemon on the socket nor
    an env file named: they ask the socket, find nobody, and read `~/.env.gateway`."""
    token = mint(time.time())
    (tmp_path / ".env.gateway").write_text(f"KILO_JWT={token}\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GASTOWN_SANDBOXD_SOCKET": str(tmp_path / "none.sock"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", command],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    assert (token + "\n" if command == "token" else fingerprint(token)) in done.stdout


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--count", "0"], "argument --count: 0 is under 1"),
        (["--count", "-3"], "argument --count: -3 is under 1"),
        (["--count", "x"], "argument --count: 'x' is not a whole number"),
        (["--last-event-id", "-5"], "argument --last-event-id: -5 is under 0"),
    ],
)
def test_events_refuses_a_count_or_an_id_out_of_range_as_bad_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    """`events --count 0` printed an event and `--last-event-id -5` waited for ever with no
    replay: both are bad usage now, exit 2 naming the argument (CONTRACT §8)."""
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["events", *argv])
    assert caught.value.code == 2
    assert words in capsys.readouterr().err
