"""The dashboard's model change end to end: cloud PATCH → daemon PATCH /config → gt's files.

Both servers are real subprocesses sharing one INTERNAL_API_KEY; the town is created in the
cloud with `sandboxUrl` set to the daemon's TCP address, chosen before either starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon.gt_samples import (
    FRONTEND_FILE,
    RIG_SETTINGS,
    TOWN_FILE,
    TOWN_SETTINGS,
    contract_patch,
)
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess
from tests.fixtures.net import tls, unused_port

from .gt_town import read_events, start_config_daemon

# The contract's example, with the rig taking the new agent too.
BODY = contract_patch()
del BODY["town"]["role_effort"], BODY["town"]["crew_agents"]
BODY["rigs"]["frontend"]["agent"] = "kilo-sonnet"
# What the cloud keeps of BODY: RFC 7396 drops its nulls.
DESIRED = json.loads(json.dumps(BODY))
del DESIRED["town"]["role_agents"]["polecat"]


@dataclass
class Linked:
    """A cloud and a daemon that trust each other, and the town that joins them."""

    cloud: CloudServer
    daemon: DaemonProcess
    town_id: str

    def patch(
        self, body: Any = None, *, content: bytes | None = None, if_match: str | None = None
    ) -> httpx.Response:
        """PATCH the town's config through the cloud, as the dashboard does."""
        headers = {"content-type": "application/json"}
        if if_match is not None:
            headers["if-match"] = if_match
        with httpx.Client(
            base_url=self.cloud.url, headers=self.cloud.headers, timeout=20, verify=tls()
        ) as c:
            return c.patch(
                f"/api/gastown/towns/{self.town_id}/config",
                content=content if content is not None else json.dumps(body).encode(),
                headers=headers,
            )

    def file(self, relative: str) -> bytes:
        return (self.daemon.town_root / relative).read_bytes()

    def config(self) -> dict[str, Any]:
        """The town's desired configuration record in the cloud."""
        with httpx.Client(
            base_url=self.cloud.url, headers=self.cloud.headers, timeout=20, verify=tls()
        ) as c:
            answer = c.get(f"/api/gastown/towns/{self.town_id}/config")
        assert answer.status_code == 200, answer.text
        config: dict[str, Any] = answer.json()
        return config


@pytest.fixture
def linked(cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path) -> Linked:
    """The cloud's town points at a daemon listening on a port picked before either existed."""
    port = unused_port()
    town, token = cloud.create_town(name="forward", sandbox_url=f"http://127.0.0.1:{port}")
    daemon = start_config_daemon(
        daemon_factory,
        tmp_path,
        town_id=town["id"],
        token=token,
        cloud_url=cloud.url,
        extra_env={
            "INTERNAL_API_KEY": cloud.internal_key,
            "GASTOWN_SANDBOXD_LISTEN": f"127.0.0.1:{port}",
        },
    )
    assert daemon.url == f"http://127.0.0.1:{port}"
    return Linked(cloud=cloud, daemon=daemon, town_id=town["id"])


def test_dashboard_change_reaches_the_files(linked: Linked) -> None:
    """The daemon's 200 answer and ETag come back through the cloud with the generation; the
    files changed and the cloud records generation 1 applied at the daemon's revision."""
    answer = linked.patch(BODY)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["changed"] is True
    assert (result["generation"], result["state"]) == (1, "applied")
    config = linked.config()
    assert (config["generation"], config["observedGeneration"], config["state"]) == (
        1,
        1,
        "applied",
    )
    assert (config["desired"], config["revision"]) == (DESIRED, result["revision"])
    assert result["files"] == [TOWN_FILE, FRONTEND_FILE]
    assert answer.headers["etag"] == f'"{result["revision"]}"'
    with linked.daemon.local() as client:
        view = client.get("/config").json()
    assert {key: result[key] for key in ("town", "rigs", "revision")} == view
    town = json.loads(linked.file(TOWN_FILE))
    assert town["default_agent"] == "kilo-sonnet"
    assert "exec_wrapper" not in town["agents"]["kilo-sonnet"]  # the shims wrap agents
    assert town["role_agents"] == {"mayor": "kilo-sonnet", "witness": "claude-haiku"}
    assert town["cost_tier"] == "standard"
    rig = json.loads(linked.file(FRONTEND_FILE))
    assert rig["role_agents"] == {"polecat": "codex"}
    assert rig["namepool"] == {"style": "mad-max", "max_before_numbering": 50}
    events = read_events(linked.daemon, after=0, count=2)
    assert [(e["file"], e["source"]) for e in events] == [
        (TOWN_FILE, "api"),
        (FRONTEND_FILE, "api"),
    ]


def test_daemon_refusals_come_back_as_they_are(linked: Linked) -> None:
    """422 with its details, 412 for a stale If-Match, 409 for an unreadable file: passed on,
    and none of them kept in the cloud's desired configuration."""
    bad = {"town": {"role_agents": {"majer": "claude"}, "role_effort": {"mayor": "extreme"}}}
    invalid = linked.patch(bad)
    assert invalid.status_code == 422, invalid.text
    assert invalid.json()["error"] == "invalid_patch"
    assert {d["path"] for d in invalid.json()["details"]} == {
        "/town/role_agents/majer",
        "/town/role_effort/mayor",
    }
    first = linked.patch({"town": {"role_effort": {"mayor": "low"}}}, if_match='"stale"')
    assert first.status_code == 412, first.text
    assert first.json()["error"] == "precondition_failed"
    assert linked.file(TOWN_FILE) == TOWN_SETTINGS
    with linked.daemon.local() as client:
        etag = client.get("/config").headers["etag"]
    current = linked.patch({"town": {"role_effort": {"mayor": "low"}}}, if_match=etag)
    assert current.status_code == 200, current.text
    (linked.daemon.town_root / FRONTEND_FILE).write_bytes(b"{ not json")
    unreadable = linked.patch({"rigs": {"frontend": {"agent": "codex"}}})
    assert unreadable.status_code == 409, unreadable.text
    assert unreadable.json()["error"] == "settings_file_unreadable"
    assert linked.file(FRONTEND_FILE) == b"{ not json"
    config = linked.config()
    assert (config["generation"], config["state"]) == (1, "applied")
    assert config["desired"] == {"town": {"role_effort": {"mayor": "low"}}}


def test_body_the_cloud_cannot_parse_never_reaches_the_daemon(linked: Linked) -> None:
    """The cloud answers 400 itself for a body that is not JSON; the files stay as they were."""
    answer = linked.patch(content=b"{broken")
    assert answer.status_code == 400, answer.text
    assert linked.file(TOWN_FILE) == TOWN_SETTINGS
    assert linked.file(FRONTEND_FILE) == RIG_SETTINGS


def test_stopped_daemon_keeps_the_change_pending(linked: Linked) -> None:
    """With the daemon gone the cloud keeps the change as pending (202) and says why; the
    desired configuration holds it and nothing secret is in the answer."""
    assert linked.daemon.stop() == 0
    answer = linked.patch(BODY)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["generation"], body["state"], body["reason"]) == (
        1,
        "pending",
        "sandbox_unreachable",
    )
    assert "could not be reached" in body["message"]
    assert linked.cloud.internal_key not in answer.text
    assert linked.file(TOWN_FILE) == TOWN_SETTINGS
    config = linked.config()
    assert (config["generation"], config["observedGeneration"], config["state"]) == (
        1,
        0,
        "pending",
    )
    assert config["desired"] == DESIRED


def test_stopped_town_is_409_and_nothing_is_forwarded(linked: Linked) -> None:
    """A stopped town gets 409 town_not_active and the daemon's files stay; start again works."""
    linked.cloud.set_status(linked.town_id, "stop")
    answer = linked.patch(BODY)
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "town_not_active"
    assert linked.file(TOWN_FILE) == TOWN_SETTINGS
    assert "config_forwarded" not in linked.cloud.log_text()
    linked.cloud.set_status(linked.town_id, "start")
    assert linked.patch(BODY).status_code == 200
    linked.cloud.set_status(linked.town_id, "destroy")
    gone = linked.patch(BODY)
    assert gone.status_code == 409, gone.text
    assert "destroyed" in gone.json()["message"]


def test_daemon_with_another_key_is_pending_not_a_401(
    cloud_factory: Callable[..., CloudServer], daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A daemon that refuses the cloud's key: the change is kept pending with that reason."""
    cloud = cloud_factory()
    port = unused_port()
    town, token = cloud.create_town(sandbox_url=f"http://127.0.0.1:{port}")
    start_config_daemon(
        daemon_factory,
        tmp_path,
        town_id=town["id"],
        token=token,
        cloud_url=cloud.url,
        extra_env={"GASTOWN_SANDBOXD_LISTEN": f"127.0.0.1:{port}"},
    )
    with httpx.Client(base_url=cloud.url, headers=cloud.headers, timeout=20) as client:
        answer = client.patch(f"/api/gastown/towns/{town['id']}/config", json=BODY)
    assert answer.status_code == 202, answer.text
    assert answer.json()["reason"] == "sandbox_refused_key"
    assert (tmp_path / "town" / TOWN_FILE).read_bytes() == TOWN_SETTINGS


def test_daemon_back_after_an_outage_gets_what_it_missed(
    linked: Linked, daemon_factory: DaemonFactory
) -> None:
    """A change kept while the daemon was down reaches its files with the next change: the
    cloud pushes what takes the daemon from the generation it applied to the newest."""
    assert linked.daemon.stop() == 0
    assert json.loads(linked.file(TOWN_FILE))["role_effort"]["witness"] == "low"
    away = linked.patch({"town": {"role_effort": {"witness": "max"}}})
    assert away.status_code == 202, away.text
    back = daemon_factory(
        town_id=linked.town_id,
        cloud_url=linked.cloud.url,
        town_root=linked.daemon.town_root,
        env_file=linked.daemon.env_file,
        extra_env={
            "INTERNAL_API_KEY": linked.cloud.internal_key,
            "GASTOWN_SANDBOXD_LISTEN": linked.daemon.url.removeprefix("http://"),
        },
        name="back",
    )
    assert back.url == linked.daemon.url
    answer = linked.patch({"rigs": {"frontend": {"agent": "codex"}}})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["generation"], answer.json()["state"]) == (2, "applied")
    assert json.loads(linked.file(TOWN_FILE))["role_effort"] == {"mayor": "high", "witness": "max"}
    assert json.loads(linked.file(FRONTEND_FILE))["agent"] == "codex"
    config = linked.config()
    assert (config["generation"], config["observedGeneration"], config["state"]) == (
        2,
        2,
        "applied",
    )
    assert config["desired"] == {
        "town": {"role_effort": {"witness": "max"}},
        "rigs": {"frontend": {"agent": "codex"}},
    }
