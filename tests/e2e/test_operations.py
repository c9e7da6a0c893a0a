"""The operator's bad day, as a person meets it: a second daemon on the same socket, closed pipes,
missing folders, failing refreshes, `check`, SIGHUP reloads. Every test drives the real
`python -m gastown_sandboxd` as a subprocess (through bash where a pipe is the point).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from gastown_sandboxd.token.claims import fingerprint
from tests.e2e._town import (
    cli,
    client_env,
    local_token,
    metric_value,
    wait_for_status,
    write_env,
)
from tests.fixtures.daemon import DaemonFactory, DaemonProcess, daemon_env, make_town
from tests.fixtures.net import read_answer, unused_port
from tests.waiting import wait_until

TOWN = "town-ops"
PIPE_RUNS = 30


def _daemon(
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    token: str | None = "fresh",  # noqa: S107 - a choice, not a secret
    **options: Any,
) -> DaemonProcess:
    """A daemon of TOWN whose cloud is down, with a fresh token (or `token`) on disk."""
    if token == "fresh":
        token = local_token(TOWN)
    env_file = write_env(tmp_path / "home" / ".env.gateway", token)
    return daemon_factory(
        town_id=TOWN, cloud_url=f"http://127.0.0.1:{unused_port()}", env_file=env_file, **options
    )


def _run(
    env: Mapping[str, str], *args: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`gastown-sandboxd run ARGS` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", "run", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env_of(daemon: DaemonProcess, **changes: str) -> dict[str, str]:
    """The environment `daemon` was started with (as the fixture builds it), changed."""
    env = daemon_env(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        town_root=daemon.town_root,
        env_file=daemon.env_file,
        socket=daemon.socket,
    )
    env.update(changes)
    return env


# --- 1. one daemon per socket ---------------------------------------------------------------


def test_a_second_run_on_a_served_socket_exits_2_naming_the_first_pid(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A second `run` on the same socket: exit 2, one line with the first one's pid; the first
    keeps its socket and goes on answering."""
    first = _daemon(daemon_factory, tmp_path)
    done = _run(_env_of(first))
    print(done.stderr)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert f"socket {first.socket} is in use by pid {first.process.pid}" in lines[0]
    assert first.socket.exists()
    with first.local() as local:
        assert local.get("/status").json()["town_id"] == TOWN
    assert first.process.poll() is None


def test_a_socket_left_by_a_killed_daemon_is_reclaimed(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """SIGKILL leaves the socket file behind; the next daemon takes it over and serves."""
    first = _daemon(daemon_factory, tmp_path, name="a")
    first.process.kill()
    first.process.wait(10)
    assert first.socket.exists()
    second = daemon_factory(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        env_file=first.env_file,
        town_root=first.town_root,
        name="a",
    )
    with second.local() as local:
        assert local.get("/status").status_code == 200
    lock = Path(f"{second.socket}.lock")
    assert lock.read_text().strip() == str(second.process.pid)
    assert second.stop() == 0
    assert not second.socket.exists()
    assert not lock.exists()


def test_a_socket_removed_while_serving_is_bound_again_and_reached_by_the_cli(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A clean-up of its folder removes the socket and its lock while the daemon runs:
    `status` cannot reach it. SIGHUP (or the next look, every 30 s) binds both again:
    `status` reaches the daemon, the lock names its pid, and a stop removes both."""
    daemon = _daemon(daemon_factory, tmp_path)
    lock = Path(f"{daemon.socket}.lock")
    daemon.socket.unlink()
    lock.unlink()
    env = client_env(daemon, TOWN)
    assert cli("status", env=env).returncode == 1
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_log("local_socket_bound_again", found="nothing")
    done = cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["town_id"] == TOWN
    local = status["local_socket"]
    assert (local["path"], local["bound_again"], local["problem"]) == (str(daemon.socket), 1, None)
    assert local["checks"] >= 1  # the SIGHUP's, and any look every 30 s since
    assert lock.read_text().strip() == str(daemon.process.pid)
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert not lock.exists()


def test_a_socket_served_without_a_lock_is_refused_too(tmp_path: Path, short_tmp: Path) -> None:
    """Something else accepting on the socket (no lock file): exit 2 naming its pid (ours)."""
    path = short_tmp / "taken.sock"
    env = daemon_env(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        town_root=make_town(tmp_path / "town"),
        env_file=write_env(tmp_path / "home" / ".env.gateway", local_token(TOWN)),
        socket=path,
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        done = _run(env)
        assert path.exists()
    assert done.returncode == 2
    assert f"is in use by pid {os.getpid()}" in done.stderr


def test_a_taken_tcp_port_names_the_address(tmp_path: Path) -> None:
    """ "Address already in use" says which address."""
    env = daemon_env(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        town_root=make_town(tmp_path / "town"),
        env_file=write_env(tmp_path / "home" / ".env.gateway", local_token(TOWN)),
        socket=tmp_path / "d.sock",
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        done = _run({**env, "GASTOWN_SANDBOXD_LISTEN": address})
    print(done.stderr)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"gastown-sandboxd: cannot start: {address}: Address already in use"
    )
    assert not (tmp_path / "d.sock").exists()


# --- 2. closed pipes ------------------------------------------------------------------------


def _pipeline(command: str, env: Mapping[str, str], timeout: float = 30.0) -> tuple[int, str]:
    """Run `python -m gastown_sandboxd COMMAND | …` in bash; (the CLI's exit code, its stderr)."""
    script = f'"$PYTHON" -m gastown_sandboxd {command} 2>"$ERR"; echo "${{PIPESTATUS[0]}}"'
    err = Path(env["ERR"])
    done = subprocess.run(
        ["bash", "-c", script],
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1]), err.read_text()


CLOSED_AT_ONCE = (
    "status | true",
    "status --json | true",
    "inspect-token | true",
    "events --last-event-id 0 | true",
)
# The pipelines of the report; the reader goes after a line or a byte, racing the writer.
CLOSED_BY_HEAD = (
    "status | head -2",
    "status --json | head -1",
    "inspect-token | head -c 1",
    "status | head -c 1",
)


def test_output_into_a_closed_pipe_ends_quietly_with_exit_0(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """The reader is gone before the first write (`| true` never reads): no traceback, exit 0."""
    daemon = _daemon(daemon_factory, tmp_path)
    _push_token(daemon)
    env = {**client_env(daemon, TOWN), "ERR": str(tmp_path / "stderr")}
    results = {command: _pipeline(command, env) for command in CLOSED_AT_ONCE}
    assert results == dict.fromkeys(CLOSED_AT_ONCE, (0, ""))


@pytest.mark.slow
def test_pipes_closed_by_head_end_quietly_every_time(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """30 runs of `status | head -2` and its kin (a traceback came once in three before):
    every run exits 0 with nothing on stderr."""
    daemon = _daemon(daemon_factory, tmp_path)
    env = {**client_env(daemon, TOWN), "PYTHON": sys.executable}
    scripts = []
    for index in range(PIPE_RUNS):
        command, _, reader = CLOSED_BY_HEAD[index % len(CLOSED_BY_HEAD)].partition(" | ")
        script = tmp_path / f"{index}.sh"
        err = tmp_path / f"{index}.err"
        script.write_text(
            f'"$PYTHON" -m gastown_sandboxd {command} 2>{err} | {reader} >/dev/null\n'
            f'echo "{index} ${{PIPESTATUS[0]}} $(wc -c <{err})"\n'
        )
        scripts.append(str(script))
    # Four at a time: the runs overlap, as they would in a monitoring script.
    done = subprocess.run(
        ["xargs", "-P", "4", "-n", "1", "bash"],
        env=env,
        input="\n".join(scripts) + "\n",
        capture_output=True,
        text=True,
        timeout=110,
        check=True,
    )
    results = [line.split() for line in done.stdout.splitlines()]
    assert len(results) == PIPE_RUNS, done.stderr
    noisy = [r for r in results if r[1:] != ["0", "0"]]
    assert noisy == [], [(tmp_path / f"{r[0]}.err").read_text() for r in noisy]


def test_events_into_head_1_ends_once_the_reader_is_gone(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`events | head -1` ends after the first event, though no further event comes."""
    daemon = _daemon(daemon_factory, tmp_path)
    _push_token(daemon)
    env = {**client_env(daemon, TOWN), "ERR": str(tmp_path / "stderr")}
    out = tmp_path / "out"
    code, stderr = _pipeline(f"events --last-event-id 0 | head -1 >{out}", env, timeout=20)
    assert stderr == ""
    assert code == 0
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["type"] == "token.refreshed"


def _push_token(daemon: DaemonProcess) -> str:
    """Push a new token over the socket, so that the ring holds a `token.refreshed`."""
    token = local_token(TOWN, now=int(time.time()) - 30)
    with daemon.local() as local:
        assert local.put("/token", json={"token": token}).status_code == 200
    return token


# --- 3, 5. folders and `check` --------------------------------------------------------------


def _base_env(tmp_path: Path) -> dict[str, str]:
    return daemon_env(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        town_root=make_town(tmp_path / "town"),
        env_file=write_env(tmp_path / "home" / ".env.gateway", local_token(TOWN)),
        socket=tmp_path / "d.sock",
    )


def test_a_missing_env_file_folder_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """The env file's folder does not exist: exit 2, one line naming the folder, nothing bound."""
    folder = tmp_path / "no-such-home"
    env = {**_base_env(tmp_path), "GASTOWN_ENV_FILE": str(folder / ".env.gateway")}
    done = _run(env)
    print(done.stderr)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "GASTOWN_ENV_FILE" in line
    assert f"its folder {folder} does not exist" in line
    assert not (tmp_path / "d.sock").exists()


@pytest.mark.parametrize("kind", ["file", "folder", "symlink"])
def test_what_is_not_a_socket_at_the_socket_path_stops_run_and_check_and_is_kept(
    tmp_path: Path, kind: str
) -> None:
    """`run` and `check` both exit 2 with one line naming it (run used to fail with exit 1
    and "Address already in use", and check to pass); what is there is someone else's and
    is left as it was. A stale socket, by contrast, is replaced at start."""
    env = _base_env(tmp_path)
    path = Path(env["GASTOWN_SANDBOXD_SOCKET"])
    if kind == "file":
        path.write_text("precious\n")
    elif kind == "folder":
        path.mkdir()
        (path / "inside").write_text("precious\n")
    else:
        path.symlink_to(tmp_path / "elsewhere")
    for done in (_run(env), cli("check", env=env)):
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert f"{path} is a {kind}, not a socket (it is left as it is)" in line
    if kind == "file":
        assert path.read_text() == "precious\n"
    elif kind == "folder":
        assert [p.name for p in path.iterdir()] == ["inside"]
    else:
        assert os.readlink(path) == str(tmp_path / "elsewhere")


def test_a_folder_at_the_socket_lock_stops_run_and_check_with_one_line(tmp_path: Path) -> None:
    """A folder at `<socket>.lock`: `run` exited 1 ("cannot start: …: Is a directory") and
    `check` passed it; both now exit 2 with one line naming it, and it is left as it was."""
    env = _base_env(tmp_path)
    lock = Path(env["GASTOWN_SANDBOXD_SOCKET"] + ".lock")
    lock.mkdir()
    for done in (_run(env), cli("check", env=env)):
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert f"{lock}, the socket's lock, is a folder, not a file" in line
    assert lock.is_dir()


def test_a_socket_another_program_serves_stops_run_and_check_naming_its_pid(
    tmp_path: Path,
) -> None:
    """A program of someone else's listening on the socket path (no lock): `run` exited 2
    naming its pid, and `check` passed it with "every option is valid"; now both say it."""
    env = _base_env(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(env["GASTOWN_SANDBOXD_SOCKET"])
        other.listen()
        for done in (_run(env), cli("check", env=env)):
            assert done.returncode == 2, done.stdout
            (line,) = done.stderr.splitlines()
            assert f"is in use by pid {os.getpid()}" in line


def test_check_reports_every_problem_in_one_run(tmp_path: Path) -> None:
    """Three settings missing, no town root, no env-file folder and a bad hook: one `check`
    run, exit 2, one line each; nothing is started or written."""
    config = tmp_path / "config.toml"
    config.write_text('[[hooks]]\nevents = ["token.refreshed"]\ncommand = "not-a-list"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GASTOWN_", "GT_"))}
    for name in ("TOWN_ID", "CLOUD_API_URL", "KILO_API_URL", "INTERNAL_API_KEY"):
        env.pop(name, None)
    env.update(
        HOME=str(tmp_path),
        GT_TOWN_ROOT=str(tmp_path / "no-town"),
        GASTOWN_ENV_FILE=str(tmp_path / "no-home" / ".env.gateway"),
        GASTOWN_SANDBOXD_SOCKET=str(tmp_path / "d.sock"),
    )
    before = sorted(tmp_path.iterdir())
    done = cli("check", "--config", str(config), env=env)
    print(done.stderr)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    named = [
        "TOWN_ID",
        "CLOUD_API_URL",
        "INTERNAL_API_KEY",
        "hooks[0].command",
        "GT_TOWN_ROOT",
        "GASTOWN_ENV_FILE",
    ]
    assert len(lines) == len(named)
    for line, name in zip(lines, named, strict=True):
        assert name in line, line
    assert sorted(tmp_path.iterdir()) == before


def test_check_of_good_options_exits_0_with_a_summary(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Good options: exit 0 and a short summary; a daemon on the socket is named, not a fault."""
    daemon = _daemon(daemon_factory, tmp_path)
    done = cli("check", env=_env_of(daemon))
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("ok: ")
    assert f"town            {TOWN}" in done.stdout
    assert f"(served by the running daemon, pid {daemon.process.pid})" in done.stdout


@pytest.mark.parametrize(
    ("listen", "problem", "fix"),
    [("no-such-host.invalid:0", "no-such-host.invalid cannot be resolved", "use an IP address"),
     ("192.0.2.1:0", "192.0.2.1:0 cannot be bound (Cannot assign requested address)",
      "use an address of this machine"),
     ("taken", "cannot be bound (Address already in use)", "stop the program that listens")],
)  # fmt: skip
def test_check_binds_the_listen_address_as_run_would(
    tmp_path: Path, listen: str, problem: str, fix: str
) -> None:
    """A listen host that does not resolve, an address not of this machine, a port another
    program listens on: `run` cannot start (exit 1, "cannot start"), and `check` says so,
    exit 2, one line naming the setting and the fix (before, it passed all three). A port
    held by the daemon of the same socket is its own (`test_check_of_good_options...`)."""
    env = _base_env(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if listen == "taken":
            listen = f"127.0.0.1:{taken.getsockname()[1]}"
        env["GASTOWN_SANDBOXD_LISTEN"] = listen
        done = cli("check", env=env)
        ran = _run(env)
    assert done.returncode == 2, done.stdout
    (line,) = done.stderr.splitlines()
    assert "GASTOWN_SANDBOXD_LISTEN" in line
    assert problem in line
    assert fix in line
    assert ran.returncode == 1
    assert ran.stderr.splitlines()[-1].startswith("gastown-sandboxd: cannot start: ")


def test_check_refuses_a_shim_folder_or_socket_folder_that_run_could_not_make(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A shim folder under a regular file and a socket in a folder no one can make: `check`
    and `run` both exit 2 naming both settings (before, check passed, and run exited 2 for
    the first and 1 for the second)."""
    daemon = _daemon(daemon_factory, tmp_path)
    (tmp_path / "plain-file").write_text("")
    env = {
        **_env_of(daemon),
        "GASTOWN_SANDBOXD_SHIM_DIR": str(tmp_path / "plain-file" / "bin"),
        # A folder no one can make (procfs): `run` exited 1, "cannot start".
        "GASTOWN_SANDBOXD_SOCKET": f"/proc/gastown-sandboxd-test-{os.getpid()}/d.sock",
    }
    done = cli("check", env=env)
    assert done.returncode == 2, done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 2, lines
    assert "GASTOWN_SANDBOXD_SHIM_DIR" in lines[0]
    assert "GASTOWN_SANDBOXD_SOCKET" in lines[1]
    # `run` stops on the same two lines, with the same exit 2 (the socket's folder was an
    # exit 1, "cannot start", once the daemon had begun).
    ran = _run(env)
    assert (ran.returncode, ran.stderr.splitlines()) == (2, lines)


def test_check_warns_of_a_state_folder_it_cannot_create_and_still_exits_0(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A state folder under a regular file: `run` would keep the copy in memory only, so
    `check` passes (exit 0) and says why on stderr, naming the setting to change."""
    daemon = _daemon(daemon_factory, tmp_path)
    (tmp_path / "plain-file").write_text("")
    env = {**_env_of(daemon), "GASTOWN_SANDBOXD_STATE_DIR": str(tmp_path / "plain-file" / "s")}
    done = cli("check", env=env)
    assert done.returncode == 0, done.stderr
    assert f"state folder    {tmp_path / 'plain-file' / 's'}" in done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"warning: state folder: {tmp_path / 'plain-file'} is not a folder;")
    assert "GASTOWN_SANDBOXD_STATE_DIR" in line


# --- 4. last_error ------------------------------------------------------------------------


def test_status_says_why_refreshes_fail_and_refresh_names_the_cloud(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Cloud down, no token: /status `last_error` is the outage, `status` shows it, `refresh`
    names the cloud URL and the kind of failure."""
    cloud_port = unused_port()
    env_file = write_env(tmp_path / "home" / ".env.gateway", None)
    daemon = daemon_factory(
        town_id=TOWN, cloud_url=f"http://127.0.0.1:{cloud_port}", env_file=env_file
    )
    status = wait_for_status(daemon, lambda s: s.get("last_error") is not None)
    error = status["last_error"]
    assert error["reason"] == "outage"
    assert error["detail"] == "connect_error"
    assert error["at"].endswith("Z")
    assert abs(_parse_time(error["at"]) - time.time()) < 120
    assert status["env_file"] == str(env_file)
    env = client_env(daemon, TOWN)
    shown = cli("status", env=env)
    assert shown.returncode == 0
    assert "last error      outage at " in shown.stdout
    assert "connect_error" in shown.stdout
    refresh = cli("refresh", env=env)
    print(refresh.stderr)
    assert refresh.returncode == 1
    (line,) = refresh.stderr.splitlines()
    assert f"the cloud at http://127.0.0.1:{cloud_port}" in line
    assert "outage: connect_error" in line


def _parse_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- 6. SIGHUP ------------------------------------------------------------------------------


class _SingleStream:
    """One SSE connection, never resumed: it records events and notes when it ends."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.events: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.ended = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._follow, args=(daemon.socket,), daemon=True)
        self._thread.start()

    def _follow(self, path: Path) -> None:
        transport = httpx.HTTPTransport(uds=str(path))
        timeout = httpx.Timeout(5.0, read=60.0)
        with httpx.Client(transport=transport, base_url="http://d", timeout=timeout) as client:
            try:
                with connect_sse(client, "GET", "/events") as source:
                    self.connected.set()
                    for sse in source.iter_sse():
                        if sse.data:
                            with self._changed:
                                self.events.append(json.loads(sse.data))
                                self._changed.notify_all()
            except httpx.TransportError:
                pass
        self.ended.set()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, type: str, deadline: float = 15.0, *, after: int = 0) -> dict[str, Any]:
        """The first event of `type` whose id is above `after`."""
        end = time.monotonic() + deadline
        with self._changed:
            while True:
                for event in self.events:
                    if event["type"] == type and event["id"] > after:
                        return event
                assert not self.ended.is_set(), "the stream ended"
                assert time.monotonic() < end, f"no {type} event; saw {self.events}"
                self._changed.wait(0.2)


@pytest.fixture
def ignoring_sighup() -> Iterator[None]:
    """Start the daemon with SIGHUP ignored, as `nohup` would: it must still reload."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


# Runs its arguments with SIGHUP at its default action (the test runner may ignore it).
_SIGHUP_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def _ignores_sighup(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def test_a_sighup_while_the_daemon_starts_does_not_end_it(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """SIGHUP's default action ends a process, and the reload handler comes only once the
    daemon's task group runs (~150 ms in): before, a SIGHUP in that window (supervisorctl
    signal HUP) ended it with 129. Now its first lines ignore SIGHUP until the handler takes
    it: a SIGHUP sent then is a no-op, and the daemon goes on to READY and keeps running."""
    daemon = _daemon(
        daemon_factory,
        tmp_path,
        wait_ready=False,
        wrapper=[sys.executable, "-c", _SIGHUP_DEFAULT],
    )
    wait_until(lambda: _ignores_sighup(daemon.process.pid), deadline=10, what="SIGHUP ignored")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_log("daemon_ready")
    assert daemon.process.poll() is None
    # Once serving, a SIGHUP is a reload, as always.
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_log("options_reloaded")
    assert daemon.stop() == 0


def test_head_of_the_event_stream_answers_its_headers_and_frees_the_connection(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """HEAD /events (Starlette adds HEAD to every GET route) is the stream's headers alone:
    the next request on the connection is answered and no subscription is left (before, the
    stream ran with its body unsent, held the connection and counted as a subscriber)."""
    daemon = _daemon(daemon_factory, tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(b"HEAD /events HTTP/1.1\r\nHost: daemon\r\n\r\n")
        head, _ = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"text/event-stream" in head
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: daemon\r\n\r\n")
        answer, _ = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 200")
    assert _subscribers(daemon) == 0


def _hook_toml(marker: Path, label: str) -> str:
    script = f'printf "%s %s\\n" {label} "$GASTOWN_EVENT_ID" >> {marker}'
    return (
        '[[hooks]]\nevents = ["config.changed"]\n'
        f"command = {json.dumps(['bash', '-c', script])}\n"
        'timeout = "10s"\n'
    )


def _patch(daemon: DaemonProcess, effort: str) -> None:
    with daemon.local() as local:
        body = {"town": {"role_effort": {"mayor": effort}}}
        answer = local.patch("/config", json=body)
    assert answer.status_code == 200, answer.text


def _wait_for_line(path: Path, line: str, deadline: float = 15.0) -> list[str]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        lines = path.read_text().splitlines() if path.exists() else []
        if line in lines:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"{path} never got {line!r}")


def test_sighup_reloads_hooks_and_keeps_the_event_stream_open(
    daemon_factory: DaemonFactory, tmp_path: Path, ignoring_sighup: None
) -> None:
    """A real SIGHUP with an SSE stream open: the stream stays and gets later events, the hook
    changed in the TOML runs; then a bad TOML file is refused and that hook stays."""
    marker = tmp_path / "hook-runs"
    daemon = _daemon(daemon_factory, tmp_path, config_toml=_hook_toml(marker, "old"))
    config = next(tmp_path.glob("daemon-*.toml"))
    stream = _SingleStream(daemon)
    assert stream.connected.wait(10)

    _patch(daemon, "high")
    first = stream.wait_for("config.changed")
    _wait_for_line(marker, f"old {first['id']}")

    config.write_text(_hook_toml(marker, "new"))
    daemon.process.send_signal(signal.SIGHUP)
    reloaded = daemon.wait_for_log("options_reloaded")
    assert reloaded["changed"] == ["hooks"]
    _patch(daemon, "low")
    second = stream.wait_for("config.changed", after=first["id"])
    lines = _wait_for_line(marker, f"new {second['id']}")
    assert f"old {second['id']}" not in lines  # the old hook was replaced before the event

    config.write_text('[[hooks]]\nevents = ["no.such.event"]\ncommand = ["true"]\n')
    daemon.process.send_signal(signal.SIGHUP)
    refused = daemon.wait_for_log("options_reload_refused")
    assert any("hooks[0].events" in problem for problem in refused["problems"])
    # A file Python's TOML reader cannot even decode (before: the reload raised, the daemon
    # exited 1).
    config.write_bytes(b"# caf\xe9\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: len([r for r in daemon.logs() if r.get("event") == "options_reload_refused"]) == 2,
        deadline=10,
        what="the second reload refused",
    )
    refused = [r for r in daemon.logs() if r.get("event") == "options_reload_refused"][1]
    assert any("is not UTF-8 text" in problem for problem in refused["problems"])
    _patch(daemon, "max")
    third = stream.wait_for("config.changed", after=second["id"])
    _wait_for_line(marker, f"new {third['id']}")

    assert not stream.ended.is_set()
    assert daemon.process.poll() is None
    with daemon.local() as local:
        assert local.get("/status").json()["subscribers"] == 1
    assert daemon.stop() == 0
    assert stream.ended.wait(10)


def test_sighup_brings_the_first_hook_to_a_daemon_without_any(
    daemon_factory: DaemonFactory, tmp_path: Path, ignoring_sighup: None
) -> None:
    """Started without hooks or signals, the daemon's notifier holds no subscription (the
    bus has only the SSE stream); a real SIGHUP that adds a hook subscribes it, and the hook
    runs for the change after the reload, never for the one before."""
    marker = tmp_path / "hook-runs"
    daemon = _daemon(daemon_factory, tmp_path, config_toml="# no hooks yet\n")
    config = next(tmp_path.glob("daemon-*.toml"))
    stream = _SingleStream(daemon)
    assert stream.connected.wait(10)
    assert _subscribers(daemon) == 1

    _patch(daemon, "high")
    before = stream.wait_for("config.changed")["id"]
    config.write_text(_hook_toml(marker, "first"))
    daemon.process.send_signal(signal.SIGHUP)
    assert daemon.wait_for_log("options_reloaded")["changed"] == ["hooks"]
    assert _subscribers(daemon) == 2
    _patch(daemon, "low")
    after = stream.wait_for("config.changed", after=before)["id"]
    # One runner, in the order of the events: a run for `before` would be written first.
    assert _wait_for_line(marker, f"first {after}") == [f"first {after}"]
    assert daemon.stop() == 0


def _subscribers(daemon: DaemonProcess) -> float:
    with daemon.local() as local:
        return metric_value(local.get("/metrics").text, "gastown_sandboxd_event_subscribers")


def test_sighup_applies_new_schedule_knobs(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """refresh.max_sleep and config_sync.interval changed and SIGHUP: the reload names both
    as changed, and an option that needs a restart is named as such."""
    daemon = _daemon(daemon_factory, tmp_path, config_toml='[refresh]\nmax_sleep = "30s"\n')
    config = next(tmp_path.glob("daemon-*.toml"))
    config.write_text(
        '[watcher]\ndebounce = "100ms"\n[refresh]\nmax_sleep = "20s"\n'
        '[config_sync]\ninterval = "1m"\n'
    )
    daemon.process.send_signal(signal.SIGHUP)
    reloaded = daemon.wait_for_log("options_reloaded")
    assert reloaded["changed"] == ["config_sync_interval", "schedule"]
    restart = daemon.wait_for_log("options_need_restart")
    assert restart["options"] == ["watch_debounce_ms"]
    # The same file again: still needs a restart; put back: no longer; changed again: again.
    # (Before, the second was silent and the third named it: the running options had taken
    # the file's restart-only values.)
    kept = '[refresh]\nmax_sleep = "20s"\n[config_sync]\ninterval = "1m"\n'
    reloads = ("options_reloaded", "options_need_restart")

    def told() -> list[str]:
        return [r["event"][8:] for r in daemon.logs() if r.get("event") in reloads]

    for step, text in enumerate((None, kept, '[watcher]\ndebounce = "100ms"\n' + kept), 2):
        if text is not None:
            config.write_text(text)
        daemon.process.send_signal(signal.SIGHUP)  # one at a time: HUPs in a reload coalesce
        wait_until(partial(_reloads_are, told, step), f"reload {step}")
    wait_until(lambda: told().count("need_restart") >= 3, "the fourth reload's warning")
    steps = ["reloaded", "need_restart", "reloaded", "need_restart", "reloaded"]
    assert told() == [*steps, "reloaded", "need_restart"]


def _reloads_are(told: Callable[[], list[str]], count: int) -> bool:
    return told().count("reloaded") == count


# --- 10. small things -----------------------------------------------------------------------


def test_inspect_token_without_arguments_reads_the_running_daemons_env_file(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """No FILE and no GASTOWN_ENV_FILE: the running daemon's env file, in whole seconds."""
    token = local_token(TOWN)
    daemon = _daemon(daemon_factory, tmp_path, token)
    env = client_env(daemon, TOWN, HOME=str(tmp_path / "elsewhere"))
    del env["GASTOWN_ENV_FILE"]
    done = cli("inspect-token", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["source"] == str(daemon.env_file)
    assert report["fingerprint"] == fingerprint(token)
    assert isinstance(report["expires_in"], int)
    assert 86000 < report["expires_in"] <= 86400
    shown = cli("inspect-token", env=env)
    (line,) = [ln for ln in shown.stdout.splitlines() if ln.startswith("expires_in")]
    assert line.split()[-1].isdigit()


def test_an_unreachable_socket_hints_at_the_flag_and_the_variable(tmp_path: Path) -> None:
    """`status` with no daemon: one line that names --socket and GASTOWN_SANDBOXD_SOCKET."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GASTOWN_", "GT_"))}
    env["GASTOWN_SANDBOXD_SOCKET"] = str(tmp_path / "none.sock")
    done = cli("status", env=env)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert f"cannot reach the daemon at {tmp_path / 'none.sock'}" in line
    assert "--socket" in line
    assert "GASTOWN_SANDBOXD_SOCKET" in line
