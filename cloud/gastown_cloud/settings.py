"""The cloud server's settings: secrets from the environment, the rest from flags."""

from __future__ import annotations

import os
import sqlite3
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jwt

# The lifetimes a sandbox accepts (CONTRACT §3), by the sandbox's own rule: the cloud mints
# no token every sandbox would refuse.
from gastown_sandboxd.token.claims import MAX_LIFETIME, MIN_LIFETIME

from .errors import SettingsError
from .tokens import DEFAULT_LIFETIME, TokenClaims

MIN_SECRET_BYTES = 32
MIN_KEY_CHARS = 16
MAX_REFRESH_RATE = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudSettings:
    """Everything `serve` needs; `repr` never shows the secret or the key."""

    nextauth_secret: str = field(repr=False)
    internal_api_key: str = field(repr=False)
    db: Path
    host: str = "127.0.0.1"
    port: int = 3000
    token_lifetime: int = DEFAULT_LIFETIME
    token_claims: TokenClaims = TokenClaims.SEED
    # The seed's key-only refresh; off by default: the internal key alone refreshes no town.
    allow_unbound_refresh: bool = False
    # Refreshes admitted per second (admission control); None admits every one.
    refresh_rate: int | None = None
    max_body_bytes: int = 64 * 1024
    sandbox_timeout: float = 10.0
    # Served over TLS when both are set: a PEM certificate chain and its private key.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def tls(self) -> tuple[Path, Path] | None:
        """(certificate chain, key) when the server speaks HTTPS; None for plain HTTP."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return self.tls_cert, self.tls_key

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        db: Path,
        host: str = "127.0.0.1",
        port: int = 3000,
        token_lifetime: int = DEFAULT_LIFETIME,
        token_claims: TokenClaims = TokenClaims.SEED,
        allow_unbound_refresh: bool = False,
        refresh_rate: int | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> CloudSettings:
        """Read the secrets from `env`; raises `SettingsError` naming the first bad setting."""
        secret = check_secret(env)
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
        check_lifetime(token_lifetime)
        if refresh_rate is not None and not 1 <= refresh_rate <= MAX_REFRESH_RATE:
            raise SettingsError(
                "--refresh-rate",
                f"{refresh_rate} refreshes per second is out of range",
                f"give 1 to {MAX_REFRESH_RATE}, or leave it out to admit every refresh",
            )
        check_tls(tls_cert, tls_key)
        return cls(
            nextauth_secret=secret,
            internal_api_key=key,
            db=db,
            host=host,
            port=port,
            token_lifetime=token_lifetime,
            token_claims=token_claims,
            allow_unbound_refresh=allow_unbound_refresh,
            refresh_rate=refresh_rate,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )


def check_tls(cert: Path | None, key: Path | None) -> None:
    """Both or neither, and a key that is the certificate's; raises `SettingsError`."""
    if cert is None and key is None:
        return
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise SettingsError(given, f"needs {missing}", "give both, or neither to serve plain HTTP")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            "--tls-cert", f"cannot be served with --tls-key: {exc}", "give a PEM chain and its key"
        ) from None


def check_secret(env: Mapping[str, str]) -> str:
    """`NEXTAUTH_SECRET` from `env`; raises `SettingsError` when missing or short."""
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
    try:  # PyJWT refuses an HMAC secret that looks like a PEM or SSH key, at every mint
        jwt.encode({}, secret, algorithm="HS256")
    except jwt.InvalidKeyError:
        raise SettingsError(
            "NEXTAUTH_SECRET",
            "looks like a PEM or SSH key, which HS256 signing refuses",
            "export a random secret of at least 32 bytes",
        ) from None
    return secret


def check_lifetime(token_lifetime: int) -> int:
    """`token_lifetime` when it is 10 s to 7 days; else `SettingsError` naming the flag."""
    if not MIN_LIFETIME <= token_lifetime <= MAX_LIFETIME:
        raise SettingsError(
            "--token-lifetime",
            f"{token_lifetime} s is out of range (a sandbox refuses such tokens)",
            f"give {MIN_LIFETIME} to {MAX_LIFETIME} seconds",
        )
    return token_lifetime


def check_database(path: Path, *, create: bool) -> None:
    """Raise `SettingsError` naming `path` unless SQLite can open it (create it if `create`)."""
    if not create and not path.exists():
        raise SettingsError("--db", f"no database at {path}", "give the file `serve` uses")
    from .migrations import LATEST

    mode = "rwc" if create else "rw"
    try:
        uri = f"{path.absolute().as_uri()}?mode={mode}"
        db = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)
        try:
            db.execute("PRAGMA schema_version").fetchone()
            version = db.execute("PRAGMA user_version").fetchone()[0]
            db.execute("BEGIN IMMEDIATE")  # another process's write lock held past the wait
            db.execute("ROLLBACK")
        finally:
            db.close()
        # SQLite opens a write-protected file read-only without a word (every write was then
        # answered 500, a reviewer found): open it for writing as SQLite would.
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except (sqlite3.Error, OSError, ValueError) as exc:
        raise SettingsError(
            "--db", f"cannot open the database {path} ({exc})", "give a writable SQLite file"
        ) from exc
    if version > LATEST:
        raise SettingsError(
            "--db",
            f"the database {path} has schema version {version}, newer than the {LATEST} this "
            "gastown-cloud knows",
            "run a newer gastown-cloud, or restore a copy made for this one",
        )
