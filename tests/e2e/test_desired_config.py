"""Desired configuration end to end: the real cloud keeps it, the real daemon converges on it.

The town is created in the cloud with `sandboxUrl` set to the daemon's TCP address, chosen
before either starts, so the dashboard's PATCHes are pushed when the daemon is there and kept
as pending when it is not. Syncs are triggered with `POST /config/sync` on the local socket
(or happen at the daemon's start), never by waiting for the interval.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon.gt_samples import FRONTEND_FILE, TOWN_FILE, make_config_town
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess
from tests.fixtures.net import tls, unused_port
from tests.waiting import wait_until

from .gt_town import read_events

CHANGE = {
    "town": {"default_agent": "codex", "role_effort": {"mayor": "high"}},
    "rigs": {"frontend": {"agent": "codex"}},
}


@dataclass
class Sandbox:
    """A cloud town and the daemon (started and stopped at will) that serves it."""

    cloud: CloudServer
    factory: DaemonFactory
    town_id: str
    token: str
    port: int
    folder: Path
    daemon: DaemonProcess | None = None

    def start(self, *, fresh: str | None = None, cloud_url: str | None = None) -> DaemonProcess:
        """Start the daemon on the sandbox's town root, env file and state folder (or on new
        ones named `fresh`: a replaced sandbox)."""
        base = self.folder / (fresh or "sandbox")
        root = base / "town"
        if not root.exists():
            make_config_town(root)
        env_file = base / "env" / ".env.gateway"
        if not env_file.exists():
            env_file.parent.mkdir(parents=True)
            env_file.write_text(f"KILO_JWT={self.token}\n")
            env_file.chmod(0o600)
        self.daemon = self.factory(
            town_id=self.town_id,
            cloud_url=cloud_url or self.cloud.url,
            town_root=root,
            env_file=env_file,
            extra_env={
                "INTERNAL_API_KEY": self.cloud.internal_key,
                "GASTOWN_SANDBOXD_LISTEN": f"127.0.0.1:{self.port}",
            },
            name=fresh or "sandbox",
        )
        return self.daemon

    @property
    def root(self) -> Path:
        assert self.daemon is not None
        return self.daemon.town_root

    def doc(self, relative: str = TOWN_FILE) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.root / relative).read_bytes())
        return result

    def dashboard_patch(self, body: Any) -> httpx.Response:
        with httpx.Client(
            base_url=self.cloud.url, headers=self.cloud.headers, timeout=30, verify=tls()
        ) as c:
            return c.patch(f"/api/gastown/towns/{self.town_id}/config", json=body)

    def cloud_config(self) -> dict[str, Any]:
        with httpx.Client(
            base_url=self.cloud.url, headers=self.cloud.headers, timeout=30, verify=tls()
        ) as c:
            answer = c.get(f"/api/gastown/towns/{self.town_id}/config")
        assert answer.status_code == 200, answer.text
        config: dict[str, Any] = answer.json()
        return config

    def wait_cloud(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll the cloud's record until `check` holds (deadline 15 s)."""
        end = time.monotonic() + 15
        config = self.cloud_config()
        while not check(config):
            assert time.monotonic() < end, f"the cloud's record never got there: {config}"
            time.sleep(0.05)
            config = self.cloud_config()
        return config

    def sync(self) -> httpx.Response:
        assert self.daemon is not None
        with self.daemon.local(timeout=30) as client:
            return client.post("/config/sync")

    def start_sync_done(self) -> None:
        """Wait until the daemon's sync at start has ended: one still running when a test
        edits a file by hand would put the cloud's keys back before the test's own sync."""
        wait_until(
            lambda: self.status()["config_sync"]["last_sync_at"], "the sync at start", deadline=15
        )

    def status(self) -> dict[str, Any]:
        assert self.daemon is not None
        with self.daemon.local() as client:
            result: dict[str, Any] = client.get("/status").json()
            return result


@pytest.fixture
def sandbox(cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path) -> Sandbox:
    port = unused_port()
    town, token = cloud.create_town(name="desired", sandbox_url=f"http://127.0.0.1:{port}")
    return Sandbox(cloud, daemon_factory, town["id"], token, port, tmp_path)


def applied(generation: int) -> Callable[[dict[str, Any]], bool]:
    return lambda config: (
        config["state"] == "applied" and config["observedGeneration"] == generation
    )


def test_a_change_made_while_the_sandbox_is_away_is_applied_when_it_is_back(
    sandbox: Sandbox,
) -> None:
    """Daemon stopped: the dashboard's change is pending (202). Daemon back: its start-up
    sync applies it, emits config.changed from the cloud and the cloud shows it applied."""
    daemon = sandbox.start()
    daemon.stop()
    answer = sandbox.dashboard_patch(CHANGE)
    assert answer.status_code == 202, answer.text
    assert sandbox.cloud_config()["state"] == "pending"
    daemon = sandbox.start()
    config = sandbox.wait_cloud(applied(1))
    assert sandbox.doc()["default_agent"] == "codex"
    assert sandbox.doc()["role_effort"]["mayor"] == "high"
    assert sandbox.doc(FRONTEND_FILE)["agent"] == "codex"
    with daemon.local() as client:
        assert config["revision"] == client.get("/config").json()["revision"]
    events = read_events(daemon, after=0, count=2)
    assert {(e["type"], e["source"], e["generation"]) for e in events} == {
        ("config.changed", "cloud", 1)
    }
    status = sandbox.status()["config_sync"]
    assert (status["generation"], status["state"]) == (1, "applied")
    assert status["last_sync_at"].endswith("Z")


def test_a_replaced_sandbox_with_a_fresh_town_root_and_state_folder_converges(
    sandbox: Sandbox,
) -> None:
    """Applied on the first sandbox through the push; a new sandbox (new town root, env file
    and state folder) gets the same managed settings at its start."""
    first = sandbox.start()
    answer = sandbox.dashboard_patch(CHANGE)
    assert answer.status_code == 200, answer.text
    first.stop()
    second = sandbox.start(fresh="replacement")
    assert second.town_root != first.town_root

    # The cloud already says "applied" (by the first sandbox): wait on the new daemon's own
    # word, given once the whole change is on disk (the town file alone can be read between
    # the renames of one apply).
    def applied_here() -> dict[str, Any] | None:
        sync: dict[str, Any] = sandbox.status()["config_sync"]
        return sync if sync["state"] == "applied" else None

    sync = wait_until(applied_here, "the replacement to apply generation 1", deadline=15)
    assert sync["generation"] == 1
    assert sandbox.doc()["default_agent"] == "codex"
    assert sandbox.doc()["role_effort"]["mayor"] == "high"
    assert sandbox.doc(FRONTEND_FILE)["agent"] == "codex"


def test_a_hand_edit_of_a_cloud_key_is_put_back_and_a_hand_added_key_kept(
    sandbox: Sandbox,
) -> None:
    """A hand changes default_agent (the cloud's) and adds role_effort.crew (nobody's):
    the next sync puts the first back and keeps the second."""
    sandbox.start()
    assert sandbox.dashboard_patch(CHANGE).status_code == 200
    sandbox.start_sync_done()
    edited = sandbox.doc()
    edited["default_agent"] = "claude"
    edited["role_effort"]["crew"] = "low"
    (sandbox.root / TOWN_FILE).write_text(json.dumps(edited, indent=2) + "\n")
    answer = sandbox.sync()
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["state"], result["changed"], result["files"]) == ("applied", True, [TOWN_FILE])
    assert sandbox.doc()["default_agent"] == "codex"
    assert sandbox.doc()["role_effort"]["crew"] == "low"
    assert sandbox.doc()["role_effort"]["mayor"] == "high"
    again = sandbox.sync().json()
    assert (again["changed"], again["files"]) == (False, [])


def test_a_rig_that_does_not_exist_yet_is_reported_failed_then_applied(
    sandbox: Sandbox,
) -> None:
    """Desired names rig `later` before its folder exists: nothing is written, the cloud shows
    failed naming the rig; once the folder exists the next sync applies it."""
    daemon = sandbox.start()
    daemon.stop()
    body = {"town": {"default_agent": "codex"}, "rigs": {"later": {"agent": "codex"}}}
    assert sandbox.dashboard_patch(body).status_code == 202
    before = (sandbox.folder / "sandbox" / "town" / TOWN_FILE).read_bytes()
    sandbox.start()
    config = sandbox.wait_cloud(lambda c: c["state"] == "failed")
    assert [d["path"] for d in config["lastError"]["details"]] == ["/rigs/later"]
    assert "later" in config["lastError"]["details"][0]["message"]
    assert (sandbox.root / TOWN_FILE).read_bytes() == before
    assert sandbox.status()["config_sync"]["state"] == "failed"
    (sandbox.root / "later").mkdir()
    answer = sandbox.sync()
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "applied"
    assert sandbox.doc("later/settings/config.json")["agent"] == "codex"
    assert sandbox.doc()["default_agent"] == "codex"
    sandbox.wait_cloud(applied(1))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers (a cloud that hangs)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("cloud_kind", ["closed", "silent"])
def test_an_unreachable_cloud_gives_a_5xx_within_15_s_writes_nothing_and_the_daemon_stays(
    sandbox: Sandbox, silent_port: int, cloud_kind: str
) -> None:
    """A refused connection is 503, a cloud that never answers 504 (after the 10 s call
    timeout); both JSON errors within 15 s, the files as they were, the daemon still up."""
    if cloud_kind == "closed":
        port = unused_port()
        expected = 503
    else:
        port = silent_port
        expected = 504
    daemon = sandbox.start(cloud_url=f"http://127.0.0.1:{port}")
    before = {p: p.read_bytes() for p in sandbox.root.glob("**/settings/config.json")}
    began = time.monotonic()
    answer = sandbox.sync()
    took = time.monotonic() - began
    assert answer.status_code == expected, answer.text
    assert took < 15
    body = answer.json()
    assert body["error"] == "cloud_unavailable"
    assert "nothing was written" in body["message"]
    assert {p: p.read_bytes() for p in sandbox.root.glob("**/settings/config.json")} == before
    assert daemon.process.poll() is None
    with daemon.local() as client:
        assert client.get("/healthz").status_code == 200
    assert sandbox.status()["config_sync"]["state"] == "unreachable"


def test_a_pushed_change_is_kept_as_applied_across_a_sigkill_right_after_its_answer(
    sandbox: Sandbox,
) -> None:
    """The last-applied copy is fsynced a moment after a push, but saved whole before the
    answer: a daemon killed as the answer arrives leaves the push's copy for the next run."""
    daemon = sandbox.start()
    sandbox.start_sync_done()
    assert sandbox.dashboard_patch(CHANGE).status_code == 200
    daemon.stop(signal.SIGKILL)
    copy = sandbox.folder / "sandbox" / "env" / "state" / "desired-config.json"
    saved = json.loads(copy.read_bytes())
    assert (saved["town_id"], saved["generation"], saved["desired"]) == (sandbox.town_id, 1, CHANGE)
    sandbox.start()
    sandbox.start_sync_done()
    status = sandbox.status()["config_sync"]
    assert (status["generation"], status["state"]) == (1, "applied")


def test_a_push_records_its_generation_and_a_bad_generation_is_refused(sandbox: Sandbox) -> None:
    """The cloud's push (X-Gastown-Generation) is recorded as applied, so the next sync finds
    nothing to do; a header that is not a whole number is 400 and changes nothing."""
    daemon = sandbox.start()
    assert sandbox.dashboard_patch(CHANGE).status_code == 200
    assert sandbox.status()["config_sync"]["generation"] == 1
    result = sandbox.sync().json()
    assert (result["changed"], result["generation"], result["reported"]) == (False, 1, False)
    before = (sandbox.root / TOWN_FILE).read_bytes()
    with daemon.local() as client:
        answer = client.patch(
            "/config",
            json={"town": {"default_agent": "claude"}},
            headers={"x-gastown-generation": "two"},
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_generation"
    assert (sandbox.root / TOWN_FILE).read_bytes() == before
