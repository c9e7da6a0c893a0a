"""Every error the cloud raises on purpose.

CloudError
├── SettingsError    a missing or bad setting: `serve` exits 2 with one line naming it
├── TokenInvalid     a gateway token that failed verification (carries a reason code)
├── ApiError         an HTTP error answered as `{"error": code, "message": sentence}`
└── GatewayError     an HTTP error of the gateway, answered in OpenAI's error shape
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class CloudError(Exception):
    """Base class of every error raised on purpose by gastown_cloud."""


class SettingsError(CloudError):
    """A setting is missing or bad; `str()` is the one line printed before exit 2."""

    def __init__(self, setting: str, problem: str, fix: str) -> None:
        self.setting = setting
        self.problem = problem
        self.fix = fix
        super().__init__(f"setting {setting}: {problem}; {fix}")


class TokenInvalid(CloudError):
    """A token that failed verification; never carries the token itself.

    `reason` is one of: "malformed", "bad_algorithm", "bad_signature", "missing_claim",
    "invalid_claim", "wrong_type", "expired".
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class ApiError(CloudError):
    """An error answer of the cloud API; `details` are `{"path", "message"}` entries.

    `headers` go on the answer (a 413 closes the connection).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Sequence[Mapping[str, str]] = (),
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.headers = dict(headers or {})
        self.code = code
        self.message = message
        self.details = tuple(details)
        super().__init__(f"{status} {code}: {message}")


class GatewayError(CloudError):
    """An error answer of the OpenAI-compatible gateway: `{"error": {message, type, code}}`."""

    def __init__(self, status: int, type: str, code: str, message: str) -> None:
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        super().__init__(f"{status} {code}: {message}")
