"""Traversal and symlink attacks on every path the daemon writes.

A sentinel folder outside the town root and the env file folder is snapshotted before and
after each attack: the daemon must never write outside them, whatever the PATCH names or the
town's folders hold. The env file is the one path where a symlink is followed: it is the
operator's (only the daemon's own user can put one there, and that user can write the file
itself), and writing at it replaced it, so the file it led to kept the old token; the token
e2e suite shows it written where it leads, the link kept.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gastown_sandboxd.atomic import write_atomic
from tests.daemon.minting import mint
from tests.fixtures.daemon import DaemonFactory, DaemonProcess

from . import TOWN, local_daemon, shared_daemon

OUTSIDE_JSON = {"type": "rig-settings", "version": 1, "agent": "claude", "secret": "outside"}
AGENT_PATCH = {"agent": "codex"}

Snapshot = dict[str, tuple[str, bytes, int]]


def snapshot(folder: Path) -> Snapshot:
    """Every entry under `folder`: its kind, bytes (or link target) and mode, by lstat."""
    entries: Snapshot = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        name = str(path.relative_to(folder))
        if stat.S_ISLNK(info.st_mode):
            entries[name] = ("link", os.readlink(path).encode(), 0)
        elif stat.S_ISDIR(info.st_mode):
            entries[name] = ("dir", b"", stat.S_IMODE(info.st_mode))
        else:
            entries[name] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
    return entries


def make_outside(folder: Path) -> Path:
    """The sentinel: a folder beside the town with a settings-like file and a sub-folder."""
    (folder / "settings").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(OUTSIDE_JSON, indent=2) + "\n")
    (folder / "settings" / "config.json").write_text(json.dumps(OUTSIDE_JSON) + "\n")
    (folder / "passwd").write_text("root:x:0:0\n")
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    return make_outside(tmp_path / "outside")


@pytest.fixture(scope="module")
def names_daemon(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DaemonProcess, Path]]:
    """One daemon for the rig-name cases (each is refused, so none changes the town)."""
    workdir = tmp_path_factory.mktemp("names")
    with shared_daemon(workdir, rigs=("r1",)) as daemon:
        yield daemon, make_outside(workdir / "outside")


@pytest.fixture
def daemon(daemon_factory: DaemonFactory, tmp_path: Path, outside: Path) -> DaemonProcess:
    """A town with one plain rig `r1` and the sentinel beside it."""
    return local_daemon(daemon_factory, tmp_path, rigs=("r1",))


def patch(daemon: DaemonProcess, body: object) -> httpx.Response:
    with daemon.tcp() as client:
        return client.patch("/config", json=body)


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "/etc",
        "/",
        "../outside",
        "%2e%2e",
        "%2e%2e%2foutside",
        "rig/../..",
        "r1/../../outside",
        "r1/..",
        "..\\..\\outside",
        "\uff0e\uff0e",  # fullwidth full stops
        "\u2025",  # two dot leader
        "\u2215etc",  # division slash
        "r\u0031\u200b",  # r1 with a zero-width space
        "\u0440" + "1",  # Cyrillic er, then 1: looks like r1
        "r1\x00",
        "r1 ",
        "settings",
        "mayor",
        "hq",
        ".hidden",
        "outside",
        "a" * 5000,
    ],
)
def test_a_rig_name_that_leads_anywhere_else_is_refused(
    names_daemon: tuple[DaemonProcess, Path], name: str
) -> None:
    """Traversal, absolute, encoded, look-alike and reserved rig names: 422, nothing written
    in the town or outside it."""
    daemon, outside = names_daemon
    town_before, outside_before = snapshot(daemon.town_root), snapshot(outside)
    answer = patch(daemon, {"rigs": {name: AGENT_PATCH}})
    assert answer.status_code == 422, answer.text
    assert answer.json()["details"], answer.text
    assert snapshot(daemon.town_root) == town_before
    assert snapshot(outside) == outside_before
    assert daemon.process.poll() is None


def plant(daemon: DaemonProcess, outside: Path, how: str) -> None:
    """Make rig `evil` (or the town's own settings) lead outside, in one of several ways."""
    town = daemon.town_root
    if how == "rig folder is a symlink":
        (town / "evil").symlink_to(outside, target_is_directory=True)
    elif how == "settings folder is a symlink":
        (town / "evil").mkdir()
        (town / "evil" / "settings").symlink_to(outside / "settings", target_is_directory=True)
    elif how == "settings file is a symlink":
        (town / "evil" / "settings").mkdir(parents=True)
        (town / "evil" / "settings" / "config.json").symlink_to(outside / "config.json")
    elif how == "settings file is a relative symlink":
        (town / "evil" / "settings").mkdir(parents=True)
        target = Path("..", "..", "..", "outside", "config.json")
        (town / "evil" / "settings" / "config.json").symlink_to(target)
    elif how == "settings folder is a symlink to another rig":
        (town / "evil").mkdir()
        (town / "evil" / "settings").symlink_to(town / "r1", target_is_directory=True)
    else:
        raise AssertionError(how)


SYMLINK_CASES = [
    "rig folder is a symlink",
    "settings folder is a symlink",
    "settings file is a symlink",
    "settings file is a relative symlink",
    "settings folder is a symlink to another rig",
]


@pytest.mark.parametrize("how", SYMLINK_CASES)
def test_a_rig_whose_folders_lead_outside_is_not_a_rig(
    daemon: DaemonProcess, outside: Path, how: str
) -> None:
    """A rig folder, settings folder or settings file that is a symlink: not a rig (422 on
    PATCH, absent from GET /config), and the target is never written or read into answers."""
    plant(daemon, outside, how)
    town_before, outside_before = snapshot(daemon.town_root), snapshot(outside)
    answer = patch(daemon, {"rigs": {"evil": AGENT_PATCH}})
    assert answer.status_code == 422, answer.text
    assert answer.json()["details"][0]["path"] == "/rigs/evil"
    with daemon.tcp() as client:
        view = client.get("/config")
    assert view.status_code == 200
    assert "evil" not in view.json()["rigs"]
    assert "outside" not in view.text
    # A PATCH of the town and every real rig still works and stays inside.
    answer = patch(daemon, {"town": {"default_agent": "codex"}, "rigs": {"r1": AGENT_PATCH}})
    assert answer.status_code == 200, answer.text
    assert sorted(answer.json()["files"]) == ["r1/settings/config.json", "settings/config.json"]
    assert snapshot(outside) == outside_before
    changed = set(snapshot(daemon.town_root)) - set(town_before)
    assert changed == {"r1/settings", "r1/settings/config.json", "settings/config.json"}


@pytest.mark.parametrize("how", ["file", "folder"])
def test_the_town_settings_leading_outside_are_never_written_through(
    daemon: DaemonProcess, outside: Path, how: str
) -> None:
    """A town settings file (or folder) that is a symlink to outside: the PATCH is refused
    with 409 and nothing outside changes."""
    settings = daemon.town_root / "settings"
    if how == "file":
        (settings / "config.json").symlink_to(outside / "config.json")
    else:
        settings.rmdir()
        settings.symlink_to(outside / "settings", target_is_directory=True)
    outside_before = snapshot(outside)
    answer = patch(daemon, {"town": {"default_agent": "codex"}})
    assert answer.status_code == 409, answer.text
    assert snapshot(outside) == outside_before


def test_planted_symlinks_at_temporary_names_are_never_followed(
    daemon: DaemonProcess, outside: Path
) -> None:
    """Symlinks planted at many names a temporary file could take, in the env file folder and
    a settings folder, are never written through: token pushes and PATCHes land in place."""
    folders = {daemon.env_file.parent: daemon.env_file.name, daemon.town_root / "settings": ""}
    folders[daemon.town_root / "settings"] = "config.json"
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_"
    for folder, name in folders.items():
        for first in alphabet:
            for second in alphabet[:10]:
                link = folder / f".{name}.{first}{second}tmpname.tmp"
                link.symlink_to(outside / "passwd")
                (folder / f".{name}.{first}{second}.old.tmp").symlink_to(outside / "passwd")
    outside_before = snapshot(outside)
    tokens = [mint(time.time() - 10 * (index + 1), town_id=TOWN) for index in range(3)]
    with daemon.tcp() as client:
        for index, token in enumerate(tokens):
            assert client.put("/token", json={"token": token}).status_code == 200
            body = {"town": {"role_effort": {"mayor": ["low", "medium", "high"][index]}}}
            assert client.patch("/config", json=body).status_code == 200
    assert snapshot(outside) == outside_before
    assert not daemon.env_file.is_symlink()
    assert f"KILO_JWT={tokens[-1]}\n" in daemon.env_file.read_text()
    town_file = daemon.town_root / "settings" / "config.json"
    assert not town_file.is_symlink()
    assert json.loads(town_file.read_text())["role_effort"] == {"mayor": "high"}


def test_a_town_settings_folder_leading_outside_is_never_written_through(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """The town's settings folder as a symlink to an empty folder outside: the PATCH is
    refused with 409 naming the file, and nothing is created outside."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings = daemon.town_root / "settings"
    settings.rmdir()
    settings.symlink_to(elsewhere, target_is_directory=True)
    answer = patch(daemon, {"town": {"default_agent": "codex"}})
    assert answer.status_code == 409, answer.text
    assert "settings/config.json" in answer.json()["message"]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("mode", [None, 0o600])
def test_the_writer_steps_over_a_symlink_at_the_exact_temporary_name(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, mode: int | None
) -> None:
    """When the first temporary name the writer draws is a planted symlink, it takes the next
    name (O_EXCL) and leaves the link and its target alone."""
    folder = tmp_path / "home"
    folder.mkdir()
    target = folder / ".env.gateway"
    target.write_text("KILO_JWT=old\n")
    planted = folder / ".env.gateway.planted.tmp"
    planted.symlink_to(outside / "passwd")
    # tempfile draws names from this sequence: the planted one comes first.
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["planted", "fresh"]))
    outside_before = snapshot(outside)
    write_atomic(target, b"KILO_JWT=new\n", mode=mode)
    assert target.read_bytes() == b"KILO_JWT=new\n"
    assert planted.is_symlink()
    assert snapshot(outside) == outside_before
