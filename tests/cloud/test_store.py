"""The SQLite store of towns and usage, on real files."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from gastown_cloud.store import Store, Usage

NOW = 1_700_000_000.0


async def test_schema_is_created_in_wal_mode(tmp_path: Path) -> None:
    """Opening a new file creates both tables and switches the journal to WAL."""
    async with Store(tmp_path / "cloud.db"):
        pass
    with closing(sqlite3.connect(tmp_path / "cloud.db")) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"towns", "usage"} <= tables
    assert mode == "wal"


async def test_town_round_trip_survives_reopen(tmp_path: Path) -> None:
    """A created town reads back equal, also after the store is closed and opened again."""
    path = tmp_path / "cloud.db"
    async with Store(path) as store:
        town = await store.create_town(
            user_id="u1", organization_id="o1", name="t", sandbox_url="http://s:8080", now=NOW
        )
        assert await store.get_town(town.id) == town
    async with Store(path) as store:
        again = await store.get_town(town.id)
    assert again == town
    assert town.status == "active"
    assert town.created_at == town.updated_at == "2023-11-14T22:13:20Z"
    assert town.as_json() == {
        "id": town.id,
        "userId": "u1",
        "organizationId": "o1",
        "name": "t",
        "status": "active",
        "sandboxUrl": "http://s:8080",
    }


async def test_unknown_town_is_none(tmp_path: Path) -> None:
    """Reading a town that does not exist gives None."""
    async with Store(tmp_path / "cloud.db") as store:
        assert await store.get_town("nope") is None


async def test_set_status_only_from_allowed(tmp_path: Path) -> None:
    """A status change applies only from an allowed status and stamps `updated_at`."""
    async with Store(tmp_path / "cloud.db") as store:
        town = await store.create_town(
            user_id="u", organization_id=None, name="t", sandbox_url=None, now=NOW
        )
        stopped = await store.set_status(town.id, "stopped", allowed_from=["active"], now=NOW + 60)
        assert stopped is not None
        assert stopped.status == "stopped"
        assert stopped.updated_at == "2023-11-14T22:14:20Z"
        refused = await store.set_status(town.id, "active", allowed_from=["active"], now=NOW)
        assert refused is None
        assert (await store.get_town(town.id)) == stopped
        missing = await store.set_status("nope", "stopped", allowed_from=["active"], now=NOW)
        assert missing is None


async def test_usage_is_listed_per_town_in_order(tmp_path: Path) -> None:
    """Usage rows come back for their town only, in the order they were recorded."""
    first = Usage("u", "o", "t1", "m1", 3, 5, "2023-11-14T22:13:20Z")
    second = Usage("u", None, "t1", "m2", 1, 2, "2023-11-14T22:13:21Z")
    other = Usage("v", None, "t2", "m1", 9, 9, "2023-11-14T22:13:22Z")
    async with Store(tmp_path / "cloud.db") as store:
        for usage in (first, second, other):
            await store.record_usage(usage)
        assert await store.list_usage("t1") == [first, second]
        assert await store.list_usage("t3") == []
    assert first.as_json() == {
        "userId": "u",
        "organizationId": "o",
        "townId": "t1",
        "model": "m1",
        "promptTokens": 3,
        "completionTokens": 5,
        "at": "2023-11-14T22:13:20Z",
    }


async def test_calls_run_off_the_event_loop_thread(tmp_path: Path) -> None:
    """Store calls run in a worker thread, so the event loop never blocks on SQLite."""
    seen: list[str] = []
    loop_thread = threading.current_thread().name
    async with Store(tmp_path / "cloud.db") as store:
        await store._run(lambda db: seen.append(threading.current_thread().name))
    assert seen
    assert seen[0] != loop_thread


async def test_concurrent_writes_are_serialised(tmp_path: Path) -> None:
    """Fifty concurrent creations through one connection all land."""
    ids: list[str] = []
    async with Store(tmp_path / "cloud.db") as store:

        async def create(n: int) -> None:
            town = await store.create_town(
                user_id=f"u{n}", organization_id=None, name="t", sandbox_url=None, now=NOW
            )
            ids.append(town.id)

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(create, n)
        found = [await store.get_town(town_id) for town_id in ids]
    assert len(set(ids)) == 50
    assert all(town is not None for town in found)


async def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    """Using the store after it closed raises instead of touching a closed connection."""
    store = Store(tmp_path / "cloud.db")
    async with store:
        pass
    with pytest.raises(RuntimeError, match="not open"):
        await store.get_town("t")


async def test_unopenable_file_raises(tmp_path: Path) -> None:
    """A database path in a missing folder fails to open with sqlite3's error."""
    with pytest.raises(sqlite3.OperationalError):
        async with Store(tmp_path / "missing" / "cloud.db"):
            pass
