"""Helpers of the end-to-end suites: a town wired to a daemon, the event stream, bash, the CLI.

Everything here drives real processes: the cloud and the daemon run as subprocesses, the
env file is sourced by a real bash, and the CLI is `python -m gastown_sandboxd`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from gastown_cloud.tokens import mint_gastown_token
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess

# Lines an operator may keep in the env file next to the token; the daemon must keep them.
ENV_HEAD = "# gateway settings, kept by the daemon\nKILO_API_URL=http://gateway.invalid/api\n"
ENV_TAIL = "export GT_EXTRA='kept as written'  # a comment\n"
# A secret for tokens the sandbox only judges by their claims (it holds no signing secret).
LOCAL_SECRET = "local-test-secret-of-at-least-32-bytes!"
SOURCE_SCRIPT = 'set -a; . "$1"; set +a; printf %s "$KILO_JWT"'


def env_text(token: str | None) -> str:
    """The env file the suites start from, with `token` (or no token line) in the middle."""
    return ENV_HEAD + (f"KILO_JWT={token}\n" if token is not None else "") + ENV_TAIL


def write_env(path: Path, token: str | None, *, mode: int = 0o600) -> Path:
    """Write `env_text(token)` to `path` with `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(env_text(token))
    path.chmod(mode)
    return path


def local_token(town_id: str, *, lifetime: int = 86400, now: int | None = None) -> str:
    """A well-formed token for `town_id`, signed with a secret no cloud knows."""
    return mint_gastown_token(
        "user-local", town_id, "org-local", secret=LOCAL_SECRET, lifetime=lifetime, now=now
    )


@dataclass(frozen=True)
class Town:
    """A town created in the cloud, with its owner and initial token."""

    cloud: CloudServer
    id: str
    user_id: str
    organization_id: str | None
    token: str

    def mint(self, *, lifetime: int | None = None, now: int | None = None) -> str:
        """A token for this town signed by its cloud."""
        return self.cloud.mint(
            self.user_id, self.id, self.organization_id, lifetime=lifetime, now=now
        )


def create_town(cloud: CloudServer, user_id: str = "user-e2e", org: str | None = "org-e2e") -> Town:
    town, token = cloud.create_town(user_id=user_id, organization_id=org, name="e2e")
    return Town(cloud, town["id"], user_id, org, token)


def start_daemon(
    daemon_factory: DaemonFactory,
    town: Town,
    env_file: Path,
    *,
    name: str | None = None,
    town_root: Path | None = None,
    wait_ready: bool = True,
    extra_env: Mapping[str, str] | None = None,
) -> DaemonProcess:
    """A daemon of `town` that talks to its cloud with the cloud's key, on `env_file`."""
    return daemon_factory(
        town_id=town.id,
        cloud_url=town.cloud.url,
        env_file=env_file,
        town_root=town_root,
        extra_env={"INTERNAL_API_KEY": town.cloud.internal_key, **(extra_env or {})},
        wait_ready=wait_ready,
        name=name,
    )


def source_token(env_file: Path) -> str:
    """What `set -a; . FILE; set +a` gives bash as KILO_JWT."""
    env = {k: v for k, v in os.environ.items() if k != "KILO_JWT"}
    done = subprocess.run(
        ["bash", "-c", SOURCE_SCRIPT, "bash", str(env_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout


def client_env(daemon: DaemonProcess, town_id: str, **extra: str) -> dict[str, str]:
    """The environment an agent in the sandbox has: the socket, the env file, the town."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GASTOWN_", "GT_"))}
    for name in ("KILO_JWT", "ANTHROPIC_AUTH_TOKEN", "KILOCODE_TOKEN", "NOTIFY_SOCKET"):
        env.pop(name, None)
    env.update(
        GASTOWN_SANDBOXD_SOCKET=str(daemon.socket),
        GASTOWN_ENV_FILE=str(daemon.env_file),
        TOWN_ID=town_id,
        **extra,
    )
    return env


def cli(
    *args: str, env: Mapping[str, str], stdin: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m gastown_sandboxd ARGS` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", *args],
        env=dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for_state(daemon: DaemonProcess, state: str, deadline: float = 15.0) -> dict[str, Any]:
    """Poll `/status` on the socket until its state is `state`; returns that status."""
    return wait_for_status(daemon, lambda status: status.get("state") == state, deadline)


def wait_for_status(
    daemon: DaemonProcess, check: Callable[[dict[str, Any]], bool], deadline: float = 15.0
) -> dict[str, Any]:
    """Poll `/status` on the socket until `check` holds; returns that status."""
    end = time.monotonic() + deadline
    last: dict[str, Any] = {}
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(daemon.socket), verify=False),
        base_url="http://sandboxd",
    ) as client:
        while time.monotonic() < end:
            try:
                last = client.get("/status").json()
            except httpx.TransportError:
                last = {}
            if last and check(last):
                return last
            time.sleep(0.05)
    raise AssertionError(f"the status never became as expected; last status {last}")


def token_fingerprint_is(expected: str) -> Callable[[dict[str, Any]], bool]:
    """A `wait_for_status` check: the daemon holds the token with this fingerprint."""
    return lambda status: (status.get("token") or {}).get("fingerprint") == expected


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition, by name and exact labels."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if sample == name and got == wanted:
            return float(value)
    raise AssertionError(f"no sample {name}{{{wanted}}} in the metrics")


class EventStream:
    """Reads `GET /events` of a daemon's socket in a thread and keeps every event.

    Reads time out every second and resume with `Last-Event-ID`, so that `close()` is prompt
    and no event is lost across the reconnections (the bus replays the last 1,000).
    """

    def __init__(self, socket_path: Path) -> None:
        self._socket = socket_path
        self._events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._last_id = 0
        self._thread = threading.Thread(target=self._read, name="sse-reader", daemon=True)

    def __enter__(self) -> EventStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self._events)

    def wait_for(
        self,
        type: str,
        *,
        where: Callable[[dict[str, Any]], bool] = lambda event: True,
        deadline: float = 10.0,
    ) -> dict[str, Any]:
        """The first event of `type` for which `where` holds, waiting up to `deadline` s."""
        end = time.monotonic() + deadline
        with self._changed:
            while True:
                for event in self._events:
                    if event["type"] == type and where(event):
                        return event
                remaining = end - time.monotonic()
                if remaining <= 0:
                    seen = [(e["id"], e["type"]) for e in self._events]
                    raise AssertionError(f"no {type} event within {deadline} s; saw {seen}")
                self._changed.wait(min(remaining, 0.5))

    def _read(self) -> None:
        transport = httpx.HTTPTransport(uds=str(self._socket), verify=False)
        timeout = httpx.Timeout(5.0, read=1.0)
        with httpx.Client(transport=transport, base_url="http://sandboxd", timeout=timeout) as c:
            while not self._stop.is_set():
                headers = {"Last-Event-ID": str(self._last_id)}
                try:
                    with connect_sse(c, "GET", "/events", headers=headers) as source:
                        for sse in source.iter_sse():
                            if sse.id and sse.data:
                                self._add(json.loads(sse.data))
                            if self._stop.is_set():
                                return
                except httpx.TransportError:
                    # A read timeout (no event for a second) or a daemon that went away.
                    time.sleep(0.02)

    def _add(self, event: dict[str, Any]) -> None:
        with self._changed:
            if event["id"] > self._last_id:
                self._last_id = event["id"]
                self._events.append(event)
                self._changed.notify_all()
