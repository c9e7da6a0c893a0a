"""The cloud's SQLite store of towns, their desired configuration, and gateway usage.

One connection in WAL mode; every call runs in a worker thread, one at a time (a limiter of
one), so the event loop never blocks and the connection is never used concurrently.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable, Collection
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread

from ._time import rfc3339
from .desired import ConfigState, config_state
from .errors import CloudError
from .migrations import migrate

TownStatus = Literal["active", "stopped", "destroyed"]
_T = TypeVar("_T")

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
# A town that never had a config row reads as generation 0 with nothing desired.
_SELECT_CONFIG = """SELECT towns.id, COALESCE(c.generation, 0), COALESCE(c.desired, '{}'),
    COALESCE(c.observed_generation, 0), COALESCE(c.applied_generation, 0), c.last_error,
    c.applied_at, c.revision FROM towns LEFT JOIN town_config AS c ON c.town_id = towns.id
    WHERE towns.id = ?"""
_UPSERT_CONFIG = """INSERT INTO town_config (town_id, generation, desired, observed_generation,
    applied_generation, last_error, applied_at, revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (town_id) DO UPDATE SET generation = excluded.generation,
    desired = excluded.desired, observed_generation = excluded.observed_generation,
    applied_generation = excluded.applied_generation, last_error = excluded.last_error,
    applied_at = excluded.applied_at, revision = excluded.revision"""
_INSERT_HISTORY = "INSERT INTO desired_history (town_id, generation, desired) VALUES (?, ?, ?)"
_SELECT_HISTORY = "SELECT desired FROM desired_history WHERE town_id = ? AND generation = ?"
# The sandbox stands on applied_generation or later: older desired states are no longer needed.
_PRUNE_HISTORY = "DELETE FROM desired_history WHERE town_id = ? AND generation < ?"
# Between the applied generation and the last `HISTORY_KEPT`: a sandbox away for long reports
# the generation it applied (kept) or one of the recent ones a push carried (kept).
_PRUNE_BETWEEN = (
    "DELETE FROM desired_history WHERE town_id = ? AND generation > ? AND generation <= ?"
)
HISTORY_KEPT = 16


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


@dataclass(frozen=True, slots=True)
class TownConfig:
    """A town's desired configuration and what its sandbox last reported about it.

    `observed_generation` is the generation of the last report (or applied push), with
    `last_error` when that report was a failure; `applied_generation` is the newest one the
    sandbox applied, and `applied_at` when. Always `applied <= observed <= generation`.
    """

    town_id: str
    generation: int
    desired: dict[str, Any]
    observed_generation: int
    applied_generation: int
    last_error: dict[str, Any] | None
    applied_at: str | None
    revision: str | None

    @property
    def state(self) -> ConfigState:
        return config_state(self.generation, self.observed_generation, self.last_error)

    def as_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "desired": self.desired,
            "observedGeneration": self.observed_generation,
            "state": self.state.value,
            "lastError": self.last_error,
            "appliedAt": self.applied_at,
            "revision": self.revision,
        }


class ConfigConflict(CloudError):
    """The town's generation moved since it was read (another writer): nothing was saved."""


class GenerationAhead(CloudError):
    """A sandbox reported on a generation the cloud has not made; nothing was recorded."""

    def __init__(self, reported: int, generation: int) -> None:
        self.reported = reported
        self.generation = generation
        super().__init__(f"generation {reported} reported, the newest is {generation}")


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

    async def get_config(self, town_id: str) -> TownConfig | None:
        """The town's configuration record; None when the town does not exist."""
        return await self._run(_get_config, town_id)

    async def desired_at(self, town_id: str, generation: int) -> dict[str, Any] | None:
        """The desired configuration of `generation` (0 is empty); None once it was pruned."""
        if generation == 0:
            return {}
        row = await self._run(
            lambda db: db.execute(_SELECT_HISTORY, (town_id, generation)).fetchone()
        )
        return None if row is None else _object(row[0])

    async def save_desired(
        self,
        town_id: str,
        desired: dict[str, Any] | None,
        *,
        base_generation: int,
        applied: bool,
        revision: str | None = None,
        now: float,
    ) -> TownConfig:
        """Keep `desired` as the next generation (None: unchanged, same generation), in one
        transaction; with `applied`, also record that the sandbox runs it at `revision`.

        Raises `ConfigConflict` when the stored generation is no longer `base_generation`.
        """

        def save(db: sqlite3.Connection) -> TownConfig:
            config = _get_config(db, town_id)
            if config is None or config.generation != base_generation:
                raise ConfigConflict(f"town {town_id} is not at generation {base_generation}")
            if desired is not None:
                generation = config.generation + 1
                config = replace(config, generation=generation, desired=desired)
                db.execute(_INSERT_HISTORY, (town_id, generation, _text(desired)))
                between = (town_id, config.applied_generation, generation - HISTORY_KEPT)
                db.execute(_PRUNE_BETWEEN, between)
            if applied:
                config = replace(
                    config,
                    observed_generation=config.generation,
                    applied_generation=config.generation,
                    last_error=None,
                    applied_at=rfc3339(now),
                    revision=revision,
                )
            return _put_config(db, config)

        return await self._run(_in_transaction, save)

    async def record_report(
        self,
        town_id: str,
        *,
        generation: int,
        revision: str | None,
        error: dict[str, Any] | None,
        now: float,
    ) -> TownConfig:
        """Record the sandbox's report on `generation`: applied (no `error`) or failed.

        A report older than the last one recorded changes nothing (it arrived late). Raises
        `GenerationAhead` for a generation the cloud has not made.
        """

        def record(db: sqlite3.Connection) -> TownConfig:
            config = _get_config(db, town_id)
            if config is None:
                raise ConfigConflict(f"town {town_id} does not exist")
            if generation > config.generation:
                raise GenerationAhead(generation, config.generation)
            if generation < config.observed_generation:
                return config
            if error is None:
                config = replace(
                    config,
                    observed_generation=generation,
                    applied_generation=generation,
                    last_error=None,
                    applied_at=rfc3339(now),
                    revision=revision,
                )
            else:
                failure = {**error, "generation": generation, "at": rfc3339(now)}
                config = replace(
                    config, observed_generation=generation, last_error=failure, revision=revision
                )
            return _put_config(db, config)

        return await self._run(_in_transaction, record)

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
        migrate(db, path)
    except sqlite3.Error:
        db.close()
        raise
    return db


def _get_config(db: sqlite3.Connection, town_id: str) -> TownConfig | None:
    row = db.execute(_SELECT_CONFIG, (town_id,)).fetchone()
    if row is None:
        return None
    town, generation, desired, observed, applied, error, applied_at, revision = row
    last_error = None if error is None else _object(error)
    return TownConfig(
        town, generation, _object(desired), observed, applied, last_error, applied_at, revision
    )


def _put_config(db: sqlite3.Connection, config: TownConfig) -> TownConfig:
    error = None if config.last_error is None else _text(config.last_error)
    values = (config.town_id, config.generation, _text(config.desired))
    reported = (config.observed_generation, config.applied_generation, error)
    db.execute(_UPSERT_CONFIG, (*values, *reported, config.applied_at, config.revision))
    db.execute(_PRUNE_HISTORY, (config.town_id, config.applied_generation))
    return config


def _in_transaction(db: sqlite3.Connection, call: Callable[[sqlite3.Connection], _T]) -> _T:
    """`call(db)` inside BEGIN IMMEDIATE … COMMIT; rolled back whole when it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = call(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _text(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise sqlite3.DataError("a stored configuration is not a JSON object")
    return value


def _get_town(db: sqlite3.Connection, town_id: str) -> Town | None:
    row = db.execute(_SELECT_TOWN, (town_id,)).fetchone()
    return None if row is None else Town(*row)
