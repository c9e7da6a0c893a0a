"""The OpenAPI 3.1 document of the cloud, served at `GET /openapi.json`.

One operation per route of the app (a test compares them). Every route but the gateway needs
`x-internal-api-key`; the gateway takes the town's token as `Authorization: Bearer`, and the
refresh routes take it too (the binding, section 7 of the contract).
"""

from __future__ import annotations

from typing import Any

TITLE = "gastown-cloud"
VERSION = "1"
_TEXT_LIMITS = {"minLength": 1, "maxLength": 200}  # as `models.Text`

_NULLABLE_STRING = {"type": ["string", "null"]}
_KEY: list[dict[str, list[str]]] = [{"internalKey": []}]
_KEY_AND_BEARER: list[dict[str, list[str]]] = [{"internalKey": [], "townToken": []}]
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait: spread over the backlog, at least 1.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {**_json(_ref("Error"), description), **extra}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {
        400: "Malformed JSON or a missing or mistyped field.",
        401: "A missing or wrong x-internal-api-key.",
        404: "No town has this id (or no route has this path).",
        409: "The town is stopped.",
        410: "The town is destroyed.",
        413: "The body exceeds 64 KiB.",
    }
    return {str(code): _error(meaning[code]) for code in codes}


_TOWN_ID = {
    "name": "town_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}
_TOWN_ANSWER = _json(
    {"type": "object", "required": ["town"], "properties": {"town": _ref("Town")}},
    "The town after the request.",
)
_REFRESH_BODY = {
    "anyOf": [
        {
            "type": "object",
            "required": ["townId"],
            "properties": {
                "townId": {"type": "string", **_TEXT_LIMITS},
                "json": {"not": {"type": "object"}},
            },
        },
        {
            "type": "object",
            "required": ["json"],
            "properties": {
                "json": {
                    "type": "object",
                    "required": ["townId"],
                    "properties": {"townId": {"type": "string", **_TEXT_LIMITS}},
                }
            },
        },
    ],
    "description": '`{"townId"}`, or tRPC\'s `{"json": {"townId"}}`.',
}


def _refresh_errors() -> dict[str, Any]:
    return {
        **_errors(400, 404, 409, 410, 413),
        "401": _error("A wrong key, or no Bearer token (the key alone refreshes no town)."),
        "403": _error("The Bearer token does not verify or belongs to another town or user."),
        "503": _error("Admission control (--refresh-rate): come back later.", headers=_RETRY_AFTER),
    }


def _refresh_operation(trpc: bool) -> dict[str, Any]:
    if trpc:
        ok = _json(
            {
                "type": "object",
                "required": ["result"],
                "properties": {
                    "result": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {"data": _ref("Jwt")},
                    }
                },
            },
            "A new token in tRPC's envelope.",
        )
    else:
        ok = {
            "description": "A new token: the bare JWT, or JSON for Accept: application/json.",
            "content": {
                "text/plain": {"schema": _ref("Jwt")},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["token", "expiresAt"],
                        "properties": {
                            "token": _ref("Jwt"),
                            "expiresAt": {"type": "string", "format": "date-time"},
                        },
                    }
                },
            },
        }
    return {
        "summary": "Mint a new token for the town (tRPC form)" if trpc else "Refresh the token",
        "security": _KEY_AND_BEARER,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _REFRESH_BODY}},
        },
        "responses": {"200": ok, **_refresh_errors()},
    }


def _town_change(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": _KEY,
        "parameters": [_TOWN_ID],
        "responses": {"200": _TOWN_ANSWER, **_errors(401, 404, 410)},
    }


def _paths() -> dict[str, Any]:
    town_path = "/api/gastown/towns/{town_id}"
    return {
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": _KEY,
                "responses": {
                    "200": _json({"type": "object"}, "The OpenAPI document."),
                    **_errors(401),
                },
            }
        },
        "/api/gastown/towns": {
            "post": {
                "summary": "Create a town and mint its first token (createTown)",
                "security": _KEY,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CreateTown")}},
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["town", "token"],
                            "properties": {"town": _ref("Town"), "token": _ref("Jwt")},
                        },
                        "The new town and its first token.",
                    ),
                    **_errors(400, 401, 413),
                },
            }
        },
        town_path: {
            "get": {
                "summary": "Read a town",
                "security": _KEY,
                "parameters": [_TOWN_ID],
                "responses": {"200": _TOWN_ANSWER, **_errors(401, 404)},
            },
            "delete": _town_change("Destroy a town (for good)"),
        },
        town_path + "/stop": {"post": _town_change("Stop a town")},
        town_path + "/start": {"post": _town_change("Start a stopped town")},
        town_path + "/config": {"patch": _config_patch(), "get": _config_read()},
        town_path + "/config/status": {"post": _config_report()},
        "/api/gastown/refresh-token": {"post": _refresh_operation(trpc=False)},
        "/api/trpc/gastown.refreshToken": {"post": _refresh_operation(trpc=True)},
        "/api/gateway/chat/completions": {"post": _chat_operation()},
        "/api/gastown/usage": {
            "get": {
                "summary": "Gateway usage recorded against a town",
                "security": _KEY,
                "parameters": [
                    {
                        "name": "townId",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["usage"],
                            "properties": {"usage": {"type": "array", "items": _ref("Usage")}},
                        },
                        "Usage records, oldest first.",
                    ),
                    **_errors(400, 401, 404),
                },
            }
        },
    }


def _config_patch() -> dict[str, Any]:
    """The dashboard's model change (section 10 of the contract): kept, then pushed."""
    passed = _json({"type": "object"}, "The sandbox's refusal, passed through; nothing kept.")
    applied = _json(
        {"type": "object", "required": ["generation", "state"]},
        "The sandbox applied it: its answer, with the generation and state `applied`.",
    )
    pending = _json(
        {
            "type": "object",
            "required": ["generation", "state", "reason", "message"],
            "properties": {
                "generation": {"type": "integer", "minimum": 0},
                "state": {"const": "pending"},
                "reason": {"type": "string"},
                "message": {"type": "string"},
            },
        },
        "Kept as the next generation; the sandbox converges on it at its next sync.",
    )
    return {
        "summary": "Change the town's desired model configuration and push it to its sandbox",
        "security": _KEY,
        "parameters": [_TOWN_ID],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/merge-patch+json": {"schema": {"type": "object"}},
            },
        },
        "responses": {
            "200": applied,
            "202": pending,
            **_errors(400, 401, 404, 413),
            "409": _error("The town is not active, or the sandbox's 409, passed through."),
            "412": passed,
            "415": _error("The body is not application/json or merge-patch+json."),
            "422": _error("A key the sandbox does not manage, or the sandbox's 422 passed on."),
            "503": _error(
                "Sent with If-Match while the sandbox could not check it (unreachable, 5xx…): "
                "nothing was kept."
            ),
        },
    }


def _config_read() -> dict[str, Any]:
    """The desired configuration and how far the sandbox has applied it."""
    return {
        "summary": "The town's desired configuration, its generation and its state",
        "security": _KEY,
        "parameters": [
            _TOWN_ID,
            {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
            },
        ],
        "responses": {
            "200": _json(_ref("TownConfig"), "The desired configuration (ETag header)."),
            "304": {"description": "Unchanged since the ETag in If-None-Match."},
            **_errors(401, 404),
            "403": _error("A Bearer token was sent that is not the town's."),
        },
    }


def _config_report() -> dict[str, Any]:
    """The sandbox's report after a sync (key and the town's Bearer)."""
    report = {
        "type": "object",
        "required": ["observedGeneration"],
        "properties": {
            "observedGeneration": {"type": "integer", "minimum": 0},
            "revision": _NULLABLE_STRING,
            "error": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["message"],
                        "properties": {
                            "message": {"type": "string", "minLength": 1},
                            "details": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                ]
            },
        },
    }
    return {
        "summary": "The sandbox reports the generation it applied, or why it could not",
        "security": _KEY_AND_BEARER,
        "parameters": [_TOWN_ID],
        "requestBody": {"required": True, "content": {"application/json": {"schema": report}}},
        "responses": {
            "200": _json(_ref("TownConfig"), "The configuration after the report."),
            **_errors(400, 404, 410, 413),
            "401": _error("A wrong key, or no Bearer token of the town."),
            "403": _error("The Bearer token does not verify or is another town's."),
            "409": _error("The reported generation is newer than the cloud's."),
        },
    }


def _chat_operation() -> dict[str, Any]:
    openai_error = _json(_ref("OpenAIError"), "An error in OpenAI's shape.")
    return {
        "summary": "OpenAI chat completions, paid by the town's token",
        "security": [{"townToken": []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("ChatRequest")}},
        },
        "responses": {
            "200": _json(_ref("ChatCompletion"), "A deterministic chat.completion."),
            "400": openai_error,
            "401": {
                **openai_error,
                "description": "A missing, bad, expired or wrong-type token (and, with "
                "--token-claims kilo, one without kiloUserId and version 3).",
            },
            "403": {**openai_error, "description": "The token's town is not active."},
            "413": openai_error,
        },
    }


def _schemas() -> dict[str, Any]:
    return {
        "TownConfig": {
            "type": "object",
            "required": [
                "generation",
                "desired",
                "observedGeneration",
                "state",
                "lastError",
                "appliedAt",
            ],
            "properties": {
                "generation": {"type": "integer", "minimum": 0},
                "desired": {"type": "object"},
                "observedGeneration": {"type": "integer", "minimum": 0},
                "state": {"enum": ["applied", "pending", "failed"]},
                "lastError": {"type": ["object", "null"]},
                "appliedAt": _NULLABLE_STRING,
                "revision": _NULLABLE_STRING,
            },
        },
        "Jwt": {
            "type": "string",
            "pattern": "^[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$",
            "maxLength": 8192,
        },
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["path", "message"],
                        "properties": {"path": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            },
        },
        "OpenAIError": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": "string"},
                    },
                }
            },
        },
        "Town": {
            "type": "object",
            "required": ["id", "userId", "organizationId", "name", "status", "sandboxUrl"],
            "properties": {
                "id": {"type": "string"},
                "userId": {"type": "string"},
                "organizationId": _NULLABLE_STRING,
                "name": {"type": "string"},
                "status": {"enum": ["active", "stopped", "destroyed"]},
                "sandboxUrl": _NULLABLE_STRING,
            },
        },
        "CreateTown": {
            "type": "object",
            "required": ["userId", "name"],
            "properties": {
                "userId": {"type": "string", **_TEXT_LIMITS},
                "organizationId": {"type": ["string", "null"], **_TEXT_LIMITS},
                "name": {"type": "string", **_TEXT_LIMITS},
                "sandboxUrl": {
                    "type": ["string", "null"],
                    "format": "uri",
                    "pattern": "^https?://[^/?#\\s]+",
                    "maxLength": 2000,
                    "description": "An http or https URL of the sandbox daemon.",
                },
            },
        },
        "ChatRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                "model": {"type": "string", **_TEXT_LIMITS},
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1000,
                    "items": {
                        "type": "object",
                        "required": ["role"],
                        "properties": {
                            "role": {"type": "string", "minLength": 1, "maxLength": 64},
                            "content": {
                                "type": ["string", "array", "null"],
                                "items": {"type": "object"},
                            },
                        },
                    },
                },
                "stream": {"const": False},
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": {
                    "type": "object",
                    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                    "properties": {
                        "prompt_tokens": {"type": "integer"},
                        "completion_tokens": {"type": "integer"},
                        "total_tokens": {"type": "integer"},
                    },
                },
            },
        },
        "Usage": {
            "type": "object",
            "required": [
                "userId",
                "organizationId",
                "townId",
                "model",
                "promptTokens",
                "completionTokens",
                "at",
            ],
            "properties": {
                "userId": {"type": "string"},
                "organizationId": _NULLABLE_STRING,
                "townId": {"type": "string"},
                "model": {"type": "string"},
                "promptTokens": {"type": "integer"},
                "completionTokens": {"type": "integer"},
                "at": {"type": "string", "format": "date-time"},
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The whole document; a fresh copy on every call."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "The development cloud of Gas Town sandboxes: towns, token "
            "refresh, the gateway and its usage.",
        },
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "internalKey": {"type": "apiKey", "in": "header", "name": "x-internal-api-key"},
                "townToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    }
