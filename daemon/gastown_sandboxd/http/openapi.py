"""The OpenAPI 3.1 document of the internal API, served at /openapi.json.

`config/openapi.json` is this document written out, and `config/schemas/*.json` the
request bodies as standalone JSON Schemas; `python -m gastown_sandboxd.http.openapi [FOLDER]`
writes them (FOLDER defaults to `config`), and a test keeps them equal.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gastown_sandboxd import __version__
from gastown_sandboxd.gtsettings.schema import EFFORTS, ROLES

_NULLABLE_STRING = {"type": ["string", "null"]}
_STRING_LIST = {"type": "array", "items": {"type": "string"}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_AGENT = {
    "type": ["object", "null"],
    "description": "An agent runtime; null deletes it.",
    "properties": {
        "provider": _NULLABLE_STRING,
        "command": _NULLABLE_STRING,
        "args": {"type": ["array", "null"], "items": {"type": "string"}},
        "env": {
            "type": ["object", "null"],
            "propertyNames": {"pattern": "^[A-Z_][A-Z0-9_]*$"},
            "additionalProperties": {"type": ["string", "null"]},
        },
        "initial_prompt": _NULLABLE_STRING,
        "prompt_mode": _NULLABLE_STRING,
        "exec_wrapper": {"type": ["array", "null"], "items": {"type": "string"}},
    },
    "additionalProperties": False,
}
_NAME_MAP = {"type": ["object", "null"], "additionalProperties": _NULLABLE_STRING}
_ROLE_MAP = {
    "type": ["object", "null"],
    "propertyNames": {"enum": list(ROLES)},
    "additionalProperties": _NULLABLE_STRING,
}
_EFFORT_MAP = {
    "type": ["object", "null"],
    "propertyNames": {"enum": list(ROLES)},
    "additionalProperties": {"enum": [*EFFORTS, None]},
}
_AGENTS = {"type": ["object", "null"], "additionalProperties": _AGENT}

TOWN_PATCH = {
    "type": "object",
    "properties": {
        "default_agent": _NULLABLE_STRING,
        "agents": _AGENTS,
        "role_agents": _ROLE_MAP,
        "role_effort": _EFFORT_MAP,
        "crew_agents": _NAME_MAP,
    },
    "additionalProperties": False,
}
RIG_PATCH = {
    "type": "object",
    "properties": {
        "agent": _NULLABLE_STRING,
        "agents": _AGENTS,
        "role_agents": _ROLE_MAP,
        "worker_agents": _NAME_MAP,
        "role_effort": _EFFORT_MAP,
    },
    "additionalProperties": False,
}
CONFIG_PATCH = {
    "type": "object",
    "description": "JSON Merge Patch (RFC 7396) of the managed keys of gt's settings files.",
    "properties": {
        "town": TOWN_PATCH,
        "rigs": {"type": "object", "additionalProperties": RIG_PATCH},
    },
    "additionalProperties": False,
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object"}},
        },
    },
    "TokenView": {
        "type": "object",
        "required": ["sub", "organization_id", "iat", "exp", "expires_in", "fingerprint"],
        "properties": {
            "sub": {"type": "string"},
            "organization_id": _NULLABLE_STRING,
            "iat": {"type": "integer"},
            "exp": {"type": "integer"},
            "expires_in": {"type": "number"},
            "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{8}$"},
        },
    },
    "TokenAnswer": {
        "type": "object",
        "required": ["token"],
        "properties": {"token": _ref("TokenView")},
    },
    "Status": {
        "type": "object",
        "required": [
            "town_id",
            "state",
            "token",
            "next_refresh_at",
            "last_refresh_at",
            "consecutive_failures",
            "last_error",
            "config_revision",
            "config_sync",
            "env_file",
            "shim_dir",
            "watcher",
            "subscribers",
            "last_event_id",
            "local_socket",
        ],
        "properties": {
            "town_id": {"type": "string"},
            "state": {
                "enum": ["fresh", "refreshing", "degraded", "expired", "missing", "town_inactive"]
            },
            "token": {"oneOf": [_ref("TokenView"), {"type": "null"}]},
            "next_refresh_at": {"type": ["string", "null"], "format": "date-time"},
            "last_refresh_at": {"type": ["string", "null"], "format": "date-time"},
            "consecutive_failures": {"type": "integer", "minimum": 0},
            "last_error": {
                "description": "why the last refresh failed, since the last success",
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["reason", "at", "detail"],
                        "properties": {
                            "reason": {
                                "enum": ["outage", "busy", "broken", "unauthorized", "inactive"]
                            },
                            "at": {"type": "string", "format": "date-time"},
                            "detail": {"type": "string"},
                        },
                    },
                    {"type": "null"},
                ],
            },
            "config_revision": {"type": "string"},
            "config_sync": _ref("ConfigSyncStatus"),
            "watcher": {"type": "object"},
            "subscribers": {"type": "integer", "minimum": 0},
            "last_event_id": {
                "type": "integer",
                "minimum": 0,
                "description": "the newest event's id (one less than this run's first before "
                "any): ids count up from the microsecond the daemon started",
            },
            "env_file": _NULLABLE_STRING,
            "shim_dir": _NULLABLE_STRING,
            "local_socket": {"oneOf": [_ref("LocalSocketStatus"), {"type": "null"}]},
        },
    },
    "LocalSocketStatus": {
        "type": "object",
        "description": "The local socket kept at its path: how often the path was looked at, "
        "how often the socket was bound again, and what the last look found in its way.",
        "required": ["path", "checks", "bound_again", "problem"],
        "properties": {
            "path": {"type": "string"},
            "checks": {"type": "integer", "minimum": 0},
            "bound_again": {"type": "integer", "minimum": 0},
            "problem": {
                "description": "null while the path names the socket served",
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["event"],
                        "properties": {"event": {"type": "string"}},
                    },
                    {"type": "null"},
                ],
            },
        },
    },
    "ConfigSyncStatus": {
        "type": "object",
        "description": "The desired-state sync: the generation last applied, how the last "
        "sync went, and when.",
        "required": ["generation", "state", "last_sync_at"],
        "properties": {
            "generation": {"type": ["integer", "null"], "minimum": 0},
            "state": {"enum": ["pending", "applied", "failed", "unreachable"]},
            "last_sync_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "SyncResult": {
        "type": "object",
        "required": ["state", "generation", "changed", "revision", "files", "error", "reported"],
        "properties": {
            "state": {"enum": ["applied", "failed"]},
            "generation": {"type": "integer", "minimum": 0},
            "changed": {"type": "boolean"},
            "revision": {"type": "string"},
            "files": _STRING_LIST,
            "error": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["message", "details"],
                        "properties": {
                            "message": {"type": "string"},
                            "details": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                ]
            },
            "reported": {"type": "boolean"},
        },
    },
    "ConfigView": {
        "type": "object",
        "required": ["town", "rigs", "revision"],
        "properties": {
            "town": {"type": "object"},
            "rigs": {"type": "object", "additionalProperties": {"type": "object"}},
            "revision": {"type": "string"},
        },
    },
    "PatchResult": {
        "type": "object",
        "required": ["changed", "revision", "files", "town", "rigs"],
        "properties": {
            "changed": {"type": "boolean"},
            "revision": {"type": "string"},
            "files": _STRING_LIST,
            "town": {"type": "object"},
            "rigs": {"type": "object", "additionalProperties": {"type": "object"}},
        },
    },
    "ConfigPatch": CONFIG_PATCH,
}

_KEY_HEADERS = {"401": _error("Missing or wrong x-internal-api-key.")}


def openapi_document() -> dict[str, Any]:
    """The whole document; a fresh dict each call."""
    etag = {"ETag": {"schema": {"type": "string"}, "description": "The revision, quoted."}}
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness: 200 while the event loop runs.",
                "security": [],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ok"}},
                        },
                        "Alive.",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: an acceptable unexpired token on disk, town root writable.",
                "security": [],
                "responses": {
                    code: _json(
                        {
                            "type": "object",
                            "required": ["ready", "reasons"],
                            "properties": {"ready": {"type": "boolean"}, "reasons": _STRING_LIST},
                        },
                        text,
                    )
                    for code, text in (("200", "Ready."), ("503", "Not ready, with reasons."))
                },
            }
        },
        "/status": {
            "get": {
                "summary": "The token's state and metadata (never the token), config, watcher.",
                "responses": {"200": _json(_ref("Status"), "Current status."), **_KEY_HEADERS},
            }
        },
        "/config": {
            "get": {
                "summary": "The managed settings of the town and every rig, and the revision.",
                "responses": {
                    "200": {**_json(_ref("ConfigView"), "Managed view."), "headers": etag},
                    "409": _error("A settings file is not gt's JSON or is of a newer version."),
                    **_KEY_HEADERS,
                },
            },
            "patch": {
                "summary": "Change the model configuration (JSON Merge Patch).",
                "parameters": [
                    {
                        "name": "If-Match",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "X-Gastown-Generation",
                        "in": "header",
                        "required": False,
                        "description": "The cloud's generation of a change it pushes; "
                        "recorded as applied with the change.",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("ConfigPatch")},
                        "application/merge-patch+json": {"schema": _ref("ConfigPatch")},
                    },
                },
                "responses": {
                    "200": {**_json(_ref("PatchResult"), "Applied."), "headers": etag},
                    "400": _error("The body is not a JSON object, or a bad generation."),
                    "409": _error(
                        "A settings file cannot be read as gt's JSON, or a file or rig "
                        "folder changed under the write."
                    ),
                    "412": _error("If-Match does not equal the current revision."),
                    "408": _error("The body did not arrive in time."),
                    "413": _error("The body is larger than 64 KiB."),
                    "415": _error("Wrong content type."),
                    "422": _error("Invalid patch; one detail per problem."),
                    "503": _error("The disk refused the write; nothing changed."),
                    **_KEY_HEADERS,
                },
            },
        },
        "/config/sync": {
            "post": {
                "summary": "Read the cloud's desired configuration now and converge on it.",
                "responses": {
                    "200": _json(_ref("SyncResult"), "The sync ran; `state` says how it went."),
                    "502": _error("The cloud gave a bad answer; nothing was written."),
                    "503": _error("The cloud cannot be reached or is busy; nothing was written."),
                    "504": _error("The cloud did not answer in time; nothing was written."),
                    **_KEY_HEADERS,
                },
            }
        },
        "/token/refresh": {
            "post": {
                "summary": "Refresh the token now; overlapping calls share one cloud call.",
                "responses": {
                    "200": _json(_ref("TokenAnswer"), "The new token's metadata."),
                    "409": _error("The town is not active in the cloud."),
                    "502": _error("The cloud gave no acceptable token."),
                    "503": _error("The env file could not be written; the old token is kept."),
                    **_KEY_HEADERS,
                },
            }
        },
        "/token": {
            "put": {
                "summary": "Accept a token pushed by the cloud; it passes the same checks.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {"token": {"type": "string"}},
                                "additionalProperties": False,
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("TokenAnswer"), "Accepted and written."),
                    "400": _error("The body is not a JSON object."),
                    "408": _error("The body did not arrive in time."),
                    "413": _error("The body is too large."),
                    "422": _error("The token is not acceptable; one detail per reason."),
                    "503": _error("The env file could not be written."),
                    **_KEY_HEADERS,
                },
            }
        },
        "/events": {
            "get": {
                "summary": "Server-Sent Events; replay after Last-Event-ID.",
                "parameters": [
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "An endless event stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_KEY_HEADERS,
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format.",
                "responses": {
                    "200": {
                        "description": "Metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_KEY_HEADERS,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1."), **_KEY_HEADERS},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gastown-sandboxd internal API",
            "version": __version__,
            "description": "Served on the listen address (key) and the local socket (mode 0660).",
        },
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {
                "internalKey": {"type": "apiKey", "in": "header", "name": "x-internal-api-key"}
            },
        },
        "security": [{"internalKey": []}],
        "paths": paths,
    }


def config_patch_schema() -> dict[str, Any]:
    """The PATCH /config body as a standalone JSON Schema (draft 2020-12)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "config-patch.schema.json",
        "title": "PATCH /config body of gastown-sandboxd",
        **copy.deepcopy(CONFIG_PATCH),
    }


GENERATED: dict[str, Callable[[], dict[str, Any]]] = {
    "openapi.json": openapi_document,
    "schemas/config-patch.schema.json": config_patch_schema,
}


def render_document(document: dict[str, Any]) -> str:
    """A generated file's text: two-space JSON, UTF-8 as is, one final newline."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write_documents(folder: Path) -> list[Path]:
    """Write every generated file under `folder`; returns their paths."""
    written = []
    for name, build in GENERATED.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_document(build()), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gastown_sandboxd.http.openapi [FOLDER]`: regenerate the files."""
    parser = argparse.ArgumentParser(
        prog="python -m gastown_sandboxd.http.openapi",
        description="Write the OpenAPI document and the request JSON Schemas.",
    )
    parser.add_argument("folder", nargs="?", type=Path, default=Path("config"))
    args = parser.parse_args(argv)
    for path in write_documents(args.folder):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
