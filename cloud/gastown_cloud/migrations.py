"""The store's schema as numbered migrations, applied once each, in one transaction, at open.

`PRAGMA user_version` counts the migrations a database has had. Version 0 is a new file or one
made before versions existed; migration 1 is that first schema verbatim (`IF NOT EXISTS`), so both
start the same way. A database newer than this code is refused, never guessed at.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: towns and gateway usage (the schema of the first release, which set no user_version).
    (
        """CREATE TABLE IF NOT EXISTS towns (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, organization_id TEXT, name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'stopped', 'destroyed')),
    sandbox_url TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, organization_id TEXT,
    town_id TEXT NOT NULL, model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, at TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS usage_town ON usage (town_id, id)",
    ),
    # 2: each town's desired configuration, what its sandbox last reported, and the desired
    # configuration of each generation the sandbox may still stand on.
    (
        """CREATE TABLE town_config (
    town_id TEXT PRIMARY KEY REFERENCES towns (id),
    generation INTEGER NOT NULL CHECK (generation >= 0),
    desired TEXT NOT NULL,
    observed_generation INTEGER NOT NULL CHECK (observed_generation <= generation),
    applied_generation INTEGER NOT NULL CHECK (applied_generation <= observed_generation),
    last_error TEXT, applied_at TEXT, revision TEXT)""",
        """CREATE TABLE desired_history (
    town_id TEXT NOT NULL REFERENCES towns (id), generation INTEGER NOT NULL,
    desired TEXT NOT NULL, PRIMARY KEY (town_id, generation))""",
    ),
)
LATEST = len(MIGRATIONS)


class SchemaTooNew(sqlite3.DatabaseError):
    """The database was made by a newer gastown_cloud; this one refuses to touch it."""


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring `db` (in autocommit mode) to `LATEST`; returns the version it had.

    Each migration runs in its own `BEGIN IMMEDIATE` transaction with the version bump, so a
    failure leaves the database at the last whole version; two processes opening it at once
    apply each migration once.
    """
    found = _version(db)
    if found > LATEST:
        raise _too_new(path, found)
    for version in range(found + 1, LATEST + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            current = _version(db)  # another process may have migrated while we waited
            if current > LATEST:
                raise _too_new(path, current)
            if current < version:
                for statement in MIGRATIONS[version - 1]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if current < version:
            log.info("store_migrated", db=str(path), version=version)
    return found


def _version(db: sqlite3.Connection) -> int:
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def _too_new(path: Path, version: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"the database {path} has schema version {version}, newer than the {LATEST} this "
        "gastown-cloud knows; run a newer gastown-cloud or restore a copy made for this one"
    )
