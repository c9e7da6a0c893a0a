"""The cloud's SQLite store of towns and gateway usage.

One connection in WAL mode; every call runs in a worker thread, one at a time (a limiter of
one), so the event loop never blocks and the connection is never used concurrently.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable, Collection
from dataclasses import astuple, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread

from ._time import rfc3339

TownStatus = Literal["active", "stopped", "destroyed"]
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS towns (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, organization_id TEXT, name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'stopped', 'destroyed')),
    sandbox_url TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, organization_id TEXT,
    town_id TEXT NOT NULL, model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS usage_town ON usage (town_id, id);
"""
_INSERT_TOWN = """INSERT INTO towns (id, user_id, organization_id, name, status, sandbox_url,
    created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""
_SELECT_TOWN = """SELECT id, user_id, organization_id, name, status, sandbox_url, created_at,
    updated_at FROM towns WHERE id = ?"""
_UPDATE_STATUS = """UPDATE towns SET status = ?, updated_at = ?
    WHERE id = ? AND status IN (SELECT value FROM json_each(?))"""
_INSERT_USAGE = """INSERT INTO usage (user_id, organization_id, town_id, model, prompt_tokens,
    completion_tokens, at) VALUES (?, ?, ?, ?, ?, ?, ?)"""
_SELECT_USAGE = """SELECT user_id, organization_id, town_id, model, prompt_tokens,
    completion_tokens, at FROM usage WHERE town_id = ? ORDER BY id"""


@dataclass(frozen=True, slots=True)
class Town:
    id: str
    user_id: str
    organization_id: str | None
    name: str
    status: TownStatus
    sandbox_url: str | None
    created_at: str
    updated_at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "userId": self.user_id,
            "organizationId": self.organization_id,
            "name": self.name,
            "status": self.status,
            "sandboxUrl": self.sandbox_url,
        }


@dataclass(frozen=True, slots=True)
class Usage:
    user_id: str
    organization_id: str | None
    town_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "userId": self.user_id,
            "organizationId": self.organization_id,
            "townId": self.town_id,
            "model": self.model,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "at": self.at,
        }


class Store:
    """`async with Store(path) as store:` opens (and creates) the database, closes it after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._limiter = anyio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None

    async def __aenter__(self) -> Store:
        self._db = await anyio.to_thread.run_sync(_open, self.path, limiter=self._limiter)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        db, self._db = self._db, None
        if db is not None:
            await anyio.to_thread.run_sync(db.close, limiter=self._limiter)

    async def create_town(
        self, *, user_id: str, organization_id: str | None, name: str, sandbox_url: str | None,
        now: float,
    ) -> Town:  # fmt: skip
        at = rfc3339(now)
        town = Town(uuid.uuid4().hex, user_id, organization_id, name, "active", sandbox_url, at, at)
        await self._run(lambda db: db.execute(_INSERT_TOWN, astuple(town)))
        return town

    async def get_town(self, town_id: str) -> Town | None:
        return await self._run(_get_town, town_id)

    async def set_status(
        self, town_id: str, status: TownStatus, *, allowed_from: Collection[TownStatus], now: float
    ) -> Town | None:
        """Move the town to `status` if it is in `allowed_from` now; None if it was not."""

        def update(db: sqlite3.Connection) -> Town | None:
            values = (status, rfc3339(now), town_id, json.dumps(list(allowed_from)))
            changed = db.execute(_UPDATE_STATUS, values).rowcount
            return _get_town(db, town_id) if changed else None

        return await self._run(update)

    async def record_usage(self, usage: Usage) -> None:
        await self._run(lambda db: db.execute(_INSERT_USAGE, astuple(usage)))

    async def list_usage(self, town_id: str) -> list[Usage]:
        rows = await self._run(lambda db: db.execute(_SELECT_USAGE, (town_id,)).fetchall())
        return [Usage(*row) for row in rows]

    async def _run(self, call: Callable[..., _T], *args: Any) -> _T:
        def in_thread() -> _T:
            if self._db is None:
                raise RuntimeError("the store is not open")
            return call(self._db, *args)

        return await anyio.to_thread.run_sync(in_thread, limiter=self._limiter)


def _open(path: Path) -> sqlite3.Connection:
    # Autocommit: every statement is its own transaction; the limiter serialises them.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA busy_timeout = 5000")
        db.executescript(_SCHEMA)
    except sqlite3.Error:
        db.close()
        raise
    return db


def _get_town(db: sqlite3.Connection, town_id: str) -> Town | None:
    row = db.execute(_SELECT_TOWN, (town_id,)).fetchone()
    return None if row is None else Town(*row)
