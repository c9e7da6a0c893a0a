"""Every error the daemon raises on purpose.

GastownError
├── OptionsError          a missing or bad setting: exit 2, one line naming it
│   └── OptionsProblems       every problem found in one pass, one line each
├── TokenError             a token that is not acceptable (carries every reason)
├── RefreshError           the cloud did not give an acceptable token
├── ConfigError            a PATCH /config or a settings file that cannot be used
│   ├── PatchInvalid           422, one detail per problem
│   ├── SettingsFileUnreadable 409, a file that is not gt's JSON or is too new
│   ├── PreconditionFailed     412, If-Match does not equal the revision
│   ├── SettingsConflict       409, a file or rig folder changed under a write in progress
│   └── StorageUnavailable     503, the disk refused a write (ENOSPC, EROFS, EACCES…)
├── DesiredConfigUnavailable the cloud's desired configuration could not be read (502/503/504)
├── RequestRefused         an API request refused as sent (400, 408, 413, 415, 422, 503)
├── SubscriberLagged       an event subscriber fell behind and was dropped by the bus
└── AtomicWriteError(OSError)  an atomic replace that failed; the old file is intact
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class GastownError(Exception):
    """Base class of every error raised on purpose by gastown_sandboxd."""


class OptionsError(GastownError):
    """A setting is missing or bad; `str()` is the one line printed before exit 2."""

    def __init__(self, setting: str, problem: str, fix: str) -> None:
        self.setting = setting
        self.problem = problem
        self.fix = fix
        super().__init__(f"setting {setting}: {problem}; {fix}")


class OptionsProblems(OptionsError):
    """Every missing or bad setting found in one pass; `str()` is one line per problem."""

    def __init__(self, problems: Sequence[OptionsError]) -> None:
        if not problems:
            raise ValueError("OptionsProblems needs at least one problem")
        self.problems = tuple(problems)
        first = self.problems[0]
        super().__init__(first.setting, first.problem, first.fix)

    def __str__(self) -> str:
        return "\n".join(f"setting {p.setting}: {p.problem}; {p.fix}" for p in self.problems)


class TokenError(GastownError):
    """A token that is not acceptable to the sandbox (never carries the token itself)."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__("token not acceptable: " + ", ".join(self.reasons))


class RefreshError(GastownError):
    """A refresh that produced no acceptable token.

    `kind` is one of: "outage", "busy", "broken", "unauthorized", "inactive".
    """

    def __init__(
        self,
        kind: str,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.kind = kind
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"refresh failed ({kind}): {reason}")


class Problem(NamedTuple):
    """One problem of a request body, located by a JSON pointer.

    A `NamedTuple`, as are the records of the token rules (`token/claims.py`,
    `token/envfile.py`): this module is on the agents' light path, and `dataclasses` would
    import `inspect` into every agent start and helper call.
    """

    path: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class ConfigError(GastownError):
    """Base of the errors of the model configuration; `status` and `code` map to HTTP."""

    status = 500
    code = "config_error"

    def __init__(self, message: str, details: Sequence[Problem] = ()) -> None:
        self.message = message
        self.details = tuple(details)
        super().__init__(message)


class PatchInvalid(ConfigError):
    status = 422
    code = "invalid_patch"


class SettingsFileUnreadable(ConfigError):
    status = 409
    code = "settings_file_unreadable"


class PreconditionFailed(ConfigError):
    status = 412
    code = "precondition_failed"


class StorageUnavailable(ConfigError):
    status = 503
    code = "storage_unavailable"


class SettingsConflict(ConfigError):
    status = 409
    code = "settings_changed"


class DesiredConfigUnavailable(GastownError):
    """The cloud did not give its desired configuration; `status` is the answer to send.

    `status` is 504 for a timeout, 503 when the cloud cannot be reached or is busy, 502 for
    any other bad answer; `reason` is a short code, never a body the cloud sent.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(message)


class RequestRefused(GastownError):
    """An API request refused for what it is (its media type, body or headers), not for
    the state of the town; `http/errors.py` answers it as `status` with `code`."""

    def __init__(
        self, status: int, code: str, message: str, details: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = tuple(details)
        super().__init__(message)


class SubscriberLagged(GastownError):
    """The bus dropped a subscriber that fell behind; resume after `last_event_id`."""

    def __init__(self, last_event_id: int) -> None:
        self.last_event_id = last_event_id
        super().__init__(f"subscriber fell behind after event {last_event_id}")


class AtomicWriteError(OSError, GastownError):
    """An atomic replace failed; the file at `path` is still its old version."""
