"""`gastown-cloud towns create|show|stop|start|destroy`: the town routes, on the store directly.

Each command does what its HTTP route does (same store calls, same transitions, the token
minted as `serve` mints it) and returns the route's JSON answer as text.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pydantic

from .api_towns import TRANSITIONS, create_town
from .errors import CloudError, SettingsError
from .models import CreateTown
from .settings import check_database, check_secret
from .store import Store

_FLAGS = {
    "userId": "--user-id",
    "organizationId": "--organization-id",
    "name": "--name",
    "sandboxUrl": "--sandbox-url",
}


class TownCommandError(CloudError):
    """A town command that cannot be done (unknown or destroyed town): exit 1."""


def run_town_command(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """Run `towns <action>` on `args.db`; the JSON to print. Raises `SettingsError` for a bad
    secret or input (exit 2) and `TownCommandError` for a refused action (exit 1)."""
    if args.action == "create":
        secret = check_secret(env)
        body = _create_body(args)
        check_database(args.db, create=True)
        answer = anyio.run(_create, args, body, secret, backend="asyncio")
    else:
        check_database(args.db, create=False)
        answer = anyio.run(_change, args.db, args.action, args.town_id, backend="asyncio")
    return json.dumps(answer, indent=2)


def _create_body(args: argparse.Namespace) -> CreateTown:
    """The flags checked by the route's own model (lengths, the sandbox URL)."""
    data: dict[str, Any] = {
        "userId": args.user_id,
        "organizationId": args.organization_id,
        "name": args.name,
        "sandboxUrl": args.sandbox_url,
    }
    try:
        return CreateTown.model_validate(data)
    except pydantic.ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        flag = _FLAGS.get(str(error["loc"][0]), "--name")
        raise SettingsError(flag, error["msg"], "see `towns create --help`") from exc


async def _create(args: argparse.Namespace, body: CreateTown, secret: str) -> dict[str, Any]:
    async with Store(args.db) as store:
        town, token = await create_town(
            store,
            body,
            secret=secret,
            lifetime=args.token_lifetime,
            claims=args.token_claims,
            now=time.time(),
        )
    return {"town": town.as_json(), "token": token}


async def _change(db: Path, action: str, town_id: str) -> dict[str, Any]:
    async with Store(db) as store:
        if action == "show":
            town = await store.get_town(town_id)
        else:
            status, allowed_from = TRANSITIONS[action]
            town = await store.set_status(
                town_id, status, allowed_from=allowed_from, now=time.time()
            )
            if town is None and await store.get_town(town_id) is not None:
                raise TownCommandError(f"town {town_id} is destroyed; it cannot {action}")
    if town is None:
        raise TownCommandError(f"no town has the id {town_id}")
    return {"town": town.as_json()}
