"""Hooks and signals end to end: configured in the daemon's TOML, run as real processes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess
from tests.waiting import wait_until

USER = "user-hooks"
WAIT = 10.0

# Writes {"stdin", "event", "key"} to <folder>/<GASTOWN_EVENT_ID>.json, by rename: never
# half-written. "key": the INTERNAL_API_KEY the hook was given, if any; "path": its PATH.
RECORD_HOOK = """
import json, os, sys
folder = sys.argv[1]
record = {"stdin": sys.stdin.read(), "event": os.environ["GASTOWN_EVENT"],
          "key": os.environ.get("INTERNAL_API_KEY"), "path": os.environ["PATH"]}
path = os.path.join(folder, os.environ["GASTOWN_EVENT_ID"] + ".json")
with open(path + ".part", "w") as f:
    json.dump(record, f)
os.replace(path + ".part", path)
"""

# Notes its pid and event id, then becomes `sleep 60` (same pid) until it is killed.
HANGING_HOOK = 'echo "$$ $GASTOWN_EVENT_ID" >> "$1"; exec sleep 60'

# Notes each run, then fails.
FAILING_HOOK = 'echo "$GASTOWN_EVENT_ID" >> "$1"; exit 1'

# Appends its name to a file on each SIGHUP.
SIGHUP_CHILD = """
import signal, sys
out, name = sys.argv[1], sys.argv[2]
def on_hup(signum, frame):
    with open(out, "a") as f:
        f.write(name + "\\n")
signal.signal(signal.SIGHUP, on_hup)
print("ready", flush=True)
while True:
    signal.pause()
"""


def toml_list(values: list[str]) -> str:
    """A TOML array of strings (JSON strings are valid TOML basic strings)."""
    return json.dumps(values)


def hook(events: list[str], command: list[str], timeout: str) -> str:
    return (
        f"[[hooks]]\nevents = {toml_list(events)}\ncommand = {toml_list(command)}\n"
        f'timeout = "{timeout}"\n'
    )


@dataclass
class Town:
    """A town of the real cloud; `start(config_toml)` runs a daemon for it."""

    cloud: CloudServer
    town_id: str
    tmp: Path
    factory: DaemonFactory

    def mint(self, iat: int) -> str:
        return self.cloud.mint(USER, self.town_id, now=iat)

    def start(
        self, config_toml: str | None = None, *, name: str, issued_ago: int = 60
    ) -> DaemonProcess:
        env_file = self.tmp / f"home-{name}" / ".env.gateway"
        env_file.parent.mkdir()
        # Issued a minute ago, so that a refresh now always brings a different token.
        env_file.write_text(f"KILO_JWT={self.mint(int(time.time()) - issued_ago)}\n")
        return self.factory(
            town_id=self.town_id,
            cloud_url=self.cloud.url,
            env_file=env_file,
            config_toml=config_toml,
            extra_env={"INTERNAL_API_KEY": self.cloud.internal_key},
            name=name,
        )


@pytest.fixture
def town(cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path) -> Town:
    town_json, _ = cloud.create_town(user_id=USER, name="hooks")
    return Town(cloud=cloud, town_id=town_json["id"], tmp=tmp_path, factory=daemon_factory)


def metric(client: httpx.Client, name: str) -> float:
    """One sample of /metrics by its full name; 0 when the sample is not there yet."""
    for line in client.get("/metrics").text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split(" ")[1])
    return 0.0


def patch_crew(client: httpx.Client, n: int) -> httpx.Response:
    """A PATCH that always changes the town file: the crew member's agent flips each time."""
    body = {"town": {"crew_agents": {"hooked": ("claude", "codex")[n % 2]}}}
    answer = client.patch("/config", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["changed"]
    return answer


def daemon_path(daemon: DaemonProcess) -> str:
    """The PATH the daemon process runs with."""
    environ = Path(f"/proc/{daemon.process.pid}/environ").read_bytes().split(b"\0")
    return next(v for k, _, v in (e.partition(b"=") for e in environ) if k == b"PATH").decode()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_hook_gets_the_event_on_stdin_and_its_type_in_the_environment(
    town: Town, tmp_path: Path
) -> None:
    """After a PATCH, a config.changed hook receives the event's JSON and GASTOWN_EVENT, and
    not the daemon's INTERNAL_API_KEY (which the daemon runs with). The shim folder is first
    on its PATH, once, and the daemon's PATH follows: a gt command it runs gives its panes
    that PATH, so agents it restarts start through their shims."""
    folder = tmp_path / "records"
    folder.mkdir()
    command = [sys.executable, "-c", RECORD_HOOK, str(folder)]
    daemon = town.start(hook(["config.changed"], command, "10s"), name="record")
    api = daemon.local()
    revision = patch_crew(api, 0).json()["revision"]
    record_file = wait_until(lambda: next(folder.glob("*.json"), None), "the hook's record")
    record = json.loads(record_file.read_text())
    assert record["event"] == "config.changed"
    assert record["key"] is None
    shim_dir = api.get("/status").json()["shim_dir"]
    assert record["path"].split(os.pathsep) == [
        shim_dir,
        *(entry for entry in daemon_path(daemon).split(os.pathsep) if entry != shim_dir),
    ]
    event = json.loads(record["stdin"])
    assert record_file.name == f"{event['id']}.json"
    assert {k: event[k] for k in ("type", "scope", "rig", "file", "keys", "source")} == {
        "type": "config.changed",
        "scope": "town",
        "rig": None,
        "file": "settings/config.json",
        "keys": ["type", "version", "crew_agents"],
        "source": "api",
    }
    assert event["revision"] == revision
    # A token event is not one it asked for: the next PATCH's run is the second and last.
    answer = api.put("/token", json={"token": town.mint(int(time.time()) - 5)})
    assert answer.status_code == 200
    patch_crew(api, 1)
    wait_until(lambda: len(list(folder.glob("*.json"))) == 2, "the second record")
    ids = sorted(int(path.stem) for path in folder.glob("*.json"))
    assert ids == [event["id"], event["id"] + 2]
    assert metric(api, "gastown_sandboxd_hook_runs_total") == 2


def test_hooks_get_the_events_of_the_start(town: Town, tmp_path: Path) -> None:
    """A daemon that finds its token expired emits token.expired as it starts, before it
    refreshes: a token.expired hook runs for it (before, the notifier subscribed after the
    refresher had started, and the start's events reached SSE replay but no hook)."""
    folder = tmp_path / "records"
    folder.mkdir()
    command = [sys.executable, "-c", RECORD_HOOK, str(folder)]
    daemon = town.start(hook(["token.expired"], command, "10s"), name="start", issued_ago=3 * 86400)
    record_file = wait_until(lambda: next(folder.glob("*.json"), None), "the hook's record")
    assert json.loads(record_file.read_text())["event"] == "token.expired"
    with daemon.local() as api:
        wait_until(lambda: api.get("/status").json()["state"] == "fresh", "a fresh token")


def test_hanging_hook_is_killed_at_its_timeout_and_runs_again(town: Town, tmp_path: Path) -> None:
    """A hook that hangs is killed after 300 ms, logged and counted; the next event runs it."""
    runs = tmp_path / "runs"
    command = ["bash", "-c", HANGING_HOOK, "bash", str(runs)]
    daemon = town.start(hook(["config.changed"], command, "300ms"), name="hang")
    api = daemon.local()
    patch_crew(api, 0)
    timed_out = daemon.wait_for_log("hook_timed_out", WAIT)
    assert timed_out["program"] == "bash"
    assert timed_out["timeout"] == 0.3
    assert metric(api, "gastown_sandboxd_hook_timeouts_total") == 1
    (first,) = lines(runs)
    pid = int(first.split()[0])
    wait_until(lambda: not pid_alive(pid), "the hung hook to be killed")

    # The next event runs it again (after the hook's backoff), and it is killed again.
    patch_crew(api, 1)
    wait_until(lambda: len(lines(runs)) == 2, "a second run")
    wait_until(lambda: metric(api, "gastown_sandboxd_hook_timeouts_total") == 2, "a second timeout")
    second_pid = int(lines(runs)[1].split()[0])
    wait_until(lambda: not pid_alive(second_pid), "the second hung hook to be killed")
    assert int(lines(runs)[1].split()[1]) > int(first.split()[1])
    assert metric(api, "gastown_sandboxd_hook_failures_total") == 2
    assert api.get("/healthz").status_code == 200


def _patch_latencies(api: httpx.Client, count: int) -> list[float]:
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        patch_crew(api, n)
        latencies.append(time.perf_counter() - started)
    return latencies


def _summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


def test_failing_hook_backs_off_and_never_slows_the_api(town: Town, tmp_path: Path) -> None:
    """100 events in a row to a hook that always fails: every PATCH answers, failures are
    counted and grow, and backoff runs the hook far fewer times than there are events."""
    runs = tmp_path / "runs"
    command = ["bash", "-c", FAILING_HOOK, "bash", str(runs)]
    plain = town.start(name="plain").local()
    failing_daemon = town.start(hook(["config.changed"], command, "5s"), name="failing")
    failing = failing_daemon.local()
    without = _patch_latencies(plain, 100)
    with_hook = _patch_latencies(failing, 100)
    print(
        f"\nPATCH /config latency over 100 in a row: no hook {_summary(without)}; "
        f"with an always-failing hook {_summary(with_hook)}"
    )
    # The first run fails at once; the backoff (1 s) delays the second, which still fails.
    wait_until(lambda: metric(failing, "gastown_sandboxd_hook_failures_total") >= 2, "2 failures")
    hook_runs = metric(failing, "gastown_sandboxd_hook_runs_total")
    assert 2 <= hook_runs < 100
    assert len(lines(runs)) <= hook_runs
    assert metric(failing, "gastown_sandboxd_events_total") == 100
    assert failing_daemon.wait_for_log("hook_backing_off", WAIT)["failures"] >= 1
    assert failing.get("/healthz").status_code == 200


@pytest.fixture
def children() -> Iterator[Callable[[Path, str], subprocess.Popen[str]]]:
    """Start python children that note each SIGHUP; all are stopped at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(out: Path, name: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-c", SIGHUP_CHILD, str(out), name]
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        started.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        return child

    yield start
    for child in started:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_signals_follow_the_pid_file(
    town: Town, tmp_path: Path, children: Callable[[Path, str], subprocess.Popen[str]]
) -> None:
    """A token refresh sends SIGHUP to the process in the pid file, read anew each time; a
    missing pid file is logged and counted while the daemon carries on."""
    pid_file = tmp_path / "agent.pid"
    got = tmp_path / "hups"
    config = (
        f"[[signals]]\npid_file = {json.dumps(str(pid_file))}\n"
        'signal = "SIGHUP"\nevents = ["token.refreshed"]\n'
    )
    first = children(got, "first")
    pid_file.write_text(f"{first.pid}\n")
    daemon = town.start(config, name="signals")
    api = daemon.local()

    answer = api.post("/token/refresh")
    assert answer.status_code == 200, answer.text
    wait_until(lambda: lines(got) == ["first"], "SIGHUP to the first process")
    assert metric(api, "gastown_sandboxd_signals_sent_total") == 1

    second = children(got, "second")
    pid_file.write_text(f"{second.pid}\n")
    answer = api.put("/token", json={"token": town.mint(int(time.time()) - 30)})
    assert answer.status_code == 200, answer.text
    wait_until(lambda: lines(got) == ["first", "second"], "SIGHUP to the second process")

    pid_file.unlink()
    answer = api.put("/token", json={"token": town.mint(int(time.time()) - 20)})
    assert answer.status_code == 200, answer.text
    missing = daemon.wait_for_log("signal_pid_file_missing", WAIT)
    assert missing["pid_file"] == str(pid_file)
    assert missing["signal"] == "SIGHUP"
    assert metric(api, "gastown_sandboxd_signal_failures_total") == 1
    assert metric(api, "gastown_sandboxd_signals_sent_total") == 2
    assert api.get("/healthz").status_code == 200
    assert daemon.process.poll() is None
    assert lines(got) == ["first", "second"]
    assert first.poll() is None
    assert second.poll() is None
