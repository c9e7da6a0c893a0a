"""Model configuration (CONTRACT §4 PATCH /config) over real HTTP against a daemon subprocess.

The merge and validation rules are unit-tested in tests/daemon; here every status code is
seen on the wire, on both listeners, with the files on disk and the events as the proof.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gastown_sandboxd.gtsettings.patch import RIG_KEYS, TOWN_KEYS
from tests.daemon.gt_samples import (
    BACKEND_FILE,
    FRONTEND_FILE,
    RIG_SETTINGS,
    TOWN_FILE,
    TOWN_SETTINGS,
    WRAPPER,
    members,
    pairs,
    tree,
    unmanaged,
)
from tests.daemon.minting import mint
from tests.fixtures.daemon import DaemonFactory, DaemonProcess

from .gt_town import TOWN_ID, read_events, start_config_daemon

LIMIT = 64 * 1024
AGENT = {
    "provider": "claude",
    "command": "claude",
    "args": ["--model", "anthropic/claude-sonnet-4.5"],
    "env": {"ANTHROPIC_BASE_URL": "https://api.kilo.ai/api/gateway"},
}


@pytest.fixture
def daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    """A daemon serving the realistic town (town file, rig frontend with a file, rig backend)."""
    return start_config_daemon(daemon_factory, tmp_path)


def read(daemon: DaemonProcess, relative: str) -> bytes:
    return (daemon.town_root / relative).read_bytes()


def stamp(daemon: DaemonProcess, relative: str) -> tuple[bytes, int]:
    path = daemon.town_root / relative
    return path.read_bytes(), path.stat().st_mtime_ns


def error_of(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The JSON error body after checking status, code and the contract's error shape."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = answer.json()
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["details"], list)
    return body


def last_event_id(daemon: DaemonProcess) -> int:
    """The id of the newest event: a PATCH that changes something and its event are the marker."""
    with daemon.local() as client:
        marker = {"town": {"crew_agents": {"marker": "claude"}}}
        assert client.patch("/config", json=marker).json()["changed"] is True
        cleanup = {"town": {"crew_agents": {"marker": None}}}
        assert client.patch("/config", json=cleanup).json()["changed"] is True
    events = read_events(daemon, after=0, count=2)
    assert [event["keys"] for event in events[-2:]] == [["crew_agents"], ["crew_agents"]]
    return int(events[-1]["id"])


# GET /config and the listeners


def test_get_config_answers_the_managed_view_with_revision_and_etag(daemon: DaemonProcess) -> None:
    """GET /config lists the town and each rig with a file, managed keys only, and an ETag."""
    with daemon.local() as client:
        answer = client.get("/config")
    assert answer.status_code == 200
    body = answer.json()
    assert answer.headers["etag"] == f'"{body["revision"]}"'
    assert list(body["town"]) == ["default_agent", "agents", "role_agents", "role_effort"]
    assert body["town"]["agents"]["codex-default"]["args"] is None
    assert body["town"]["agents"]["opencode-bare"]["args"] == []
    assert "session" in body["town"]["agents"]["claude-haiku"]
    assert body["rigs"] == {"frontend": {"agent": "claude", "role_agents": {"polecat": "codex"}}}
    assert "cost_tier" not in body["town"]


def test_tcp_needs_the_key_and_the_socket_does_not(daemon: DaemonProcess) -> None:
    """On TCP a missing or wrong key is 401 without detail; the key or the socket is let in."""
    body = {"town": {"role_agents": {"mayor": "claude-haiku"}}}
    with httpx.Client(base_url=daemon.url, timeout=10) as bare:
        for headers in ({}, {"x-internal-api-key": "wrong-key-wrong-key-wrong"}):
            for answer in (
                bare.get("/config", headers=headers),
                bare.patch("/config", json=body, headers=headers),
            ):
                error = error_of(answer, 401, "unauthorized")
                assert daemon.key not in answer.text
                assert error["details"] == []
        assert bare.get("/healthz").status_code == 200
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS
    with daemon.tcp() as tcp:
        answer = tcp.patch("/config", json=body)
        assert answer.status_code == 200
        assert answer.json()["town"]["role_agents"]["mayor"] == "claude-haiku"
        socket_view = daemon.local().get("/config").json()
        assert tcp.get("/config").json() == socket_view


# 200


def test_patch_changes_files_and_answers_the_new_view(daemon: DaemonProcess) -> None:
    """A PATCH of town and rigs answers changed, the files written, the view and its ETag."""
    body = {
        "town": {
            "default_agent": "kilo-sonnet",
            "agents": {"kilo-sonnet": AGENT},
            "role_agents": {"mayor": "kilo-sonnet", "polecat": None},
            "role_effort": {"mayor": "max"},
            "crew_agents": {"alice": "codex"},
        },
        "rigs": {
            "frontend": {"role_agents": {"polecat": "kilo-sonnet"}},
            "backend": {"agent": "kilo-sonnet", "role_effort": {"witness": "low"}},
        },
    }
    with daemon.local() as client:
        before = client.get("/config").json()["revision"]
        answer = client.patch("/config", json=body)
        after = client.get("/config")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["changed"] is True
    assert result["files"] == [TOWN_FILE, FRONTEND_FILE, BACKEND_FILE]
    assert result["revision"] != before
    assert answer.headers["etag"] == f'"{result["revision"]}"' == after.headers["etag"]
    assert {k: result[k] for k in ("town", "rigs", "revision")} == after.json()
    assert result["town"]["role_agents"] == {"mayor": "kilo-sonnet", "witness": "claude-haiku"}
    assert result["town"]["crew_agents"] == {"alice": "codex"}
    town = json.loads(read(daemon, TOWN_FILE))
    assert town["default_agent"] == "kilo-sonnet"
    assert town["agents"]["kilo-sonnet"] == AGENT  # no default exec_wrapper: shims wrap agents
    backend = pairs(read(daemon, BACKEND_FILE))
    assert backend[:2] == [("type", "rig-settings"), ("version", 1)]
    assert json.loads(read(daemon, FRONTEND_FILE))["role_agents"] == {"polecat": "kilo-sonnet"}


def test_patch_keeps_every_unmanaged_key_and_the_format(daemon: DaemonProcess) -> None:
    """After a PATCH gt's own keys keep value, order and bytes; output stays two-space JSON."""
    body = {
        "town": {
            "agents": {"kilo-sonnet": AGENT, "codex-default": {"args": ["--full-auto"]}},
            "role_agents": {"polecat": "kilo-sonnet"},
        },
        "rigs": {"frontend": {"role_agents": {"polecat": "kilo-sonnet", "witness": "codex"}}},
    }
    with daemon.local() as client:
        assert client.patch("/config", json=body).status_code == 200
    town, rig = read(daemon, TOWN_FILE), read(daemon, FRONTEND_FILE)
    assert unmanaged(town, TOWN_KEYS) == unmanaged(TOWN_SETTINGS, TOWN_KEYS)
    assert unmanaged(rig, RIG_KEYS) == unmanaged(RIG_SETTINGS, RIG_KEYS)
    assert [key for key, _ in pairs(town)] == [key for key, _ in pairs(TOWN_SETTINGS)]
    old_members, new_members = members(TOWN_SETTINGS), members(town)
    for key in ("_comment", "cost_tier", "scheduler", "_comment_scheduler"):
        assert new_members[key] == old_members[key]  # byte for byte, 1e-7 and 2.50 included
    for key in ("merge_queue", "namepool", "theme"):
        assert members(rig)[key] == members(RIG_SETTINGS)[key]
    for text in (town, rig):
        assert text.startswith(b'{\n  "type": ')
        assert text.endswith(b"}\n")
        assert b"\t" not in text
    agents = json.loads(town)["agents"]
    assert "exec_wrapper" not in agents["kilo-sonnet"]
    assert agents["claude-haiku"]["session"]["session_id_env"] == "CLAUDE_SESSION_ID"
    assert agents["codex-default"] == {
        "provider": "codex",
        "command": "codex",
        "args": ["--full-auto"],
        "prompt_mode": "none",
    }  # an existing agent gets no exec_wrapper it did not have


def test_existing_exec_wrapper_is_kept_and_a_set_one_wins(daemon: DaemonProcess) -> None:
    """Changing an agent keeps its exec_wrapper; a body's exec_wrapper replaces it."""
    body: dict[str, Any] = {"town": {"agents": {"claude-haiku": {"args": ["--model", "opus"]}}}}
    with daemon.local() as client:
        assert client.patch("/config", json=body).status_code == 200
        haiku = json.loads(read(daemon, TOWN_FILE))["agents"]["claude-haiku"]
        assert haiku["exec_wrapper"] == WRAPPER
        assert haiku["args"] == ["--model", "opus"]
        own = ["/usr/local/bin/wrap", "--"]
        new = {"town": {"agents": {"mine": {**AGENT, "exec_wrapper": own}}}}
        assert client.patch("/config", json=new).status_code == 200
    assert json.loads(read(daemon, TOWN_FILE))["agents"]["mine"]["exec_wrapper"] == own


def test_patch_that_changes_nothing_writes_and_emits_nothing(daemon: DaemonProcess) -> None:
    """A no-op PATCH answers changed false with no files, touches no file, emits no event."""
    after = last_event_id(daemon)
    town, rig = stamp(daemon, TOWN_FILE), stamp(daemon, FRONTEND_FILE)
    same = {
        "town": {"role_agents": {"mayor": "claude", "dog": None}, "role_effort": {"mayor": "high"}},
        "rigs": {"frontend": {"agent": "claude", "role_agents": {"polecat": "codex"}}},
    }
    with daemon.local() as client:
        revision = client.get("/config").json()["revision"]
        answer = client.patch("/config", json=same)
        assert answer.status_code == 200
        assert answer.json()["changed"] is False
        assert answer.json()["files"] == []
        assert answer.json()["revision"] == revision
        assert answer.headers["etag"] == f'"{revision}"'
        assert stamp(daemon, TOWN_FILE) == town
        assert stamp(daemon, FRONTEND_FILE) == rig
        assert not (daemon.town_root / BACKEND_FILE).exists()
        changed = {"rigs": {"frontend": {"role_effort": {"refinery": "medium"}}}}
        assert client.patch("/config", json=changed).json()["changed"] is True
    # The next event after the marker is the later PATCH's: the no-op emitted none.
    (event,) = read_events(daemon, after=after, count=1)
    assert event["file"] == FRONTEND_FILE
    assert event["keys"] == ["role_effort"]


def test_each_written_file_gets_one_api_event(daemon: DaemonProcess) -> None:
    """A PATCH of two files emits one config.changed per file, source api, with its keys."""
    after = last_event_id(daemon)
    body = {
        "town": {"role_effort": {"deacon": "low"}},
        "rigs": {"backend": {"worker_agents": {"toast": "codex"}}},
    }
    with daemon.local() as client:
        result = client.patch("/config", json=body).json()
    events = read_events(daemon, after=after, count=2)
    assert [(e["type"], e["source"], e["file"]) for e in events] == [
        ("config.changed", "api", TOWN_FILE),
        ("config.changed", "api", BACKEND_FILE),
    ]
    assert events[0]["scope"] == "town"
    assert events[0]["rig"] is None
    assert events[0]["keys"] == ["role_effort"]
    assert (events[1]["scope"], events[1]["rig"]) == ("rig", "backend")
    assert events[1]["keys"] == ["type", "version", "worker_agents"]
    assert {e["revision"] for e in events} == {result["revision"]}
    assert all(e["time"].endswith("Z") for e in events)


# 400, 413, 415


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"", "empty"),
        (b'["town"]', "an array"),
        (b'"town"', "a string"),
        (b"null", "null"),
    ],
)
def test_body_that_is_not_a_json_object_is_400(
    daemon: DaemonProcess, content: bytes, why: str
) -> None:
    """Bodies that are not JSON or not an object get 400 invalid_json and change nothing."""
    with daemon.local() as client:
        answer = client.patch(
            "/config", content=content, headers={"content-type": "application/json"}
        )
    error_of(answer, 400, "invalid_json")
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS, why


def test_body_over_64_kib_is_413_with_or_without_content_length(daemon: DaemonProcess) -> None:
    """64 KiB + 1 is refused as 413 whether its length is declared or it arrives chunked."""
    filler = "x" * LIMIT
    big = json.dumps({"town": {"crew_agents": {"a": filler}}}).encode()[: LIMIT + 1]
    assert len(big) == LIMIT + 1

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    headers = {"content-type": "application/json"}
    with daemon.local() as client, daemon.tcp() as tcp:
        declared = client.patch("/config", content=big, headers=headers)
        streamed = client.patch("/config", content=chunks(), headers=headers)
        over_tcp = tcp.patch("/config", content=chunks(), headers=headers)
        exactly = client.patch("/config", content=b" " * (LIMIT - 2) + b"{}", headers=headers)
    assert "content-length" in declared.request.headers
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in streamed.request.headers
    for answer in (declared, streamed, over_tcp):
        error_of(answer, 413, "body_too_large")
    assert exactly.status_code == 200  # the limit itself is allowed
    assert exactly.json()["changed"] is False
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS


def test_content_type_must_be_json_or_merge_patch(daemon: DaemonProcess) -> None:
    """text/plain and a missing content type get 415; merge-patch+json with charset is applied."""
    body = json.dumps({"town": {"role_effort": {"boot": "low"}}}).encode()
    with daemon.local() as client:
        plain = client.patch("/config", content=body, headers={"content-type": "text/plain"})
        missing = client.patch("/config", content=body)
        assert "content-type" not in missing.request.headers
        error_of(plain, 415, "unsupported_media_type")
        error_of(missing, 415, "unsupported_media_type")
        assert read(daemon, TOWN_FILE) == TOWN_SETTINGS
        merge = "application/merge-patch+json; charset=utf-8"
        answer = client.patch("/config", content=body, headers={"content-type": merge})
    assert answer.status_code == 200
    assert answer.json()["town"]["role_effort"]["boot"] == "low"


# 412


def test_if_match_takes_the_revision_quoted_or_bare_and_refuses_a_stale_one(
    daemon: DaemonProcess,
) -> None:
    """If-Match equal to the revision (quoted or bare) applies; a stale one is 412, unwritten."""
    with daemon.local() as client:
        etag = client.get("/config").headers["etag"]
        first = {"town": {"role_agents": {"dog": "codex"}}}
        quoted = client.patch("/config", json=first, headers={"if-match": etag})
        assert quoted.status_code == 200, quoted.text
        bare_tag = quoted.json()["revision"]
        second = {"town": {"role_agents": {"boot": "codex"}}}
        bare = client.patch("/config", json=second, headers={"if-match": bare_tag})
        assert bare.status_code == 200, bare.text
        written = read(daemon, TOWN_FILE)
        stale_body = {"town": {"role_agents": {"deacon": "codex"}}}
        for stale in (etag, bare_tag, '"0000"', 'W/"' + bare.json()["revision"] + '"'):
            answer = client.patch("/config", json=stale_body, headers={"if-match": stale})
            error = error_of(answer, 412, "precondition_failed")
            assert bare.json()["revision"] in error["message"]
        assert read(daemon, TOWN_FILE) == written
        assert "deacon" not in client.get("/config").json()["town"]["role_agents"]


# 409


def test_unreadable_town_file_is_409_and_left_untouched(daemon: DaemonProcess) -> None:
    """A town file that is not JSON makes GET and every PATCH 409; its bytes stay as they are."""
    broken = b'{"type": "town-settings", "version": 1, "agents": {'
    (daemon.town_root / TOWN_FILE).write_bytes(broken)
    with daemon.local() as client:
        got = client.get("/config")
        patched = client.patch("/config", json={"town": {"role_effort": {"mayor": "low"}}})
        via_rig = client.patch("/config", json={"rigs": {"frontend": {"agent": "codex"}}})
    for answer in (got, patched, via_rig):
        error = error_of(answer, 409, "settings_file_unreadable")
        assert error["details"][0]["path"] == "/town"
    assert read(daemon, TOWN_FILE) == broken
    assert read(daemon, FRONTEND_FILE) == RIG_SETTINGS


def test_newer_rig_file_is_409_and_other_rigs_still_work(daemon: DaemonProcess) -> None:
    """A `version: 2` rig file is never overwritten (409); a PATCH not reading it applies."""
    newer = RIG_SETTINGS.replace(b'"version": 1', b'"version": 2')
    (daemon.town_root / FRONTEND_FILE).write_bytes(newer)
    with daemon.local() as client:
        answer = client.patch("/config", json={"rigs": {"frontend": {"agent": "codex"}}})
        error = error_of(answer, 409, "settings_file_unreadable")
        assert error["details"][0]["path"] == "/rigs/frontend"
        assert "version" in error["details"][0]["message"]
        assert read(daemon, FRONTEND_FILE) == newer
        other = client.patch("/config", json={"rigs": {"backend": {"agent": "codex"}}})
    assert other.status_code == 200, other.text
    assert other.json()["files"] == [BACKEND_FILE]
    assert read(daemon, FRONTEND_FILE) == newer


# 422


def test_invalid_patch_is_422_with_every_problem_at_its_pointer(daemon: DaemonProcess) -> None:
    """One 422 lists each problem with a JSON pointer, and nothing is written."""
    body = {
        "town": {
            "role_agents": {"majer": "claude"},
            "role_effort": {"mayor": "extreme"},
            "crew_agents": {"bob": "no-such-agent"},
            "agents": {"bad": {"command": "x", "tmux": {"a": 1}, "env": {"lower": "v"}}},
            "cost_tier": "premium",
        },
        "rigs": {"frontend": {"role_agents": {"polecat": "ghost"}, "merge_queue": {}}},
        "extra": True,
    }
    with daemon.local() as client:
        answer = client.patch("/config", json=body)
    error = error_of(answer, 422, "invalid_patch")
    paths = {detail["path"] for detail in error["details"]}
    assert {
        "/town/role_agents/majer",
        "/town/role_effort/mayor",
        "/town/crew_agents/bob",
        "/town/agents/bad/tmux",
        "/town/agents/bad/env/lower",
        "/town/cost_tier",
        "/rigs/frontend/role_agents/polecat",
        "/rigs/frontend/merge_queue",
        "/extra",
    } <= paths
    assert all(detail["message"] for detail in error["details"])
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS
    assert read(daemon, FRONTEND_FILE) == RIG_SETTINGS


def test_secrets_in_agent_env_are_refused_without_echoing_them(daemon: DaemonProcess) -> None:
    """A JWT value or a literal ANTHROPIC_API_KEY in env is 422, and the body does not echo it."""
    jwt_value = mint(time.time(), town_id=TOWN_ID)
    literal = "sk-ant-api03-" + "a" * 40
    env = {"GATEWAY_TOKEN": jwt_value, "ANTHROPIC_API_KEY": literal, "OK_NAME": "fine"}
    body = {"town": {"agents": {"leaky": {**AGENT, "env": env}}}}
    with daemon.tcp() as tcp:
        answer = tcp.patch("/config", json=body)
    error = error_of(answer, 422, "invalid_patch")
    paths = {detail["path"] for detail in error["details"]}
    assert paths == {
        "/town/agents/leaky/env/GATEWAY_TOKEN",
        "/town/agents/leaky/env/ANTHROPIC_API_KEY",
    }
    assert jwt_value not in answer.text
    assert literal not in answer.text
    assert jwt_value not in daemon.log_text()
    assert literal not in daemon.log_text()
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS


@pytest.mark.parametrize("rig", ["..", "%2e%2e", "../outside", "hq", "HQ", "outlink", ".hidden"])
def test_rigs_that_escape_or_are_not_rigs_are_422_and_write_nothing(
    daemon: DaemonProcess, tmp_path: Path, rig: str
) -> None:
    """Traversal names, the reserved hq and a symlink out of the town root are 422; no writes."""
    outside = tmp_path / "outside"
    (outside / "settings").mkdir(parents=True)
    (outside / "settings" / "config.json").write_bytes(RIG_SETTINGS)
    (daemon.town_root / "outlink").symlink_to(outside, target_is_directory=True)
    (daemon.town_root / ".hidden").mkdir()
    before_town, before_out = tree(daemon.town_root), tree(tmp_path / "outside")
    with daemon.local() as client:
        answer = client.patch("/config", json={"rigs": {rig: {"agent": "codex"}}})
        listed = client.get("/config").json()["rigs"]
    error = error_of(answer, 422, "invalid_patch")
    assert [detail["path"] for detail in error["details"]] == ["/rigs/" + rig.replace("/", "~1")]
    assert tree(daemon.town_root) == before_town
    assert tree(tmp_path / "outside") == before_out
    assert not (tmp_path / "settings").exists()
    assert set(listed) == {"frontend"}


# 503


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Folders made immutable with chattr +i (which binds root too), made mutable at teardown."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        subprocess.run(["chattr", "-i", str(folder)], check=False, capture_output=True)


def test_disk_refusal_is_503_and_every_file_stays_as_it_was(
    daemon: DaemonProcess, immutable: list[Path]
) -> None:
    """The rig folder refuses the write after the town file was written: 503, both restored."""
    folder = daemon.town_root / "frontend" / "settings"
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    done = subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.decode().strip()}")
    immutable.append(folder)
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        pass
    else:
        probe.unlink()
        pytest.skip("an immutable folder still takes new files here")
    after = last_event_id(daemon)
    town, rig = stamp(daemon, TOWN_FILE), stamp(daemon, FRONTEND_FILE)
    body = {
        "town": {"role_effort": {"mayor": "low"}},
        "rigs": {"frontend": {"agent": "codex"}},
    }
    with daemon.local() as client:
        answer = client.patch("/config", json=body)
        error = error_of(answer, 503, "storage_unavailable")
        assert FRONTEND_FILE in error["message"]
        assert "EPERM" in error["message"]
        assert "left as it was" in error["message"]
        assert read(daemon, TOWN_FILE) == town[0]
        assert read(daemon, FRONTEND_FILE) == rig[0]
        assert sorted(os.listdir(daemon.town_root / "settings")) == ["config.json"]
        assert client.get("/config").json()["town"]["role_effort"]["mayor"] == "high"
        subprocess.run(["chattr", "-i", str(folder)], check=True)
        again = client.patch("/config", json=body)
    assert again.status_code == 200, again.text
    events = read_events(daemon, after=after, count=2)
    assert [event["file"] for event in events] == [TOWN_FILE, FRONTEND_FILE]
    assert {event["revision"] for event in events} == {again.json()["revision"]}


# Concurrency


async def test_hundred_concurrent_patches_all_land(daemon: DaemonProcess) -> None:
    """100 PATCHes from 10 concurrent clients, each naming its own crew or worker, all land."""
    statuses: list[int] = []

    async def worker(index: int) -> None:
        transport = httpx.AsyncHTTPTransport(uds=str(daemon.socket))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sandboxd", timeout=30
        ) as client:
            for n in range(10):
                name = f"c{index}x{n}"
                if n % 2:
                    body: dict[str, Any] = {"town": {"crew_agents": {name: "codex"}}}
                else:
                    body = {"rigs": {"frontend": {"worker_agents": {name: "claude"}}}}
                answer = await client.patch("/config", json=body)
                statuses.append(answer.status_code)

    async with anyio.create_task_group() as tg:
        for index in range(10):
            tg.start_soon(worker, index)
    assert statuses == [200] * 100
    town = json.loads(read(daemon, TOWN_FILE))
    rig = json.loads(read(daemon, FRONTEND_FILE))
    assert set(town["crew_agents"]) == {f"c{i}x{n}" for i in range(10) for n in (1, 3, 5, 7, 9)}
    assert set(rig["worker_agents"]) == {f"c{i}x{n}" for i in range(10) for n in (0, 2, 4, 6, 8)}
    assert unmanaged(read(daemon, TOWN_FILE), TOWN_KEYS) == unmanaged(TOWN_SETTINGS, TOWN_KEYS)


async def test_concurrent_writers_with_if_match_one_wins(daemon: DaemonProcess) -> None:
    """Ten writers holding the same ETag: one 200, nine 412, and only the winner's change."""
    answers: dict[str, int] = {}
    transport = httpx.AsyncHTTPTransport(uds=str(daemon.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandboxd") as reader:
        etag = (await reader.get("/config")).headers["etag"]

    async def writer(index: int) -> None:
        transport = httpx.AsyncHTTPTransport(uds=str(daemon.socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://sandboxd") as client:
            body = {"town": {"crew_agents": {f"w{index}": "codex"}}}
            answer = await client.patch("/config", json=body, headers={"if-match": etag})
            answers[f"w{index}"] = answer.status_code

    async with anyio.create_task_group() as tg:
        for index in range(10):
            tg.start_soon(writer, index)
    winners = [name for name, status in answers.items() if status == 200]
    assert len(winners) == 1
    assert sorted(answers.values()) == [200] + [412] * 9
    assert json.loads(read(daemon, TOWN_FILE))["crew_agents"] == {winners[0]: "codex"}


def test_daemon_writes_nothing_at_start(daemon: DaemonProcess) -> None:
    """Starting the daemon on a town leaves gt's files byte for byte (no rewrite on load)."""
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS
    assert read(daemon, FRONTEND_FILE) == RIG_SETTINGS
    assert not (daemon.town_root / BACKEND_FILE).exists()
    with daemon.local() as client:
        status = client.get("/status").json()
    assert status["town_id"] == TOWN_ID
    assert status["config_revision"] == client_revision(daemon)


def client_revision(daemon: DaemonProcess) -> str:
    with daemon.local() as client:
        revision: str = client.get("/config").json()["revision"]
    return revision
