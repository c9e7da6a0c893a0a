"""File modes of everything the daemon writes: env file 0600, socket 0660, settings files keep
theirs (new ones 0644, their new folder 0755), under a permissive umask too."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon.minting import mint
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess, make_town

from . import TOWN, local_daemon


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """The daemon inherits the umask of the test process while it starts."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_the_env_file_is_0600_after_every_write_even_when_it_was_0644(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A 0644 env file becomes 0600 at the first token written, and stays 0600 after each."""
    daemon = local_daemon(daemon_factory, tmp_path)
    daemon.env_file.chmod(0o644)
    with daemon.tcp() as client:
        for index in range(3):
            token = mint(time.time() - 10 * (index + 1), town_id=TOWN)
            assert client.put("/token", json={"token": token}).status_code == 200
            assert mode(daemon.env_file) == 0o600
            if index == 1:
                daemon.env_file.chmod(0o644)  # someone loosened it again


def test_an_env_file_created_by_the_first_refresh_is_0600(
    daemon_factory: DaemonFactory, cloud_factory: Callable[..., CloudServer], tmp_path: Path
) -> None:
    """With no env file at start, the refresh against the real cloud creates it 0600, even
    under umask 000 (a first token from the cloud needs key-only refresh allowed)."""
    cloud = cloud_factory(flags=["--allow-unbound-refresh"])
    town, _ = cloud.create_town(user_id="user-modes", name="modes")
    env_file = tmp_path / "home" / ".env.gateway"
    env_file.parent.mkdir()
    with umask(0):
        daemon = daemon_factory(
            town_id=town["id"],
            cloud_url=cloud.url,
            env_file=env_file,
            extra_env={"INTERNAL_API_KEY": cloud.internal_key},
        )
    daemon.wait_for_log("token_refreshed")
    assert mode(env_file) == 0o600


@pytest.mark.parametrize("mask", [0o022, 0o000, 0o077])
def test_the_socket_is_0660_whatever_the_umask(
    daemon_factory: DaemonFactory, tmp_path: Path, mask: int
) -> None:
    """The local socket is a socket with mode 0660 under any umask, and answers."""
    with umask(mask):
        daemon = local_daemon(daemon_factory, tmp_path)
    info = daemon.socket.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    with daemon.local() as client:
        assert client.get("/healthz").status_code == 200


def test_a_stale_socket_is_replaced_with_a_0660_one(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A socket left by a killed daemon (mode 0777) is replaced by a 0660 one."""
    first = local_daemon(daemon_factory, tmp_path)
    socket_path = first.socket
    first.process.kill()
    first.process.wait()
    socket_path.chmod(0o777)
    second = daemon_factory(
        town_id=TOWN,
        cloud_url="http://127.0.0.1:9",
        town_root=first.town_root,
        env_file=first.env_file,
        name="d0",
    )
    assert second.socket == socket_path
    assert mode(socket_path) == 0o660


@pytest.fixture
def modes_daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    """A town under umask 000 whose files have odd modes: the town file 0640, rig a's 0600,
    rig b's 0664; rig c has no settings folder yet."""
    town = make_town(tmp_path / "town", ("a", "b", "c"))
    for path, file_mode in [
        (town / "settings" / "config.json", 0o640),
        (town / "a" / "settings" / "config.json", 0o600),
        (town / "b" / "settings" / "config.json", 0o664),
    ]:
        path.parent.mkdir(exist_ok=True)
        kind = "town-settings" if path.parent.parent == town else "rig-settings"
        path.write_text(json.dumps({"type": kind, "version": 1}) + "\n")
        path.chmod(file_mode)
    env_file = tmp_path / "home" / ".env.gateway"
    env_file.parent.mkdir()
    env_file.write_text(f"KILO_JWT={mint(time.time(), town_id=TOWN)}\n")
    with umask(0):
        return daemon_factory(
            town_id=TOWN, cloud_url="http://127.0.0.1:9", town_root=town, env_file=env_file
        )


def test_settings_files_keep_their_mode_and_new_ones_are_0644(
    modes_daemon: DaemonProcess,
) -> None:
    """After PATCHes every existing file keeps its mode; the new rig file is 0644 in a new
    0755 folder, even though the daemon runs under umask 000."""
    town = modes_daemon.town_root
    body = {
        "town": {"default_agent": "codex"},
        "rigs": {name: {"agent": "claude"} for name in ("a", "b", "c")},
    }
    with modes_daemon.tcp() as client:
        answer = client.patch("/config", json=body)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["files"]) == 4
        second = {"town": {"role_effort": {"mayor": "high"}}, "rigs": {"c": {"agent": "codex"}}}
        assert client.patch("/config", json=second).status_code == 200
    assert mode(town / "settings" / "config.json") == 0o640
    assert mode(town / "a" / "settings" / "config.json") == 0o600
    assert mode(town / "b" / "settings" / "config.json") == 0o664
    assert mode(town / "c" / "settings" / "config.json") == 0o644
    assert mode(town / "c" / "settings") == 0o755
    leftovers = [path for path in town.rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []
