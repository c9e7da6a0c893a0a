"""The cloud server's settings: secrets from the environment, the rest from flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SettingsError
from .tokens import DEFAULT_LIFETIME

MIN_SECRET_BYTES = 32
MIN_KEY_CHARS = 16
MAX_LIFETIME = 7 * 86400


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudSettings:
    """Everything `serve` needs; `repr` never shows the secret or the key."""

    nextauth_secret: str = field(repr=False)
    internal_api_key: str = field(repr=False)
    db: Path
    host: str = "127.0.0.1"
    port: int = 3000
    token_lifetime: int = DEFAULT_LIFETIME
    max_body_bytes: int = 64 * 1024
    sandbox_timeout: float = 10.0

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        db: Path,
        host: str = "127.0.0.1",
        port: int = 3000,
        token_lifetime: int = DEFAULT_LIFETIME,
    ) -> CloudSettings:
        """Read the secrets from `env`; raises `SettingsError` naming the first bad setting."""
        secret = env.get("NEXTAUTH_SECRET", "")
        if not secret:
            raise SettingsError(
                "NEXTAUTH_SECRET", "missing", "export a random secret of at least 32 bytes"
            )
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise SettingsError(
                "NEXTAUTH_SECRET",
                f"shorter than {MIN_SECRET_BYTES} bytes",
                "export a random secret of at least 32 bytes",
            )
        key = env.get("INTERNAL_API_KEY", "")
        if not key:
            raise SettingsError(
                "INTERNAL_API_KEY", "missing", "export the key the sandboxes are given"
            )
        if len(key) < MIN_KEY_CHARS:
            raise SettingsError(
                "INTERNAL_API_KEY",
                f"shorter than {MIN_KEY_CHARS} characters",
                "export a key of at least 16 characters, as the sandbox requires",
            )
        if not 0 <= port <= 65535:
            raise SettingsError("--port", f"{port} is not a TCP port", "give 0 to 65535")
        if not 1 <= token_lifetime <= MAX_LIFETIME:
            raise SettingsError(
                "--token-lifetime",
                f"{token_lifetime} s is out of range",
                f"give 1 to {MAX_LIFETIME} seconds",
            )
        return cls(
            nextauth_secret=secret,
            internal_api_key=key,
            db=db,
            host=host,
            port=port,
            token_lifetime=token_lifetime,
        )
