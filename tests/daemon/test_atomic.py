"""The one writer of files: old-or-new for readers, modes, the in-place fallback, failures."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from gastown_sandboxd.atomic import make_durable, write_atomic
from gastown_sandboxd.errors import AtomicWriteError
from tests.fixtures.fsyncs import record_fsyncs


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refuse_with(code: int) -> Callable[..., None]:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))

    return refuse


def test_writes_new_file_with_default_mode(tmp_path: Path) -> None:
    """A new file gets the data, mode 0644 and no leftovers."""
    path = tmp_path / "f"
    assert write_atomic(path, b"data") is False
    assert path.read_bytes() == b"data"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert entries(tmp_path) == ["f"]


def test_mode_0600_is_applied(tmp_path: Path) -> None:
    """mode=0o600 makes the file private, also when it existed as 0644."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_atomic(path, b"new", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"new"


def test_existing_mode_is_kept(tmp_path: Path) -> None:
    """mode=None keeps the mode the file had."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o640)
    write_atomic(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_file_is_replaced_not_rewritten(tmp_path: Path) -> None:
    """The new version is a new inode: a reader holding the old one keeps reading it whole."""
    path = tmp_path / "f"
    path.write_bytes(b"old version")
    with path.open("rb") as held:
        write_atomic(path, b"new version")
        assert held.read() == b"old version"
    assert path.read_bytes() == b"new version"


def test_concurrent_reader_sees_old_or_new_only(tmp_path: Path) -> None:
    """A reader racing many writes only ever sees one whole version."""
    path = tmp_path / "f"
    versions = [b"A" * 10_000, b"B" * 3, b"C" * 70_000]
    path.write_bytes(versions[0])
    seen: set[bytes] = set()
    stop = threading.Event()
    bad: list[int] = []

    def read() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            if data not in versions:
                bad.append(len(data))
            seen.add(data[:1])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(150):
            write_atomic(path, versions[i % 3])
    finally:
        stop.set()
        reader.join()
    assert bad == []
    assert len(seen) >= 2
    assert entries(tmp_path) == ["f"]


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EBUSY])
def test_bind_mounted_target_falls_back_to_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """EXDEV/EBUSY from rename rewrites the file in place, logs it and leaves no temp file."""
    path = tmp_path / "f"
    path.write_bytes(b"a much longer old version")
    path.chmod(0o644)
    inode = path.stat().st_ino
    monkeypatch.setattr(os, "replace", refuse_with(code))
    with structlog.testing.capture_logs() as logs:
        assert write_atomic(path, b"new", mode=0o600) is True
    assert path.read_bytes() == b"new"
    assert path.stat().st_ino == inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert entries(tmp_path) == ["f"]
    assert [e["event"] for e in logs] == ["atomic_rename_refused_writing_in_place"]
    assert logs[0]["errno"] == errno.errorcode[code]


def test_a_write_that_need_not_be_durable_yet_is_whole_and_fsynced_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`durable=False`: replaced as ever (new inode, mode, no temporary left) with no fsync;
    `make_durable` then fsyncs the file and its folder."""
    fsynced = record_fsyncs(monkeypatch)
    path = tmp_path / "f"
    path.write_bytes(b"old")
    inode = path.stat().st_ino
    assert write_atomic(path, b"new", mode=0o600, durable=False) is False
    assert (path.read_bytes(), entries(tmp_path), fsynced) == (b"new", ["f"], [])
    assert path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    make_durable(path)
    assert fsynced == ["file", "folder"]
    assert write_atomic(path, b"newer") is False  # durable by default: both, at once
    assert fsynced == ["file", "folder", "file", "folder"]


def test_the_in_place_fallback_need_not_be_durable_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced = record_fsyncs(monkeypatch)
    monkeypatch.setattr(os, "replace", refuse_with(errno.EXDEV))
    path = tmp_path / "f"
    path.write_bytes(b"a longer old version")
    with structlog.testing.capture_logs():
        assert write_atomic(path, b"new", durable=False) is True
    assert (path.read_bytes(), fsynced) == (b"new", [])


def test_making_durable_what_is_gone_or_a_symlink_raises(tmp_path: Path) -> None:
    """Never through a symlink (O_NOFOLLOW); the error names the path."""
    with pytest.raises(AtomicWriteError) as caught:
        make_durable(tmp_path / "gone")
    assert caught.value.errno == errno.ENOENT
    assert str(tmp_path / "gone") in str(caught.value)
    (tmp_path / "target").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(AtomicWriteError) as caught:
        make_durable(tmp_path / "link")
    assert caught.value.errno == errno.ELOOP


def test_in_place_fallback_creates_a_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback also works when the target does not exist yet."""
    monkeypatch.setattr(os, "replace", refuse_with(errno.EXDEV))
    path = tmp_path / "f"
    assert write_atomic(path, b"x" * 100_000, mode=0o600) is True
    assert path.read_bytes() == b"x" * 100_000


def test_in_place_fallback_failure_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-place write that fails raises AtomicWriteError with the errno."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "replace", refuse_with(errno.EBUSY))
    monkeypatch.setattr(os, "ftruncate", refuse_with(errno.EIO))
    with pytest.raises(AtomicWriteError) as caught:
        write_atomic(path, b"new")
    assert caught.value.errno == errno.EIO
    assert path.read_bytes() == b"old"
    assert entries(tmp_path) == ["f"]


def test_refused_rename_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other rename error raises, keeping the old file and removing the temp file."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "replace", refuse_with(errno.EACCES))
    with pytest.raises(AtomicWriteError) as caught:
        write_atomic(path, b"new")
    assert caught.value.errno == errno.EACCES
    assert isinstance(caught.value, OSError)
    assert path.read_bytes() == b"old"
    assert entries(tmp_path) == ["f"]


def test_disk_full_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while flushing the temp file raises with the old file intact."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", refuse_with(errno.ENOSPC))
    with pytest.raises(AtomicWriteError) as caught:
        write_atomic(path, b"new")
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old"
    assert entries(tmp_path) == ["f"]


def test_missing_folder_raises(tmp_path: Path) -> None:
    """A target in a folder that does not exist cannot be written."""
    with pytest.raises(AtomicWriteError) as caught:
        write_atomic(tmp_path / "nope" / "f", b"x")
    assert caught.value.errno == errno.ENOENT


def test_folder_fsync_failure_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that cannot be fsynced (some filesystems) does not fail the write."""
    real_fsync = os.fsync
    calls: list[int] = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "f"
    assert write_atomic(path, b"new") is False
    assert path.read_bytes() == b"new"
    assert len(calls) == 2


def test_unopenable_folder_is_ignored_after_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the folder cannot be opened for fsync the written file still stands."""
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECTORY:
            raise OSError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    path = tmp_path / "f"
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    """Old `.NAME.*.tmp` files beside the target go; young ones, other files and dirs stay."""
    import os
    import time

    from gastown_sandboxd.atomic import remove_stale_temporaries

    target = tmp_path / ".env.gateway"
    target.write_text("KILO_JWT=x\n")
    old = tmp_path / "..env.gateway.ab12cd34.tmp"
    young = tmp_path / "..env.gateway.ef56gh78.tmp"
    other = tmp_path / ".other.ab12cd34.tmp"
    folder = tmp_path / "..env.gateway.dir.tmp"
    for path in (old, young, other):
        path.write_text("KILO_JWT=partial")
    folder.mkdir()
    an_hour_ago = time.time() - 3600
    for path in (old, other, folder):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert remove_stale_temporaries(target) == 1
    assert not old.exists()
    assert young.exists()
    assert other.exists()
    assert folder.is_dir()
    assert target.read_text() == "KILO_JWT=x\n"
