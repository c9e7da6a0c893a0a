"""The SQLite store of towns and usage, on real files."""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from gastown_cloud import migrations
from gastown_cloud.desired import ConfigState
from gastown_cloud.migrations import LATEST, SchemaTooNew, migrate
from gastown_cloud.store import HISTORY_KEPT, ConfigConflict, GenerationAhead, Store, Usage

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


FIXTURE_V1 = Path(__file__).parent / "data" / "store-v1.sqlite"


def _rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608
            for table in ("towns", "usage")
        }


def _user_version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


async def test_database_of_the_first_release_is_migrated_and_keeps_everything(
    tmp_path: Path,
) -> None:
    """A database made by the store before schema versions (data/README.md says how) opens,
    is migrated to the latest version, keeps every town and usage row, and the towns read as
    generation 0 with nothing desired."""
    path = tmp_path / "cloud.db"
    shutil.copyfile(FIXTURE_V1, path)
    before = _rows(path)
    assert _user_version(path) == 0
    assert len(before["towns"]) == 3
    assert len(before["usage"]) == 2
    async with Store(path) as store:
        towns = [await store.get_town(row[0]) for row in before["towns"]]
        configs = [await store.get_config(row[0]) for row in before["towns"]]
        usage = await store.list_usage(str(before["usage"][0][3]))
    assert _rows(path) == before
    assert _user_version(path) == LATEST
    assert [town.status for town in towns if town] == ["active", "destroyed", "stopped"]
    assert len(usage) == 2
    for config in configs:
        assert config is not None
        assert (config.generation, config.desired, config.observed_generation) == (0, {}, 0)
        assert config.state is ConfigState.APPLIED


async def test_migration_runs_once(tmp_path: Path) -> None:
    """Opening a migrated database again applies nothing and logs no migration."""
    path = tmp_path / "cloud.db"
    shutil.copyfile(FIXTURE_V1, path)
    with capture_logs() as first:
        async with Store(path) as store:
            town = await store.create_town(
                user_id="u", organization_id=None, name="t", sandbox_url=None, now=NOW
            )
            await store.save_desired(
                town.id, {"town": {"default_agent": "x"}}, base_generation=0, applied=False, now=NOW
            )
    with capture_logs() as second:
        async with Store(path) as store:
            config = await store.get_config(town.id)
    # Migration 1 only stamps the version on a first-release database: its tables exist.
    assert [e["version"] for e in first if e["event"] == "store_migrated"] == [1, 2]
    assert [e for e in second if e["event"] == "store_migrated"] == []
    assert config is not None
    assert config.desired == {"town": {"default_agent": "x"}}
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        assert migrate(db, path) == LATEST


async def test_new_database_gets_the_latest_schema(tmp_path: Path) -> None:
    """A new file is made at the latest version in one go, with every table."""
    with capture_logs() as logs:
        async with Store(tmp_path / "cloud.db"):
            pass
    assert _user_version(tmp_path / "cloud.db") == LATEST
    assert [e["version"] for e in logs if e["event"] == "store_migrated"] == [1, 2]
    with closing(sqlite3.connect(tmp_path / "cloud.db")) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"towns", "usage", "town_config", "desired_history"} <= tables


async def test_newer_database_is_refused_untouched(tmp_path: Path) -> None:
    """A database with a version above the code's is refused naming the file, byte-identical."""
    path = tmp_path / "cloud.db"
    shutil.copyfile(FIXTURE_V1, path)
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {LATEST + 1}")
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew, match=str(path)) as refused:
        async with Store(path):
            pass
    assert f"version {LATEST + 1}" in str(refused.value)
    assert path.read_bytes() == before


def test_serve_refuses_a_newer_database(tmp_path: Path) -> None:
    """`gastown-cloud serve` on a newer database exits 2 (a setting to fix, as `check_database`
    finds it before serving) with one line naming the file."""
    path = tmp_path / "cloud.db"
    shutil.copyfile(FIXTURE_V1, path)
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {LATEST + 1}")
    env = {
        **os.environ,
        "NEXTAUTH_SECRET": secrets.token_urlsafe(48),
        "INTERNAL_API_KEY": secrets.token_urlsafe(24),
    }
    argv = [sys.executable, "-m", "gastown_cloud", "serve", "--port", "0", "--db", str(path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert f"the database {path} has schema version {LATEST + 1}" in line
    assert done.stdout == ""


async def test_failed_migration_leaves_the_last_whole_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration that fails part-way is rolled back whole: version and tables as before."""
    path = tmp_path / "cloud.db"
    shutil.copyfile(FIXTURE_V1, path)
    broken = ("CREATE TABLE half_done (a)", "THIS IS NOT SQL")
    monkeypatch.setattr(migrations, "MIGRATIONS", (migrations.MIGRATIONS[0], broken))
    monkeypatch.setattr(migrations, "LATEST", 2)
    before = _rows(path)
    with pytest.raises(sqlite3.OperationalError):
        async with Store(path):
            pass
    assert _user_version(path) == 1
    with closing(sqlite3.connect(path)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in tables
    assert _rows(path) == before


async def test_desired_generations_and_reports(tmp_path: Path) -> None:
    """Each change is the next generation; a stale base is refused; reports move observed and
    applied forward only; a report ahead of the cloud is refused; old desired states are pruned
    once the sandbox stands past them."""
    async with Store(tmp_path / "cloud.db") as store:
        town = await store.create_town(
            user_id="u", organization_id=None, name="t", sandbox_url=None, now=NOW
        )
        one = {"town": {"default_agent": "a"}}
        two = {"town": {"default_agent": "b"}}
        saved = await store.save_desired(town.id, one, base_generation=0, applied=False, now=NOW)
        assert (saved.generation, saved.state) == (1, ConfigState.PENDING)
        with pytest.raises(ConfigConflict):
            await store.save_desired(town.id, two, base_generation=0, applied=False, now=NOW)
        saved = await store.save_desired(
            town.id, two, base_generation=1, applied=True, revision="r2", now=NOW + 1
        )
        assert (saved.generation, saved.observed_generation, saved.applied_generation) == (2, 2, 2)
        assert (saved.applied_at, saved.revision) == ("2023-11-14T22:13:21Z", "r2")
        assert await store.desired_at(town.id, 1) is None  # pruned: the sandbox is past it
        assert await store.desired_at(town.id, 2) == two
        assert await store.desired_at(town.id, 0) == {}
        await store.save_desired(town.id, one, base_generation=2, applied=False, now=NOW)
        with pytest.raises(GenerationAhead):
            await store.record_report(town.id, generation=4, revision=None, error=None, now=NOW)
        failure = {"message": "bad", "details": [{"path": "/town", "message": "x"}]}
        failed = await store.record_report(
            town.id, generation=3, revision="r2", error=failure, now=NOW + 5
        )
        assert failed.state is ConfigState.FAILED
        assert failed.last_error == {**failure, "generation": 3, "at": "2023-11-14T22:13:25Z"}
        assert (failed.observed_generation, failed.applied_generation) == (3, 2)
        assert await store.desired_at(town.id, 2) == two  # still the sandbox's base
        stale = await store.record_report(town.id, generation=2, revision="r0", error=None, now=NOW)
        assert stale == failed
        assert await store.get_config(town.id) == failed
        assert await store.get_config("nope") is None


async def test_two_openers_at_once_migrate_once(tmp_path: Path) -> None:
    """Two connections opening a first-release file at the same moment apply each migration
    once between them (the second finds the version moved under its transaction)."""
    path = tmp_path / "cloud.db"
    shutil.copyfile(FIXTURE_V1, path)
    before = _rows(path)
    opened = anyio.Event()
    with capture_logs() as logs:

        async def open_and_wait() -> None:
            async with Store(path):
                await opened.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(open_and_wait)
            tg.start_soon(open_and_wait)
            await anyio.wait_all_tasks_blocked()
            opened.set()
    assert sorted(e["version"] for e in logs if e["event"] == "store_migrated") == [1, 2]
    assert _user_version(path) == LATEST
    assert _rows(path) == before


async def test_history_of_a_town_whose_sandbox_is_away_stays_bounded(tmp_path: Path) -> None:
    """100 changes while the sandbox stands on generation 1: the applied generation's state
    (the base of the next push) and the last HISTORY_KEPT stay; those between are pruned, and
    a late report of a recent one still finds its state."""
    async with Store(tmp_path / "cloud.db") as store:
        town = await store.create_town(
            user_id="u", organization_id=None, name="t", sandbox_url=None, now=NOW
        )
        first = {"town": {"default_agent": "a"}}
        await store.save_desired(town.id, first, base_generation=0, applied=True, now=NOW)
        for n in range(2, 102):
            change = {"town": {"default_agent": f"agent-{n}"}}
            await store.save_desired(town.id, change, base_generation=n - 1, applied=False, now=NOW)
        with closing(sqlite3.connect(tmp_path / "cloud.db")) as db:
            kept = [
                row[0]
                for row in db.execute(
                    "SELECT generation FROM desired_history WHERE town_id = ? ORDER BY 1",
                    (town.id,),
                )
            ]
        assert kept == [1, *range(101 - HISTORY_KEPT + 1, 102)]
        assert await store.desired_at(town.id, 1) == first
        assert await store.desired_at(town.id, 50) is None
        recent = 101 - HISTORY_KEPT + 1
        assert await store.desired_at(town.id, recent) == {
            "town": {"default_agent": f"agent-{recent}"}
        }
        await store.record_report(town.id, generation=recent, revision="r", error=None, now=NOW)
        assert await store.desired_at(town.id, 1) is None
        assert await store.desired_at(town.id, recent) is not None
