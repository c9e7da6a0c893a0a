"""Desired configuration routes (CONTRACT §10): the dashboard's PATCH and GET, the sandbox's report.

A PATCH is checked for shape, merged into the town's desired configuration as the next generation
and pushed to the sandbox's `PATCH /config` with `X-Gastown-Generation`. The sandbox's 200 keeps
it as applied; its refusal (409, 412, 422) keeps nothing and is passed on; anything else (away,
5xx, timeout, our key refused, no JSON) keeps it as pending for the sandbox's next sync (202).
PATCHes of one town are serialised; reports are single transactions and never wait for a PATCH.
A push and the record of its answer are shielded together: a change the sandbox took is kept
however its request ends (and a stop gives requests `sandbox_timeout` + 5 s to end).
"""

from __future__ import annotations

import functools
import json
import ssl
import weakref
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
import httpx
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._http import (
    AppContext,
    bearer_token,
    parse_object,
    read_body,
    town_binding_problem,
    validate,
)
from .desired import ConfigState, check_shape, etag, etag_matches, merge_patch, push_patch
from .errors import ApiError
from .models import ConfigReport
from .store import ConfigConflict, GenerationAhead, Town, TownConfig

log = structlog.get_logger(__name__)

GENERATION_HEADER = "x-gastown-generation"
_MEDIA_TYPES = frozenset({"application/json", "application/merge-patch+json"})
# Answers that refuse this change itself (invalid, stale If-Match, unreadable file): not kept.
_REFUSALS = frozenset({409, 412, 422})
_NO_CACHE = {"cache-control": "no-cache"}


@dataclass(frozen=True, slots=True)
class Push:
    """How the sandbox took a pushed change: `applied`, `refused` (passed on) or `pending`."""

    outcome: ConfigState | None  # None: refused
    status: int = 0
    answer: dict[str, Any] | None = None
    etag: str | None = None
    reason: str = ""
    message: str = ""


def config_routes(ctx: AppContext) -> list[Route]:
    # One lock per town with a PATCH under way; it goes when the last PATCH holding it ends.
    locks: weakref.WeakValueDictionary[str, anyio.Lock] = weakref.WeakValueDictionary()

    def lock_for(town_id: str) -> anyio.Lock:
        lock = locks.get(town_id)
        if lock is None:
            lock = locks[town_id] = anyio.Lock()
        return lock

    async def patch_config(request: Request) -> Response:
        ctx.require_key(request)
        town = _require_active(await ctx.town(request.path_params["town_id"]))
        _require_json_media_type(request)
        body = await read_body(request, ctx.settings.max_body_bytes)
        patch = parse_object(body)
        problems = check_shape(patch)
        if problems:
            first = problems[0]
            message = f"Field {first['path']}: {first['message']}."
            raise ApiError(422, "invalid_config", message, problems)
        async with lock_for(town.id):
            town = _require_active(await ctx.town(town.id))
            return await _change(ctx, request, town, patch, body)

    async def read_config(request: Request) -> Response:
        ctx.require_key(request)
        town = await ctx.town(request.path_params["town_id"])
        authorization = request.headers.get("authorization")
        if authorization is not None:
            _require_town_bearer(ctx, town, authorization)
        config = await _config(ctx, town.id)
        body = config.as_json()
        headers = {"etag": etag(body), **_NO_CACHE}
        if etag_matches(request.headers.get("if-none-match", ""), headers["etag"]):
            return Response(status_code=304, headers=headers)
        return JSONResponse(body, headers=headers)

    async def report_status(request: Request) -> Response:
        ctx.require_key(request)
        town = await ctx.town(request.path_params["town_id"])
        authorization = request.headers.get("authorization")
        if authorization is None:
            raise ApiError(401, "bearer_required", "A Bearer token of the town is required.")
        _require_town_bearer(ctx, town, authorization)
        if town.status == "destroyed":
            raise ApiError(410, "town_destroyed", "The town is destroyed; reports are not kept.")
        report = validate(ConfigReport, await ctx.read_json(request))
        error = None if report.error is None else report.error.model_dump()
        try:
            config = await ctx.store.record_report(
                town.id,
                generation=report.observed_generation,
                revision=report.revision,
                error=error,
                now=ctx.clock(),
            )
        except GenerationAhead as exc:
            message = (
                f"Generation {exc.reported} was reported but the newest is {exc.generation}; "
                "read the desired configuration again."
            )
            raise ApiError(409, "generation_ahead", message) from exc
        log.info(
            "config_reported",
            town_id=town.id,
            generation=report.observed_generation,
            state=config.state.value,
        )
        return JSONResponse(config.as_json(), headers=_NO_CACHE)

    path = "/api/gastown/towns/{town_id}/config"
    return [
        Route(path, patch_config, methods=["PATCH"]),
        Route(path, read_config, methods=["GET"]),
        Route(path + "/status", report_status, methods=["POST"]),
    ]


async def _change(
    ctx: AppContext, request: Request, town: Town, patch: dict[str, Any], body: bytes
) -> Response:
    """Merge, push and record one PATCH; the caller holds the town's lock."""
    config = await _config(ctx, town.id)
    desired = merge_patch(config.desired, patch)
    changed = desired != config.desired
    if len(json.dumps(desired, separators=(",", ":")).encode()) > ctx.settings.max_body_bytes:
        limit = ctx.settings.max_body_bytes // 1024
        message = f"The desired configuration would exceed {limit} KiB, more than a sandbox takes."
        raise ApiError(422, "desired_too_large", message, [{"path": "", "message": message}])
    content: bytes | None = body
    if config.applied_generation != config.generation:
        # The sandbox stands on an older generation: push what takes it from there. Once
        # that generation's configuration is pruned there is no difference to push (one
        # taken from {} dropped every deletion since, and was recorded as applied): the
        # change waits for the sandbox's sync, whose three-way merge has its own copy.
        base = await ctx.store.desired_at(town.id, config.applied_generation)
        if base is None:
            log.warning(
                "config_base_missing", town_id=town.id, generation=config.applied_generation
            )
            content = None
        else:
            content = json.dumps(push_patch(base, desired, patch)).encode()
    # Shielded, push and record go together: a change the sandbox has taken is kept, though
    # the dashboard went away or the server's stop cut its time (a SIGTERM's graceful time
    # once ended a push a sandbox was still answering: the sandbox ran the change and the
    # cloud kept nothing). The push ends within `sandbox_timeout`.
    with anyio.CancelScope(shield=True):
        answer = await _push_and_keep(ctx, request, town, content, desired, changed, config)
    return answer  # noqa: RET504  # returned inside, mypy takes the scope to swallow it


async def _push_and_keep(
    ctx: AppContext,
    request: Request,
    town: Town,
    content: bytes | None,
    desired: dict[str, Any],
    changed: bool,
    config: TownConfig,
) -> Response:
    generation = config.generation + 1 if changed else config.generation
    if content is None:
        message = (
            f"The sandbox stands on generation {config.applied_generation}, which is no "
            "longer kept, so no difference was pushed; its next sync brings it up to date."
        )
        push = _pending("sandbox_behind", message)
    else:
        push = await _push(ctx, request, town, content, generation)
    if push.outcome is None:
        log.info("config_refused", town_id=town.id, generation=generation, status=push.status)
        etag_header = {"etag": push.etag} if push.etag else None
        return JSONResponse(push.answer, status_code=push.status, headers=etag_header)
    applied = push.outcome is ConfigState.APPLIED
    if not applied and request.headers.get("if-match"):
        # Kept as pending, a change made on a revision only the sandbox can check would be
        # kept unchecked: two dashboards on the same revision both got 202, and the second
        # overwrote the first unseen.
        log.info("config_unchecked", town_id=town.id, reason=push.reason)
        message = (
            f"{push.message} Its If-Match could not be checked, so nothing was kept; send it "
            "again, or without If-Match to keep it as pending."
        )
        raise ApiError(503, "precondition_unchecked", message, [{"reason": push.reason}])
    revision = push.answer.get("revision") if push.answer else None
    try:
        saved = await ctx.store.save_desired(
            town.id,
            desired if changed else None,
            base_generation=config.generation,
            applied=applied,
            revision=revision if isinstance(revision, str) else None,
            now=ctx.clock(),
        )
    except ConfigConflict as exc:
        message = "The town's configuration changed meanwhile; send the change again."
        raise ApiError(409, "config_conflict", message) from exc
    log.info("config_kept", town_id=town.id, generation=saved.generation, state=push.outcome.value)
    if applied:
        answer = {**(push.answer or {}), "generation": saved.generation, "state": "applied"}
        return JSONResponse(answer, headers={"etag": push.etag} if push.etag else None)
    pending = {"generation": saved.generation, "state": "pending", "reason": push.reason}
    return JSONResponse({**pending, "message": push.message}, status_code=202)


async def _push(
    ctx: AppContext, request: Request, town: Town, content: bytes, generation: int
) -> Push:
    """PATCH the sandbox's /config with `content`; how it took it, never an exception."""
    if not town.sandbox_url:
        return _pending("no_sandbox_url", "The town has no sandboxUrl; its sandbox syncs it.")
    headers = {
        "content-type": request.headers.get("content-type") or "application/json",
        "x-internal-api-key": ctx.settings.internal_api_key,
        GENERATION_HEADER: str(generation),
    }
    if if_match := request.headers.get("if-match"):
        headers["if-match"] = if_match
    url = town.sandbox_url.rstrip("/") + "/config"
    try:
        # An http:// sandbox is spoken to without TLS: no CAs to read for it.
        verify = _sandbox_trust() if url.startswith("https://") else False
        async with httpx.AsyncClient(timeout=ctx.settings.sandbox_timeout, verify=verify) as client:
            answer = await client.patch(url, content=content, headers=headers)
    except httpx.TimeoutException:
        log.warning("config_push_failed", town_id=town.id, error="timeout")
        return _pending("sandbox_timeout", "The town's sandbox did not answer in time.")
    except httpx.HTTPError as exc:
        log.warning("config_push_failed", town_id=town.id, error=type(exc).__name__)
        message = f"The town's sandbox could not be reached ({type(exc).__name__})."
        return _pending("sandbox_unreachable", message)
    status = answer.status_code
    if status in (401, 403):
        # Passed on, it would read as the dashboard's key being wrong; it is ours.
        log.warning("config_push_refused_key", town_id=town.id, status=status)
        message = "The sandbox refused the cloud's internal key; compare INTERNAL_API_KEY."
        return _pending("sandbox_refused_key", message)
    try:
        data = answer.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        log.warning("config_push_failed", town_id=town.id, status=status, error="not_json")
        return _pending("bad_sandbox_answer", f"The sandbox answered {status} without JSON.")
    log.info("config_pushed", town_id=town.id, generation=generation, status=status)
    tag = answer.headers.get("etag")
    if status == 200:
        return Push(ConfigState.APPLIED, status, data, tag)
    if status in _REFUSALS:
        return Push(None, status, data, tag)
    return _pending("sandbox_error", f"The sandbox answered {status}.")


@functools.cache
def _sandbox_trust() -> ssl.SSLContext:
    """The context every push to an https:// sandbox verifies with, made at the first one:
    httpx's own default (`SSL_CERT_FILE` or `SSL_CERT_DIR` when set, else certifi's bundle).

    Made for each push, it read the whole bundle every time, on the event loop: the cloud's
    CPU per push to an https:// sandbox was 22-27 ms with a bundle of certifi's CAs, against
    0.08 ms to make a client with the context made once. A CA file changed while the cloud
    runs is read at its next start.
    """
    return httpx.create_ssl_context()


def _pending(reason: str, message: str) -> Push:
    return Push(ConfigState.PENDING, reason=reason, message=message)


async def _config(ctx: AppContext, town_id: str) -> TownConfig:
    config = await ctx.store.get_config(town_id)
    if config is None:
        raise ApiError(404, "town_not_found", "No town has this id.")
    return config


def _require_active(town: Town) -> Town:
    if town.status != "active":
        raise ApiError(409, "town_not_active", f"The town is {town.status}, not active.")
    return town


def _require_json_media_type(request: Request) -> None:
    given = request.headers.get("content-type")
    if given is not None and given.split(";")[0].strip().lower() not in _MEDIA_TYPES:
        message = "Send application/json or application/merge-patch+json."
        raise ApiError(415, "unsupported_media_type", message)


def _require_town_bearer(ctx: AppContext, town: Town, authorization: str) -> None:
    """403 unless the Bearer token is well signed (expired is fine) for the town and its owner."""
    token = bearer_token(authorization)
    if token is None:
        _refuse(town, "not_bearer", "The Authorization header is not a Bearer token.")
    if (problem := town_binding_problem(ctx, town, token)) is not None:
        _refuse(town, *problem)


def _refuse(town: Town, reason: str, message: str) -> NoReturn:
    log.warning("config_bearer_refused", town_id=town.id, reason=reason)
    raise ApiError(403, "token_binding", message)
