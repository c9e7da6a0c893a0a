"""The HTTP client the daemon calls its cloud with: one configuration for every such call.

httpx is imported at the first call, not at start. The daemon's first calls (the sync of the
desired configuration, and a refresh when the token is not fresh) come once it serves, so
its ~25 ms import is no longer before READY. The same import, moved: the CPU of a start is
the same, and for those ~25 ms right after READY the event loop is busy with it (a SIGTERM
sent just then is handled after it: 114 ms from signal to exit against 64, ops_bench).
Imported in a worker thread instead, the loop went on serving, but under load the first
sync and refresh came so late that the kill loops' daemons (tests/faults) got no sync done
in their short lives: on 2 cores the import then shares the GIL with every request.

TLS: an https:// cloud is verified against the CAs OpenSSL itself would use, the system's CA
folder read lazily before any bundle read whole (`trust_locations`, `tls_context`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

    import httpx

# How long an idle connection to the cloud is kept for the next call: under the keep-alive
# time of common servers (5 s: hypercorn's default, this repository's cloud). httpx's own
# default is exactly 5 s, counted from after the answer was read, a later moment than the
# server's timer: a call made ~5 s after the last could be sent into a connection the cloud
# was closing, and fail without an answer (httpx retries no request). The desired
# configuration's client keeps one connection: its read and its report go together, and its
# first retry after a failed read comes 5 s later.
KEEPALIVE_S = 2.0


def cloud_client(
    url: str, *, timeout: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """A client for calls to `url`: one `timeout` per read, no redirects followed, no proxy or
    netrc from the environment, idle connections kept `KEEPALIVE_S`, and TLS verified for
    https:// only, against `tls_context()`.

    No TLS is ever spoken to an http:// URL (no redirect is followed), so its client makes no
    context at all.
    """
    import httpx

    import_httpcore_without_http2()
    https = transport is None and url.startswith("https://")

    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_S
        ),
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        verify=tls_context() if https else False,
    )


def import_httpcore_without_http2() -> None:
    """Import httpcore (httpx's transport, imported by its first client) without its HTTP/2
    connection, which imports h2 and hpack: no client here speaks HTTP/2 (none offers it).

    httpcore falls back as it intends when h2 is missing: its HTTP/2 class then raises if
    used. `h2.connection` is hidden only while httpcore is imported, so h2 stays importable
    for hypercorn, which loads it for an `Upgrade: h2c` (`_hypercorn.py`). Measured: the
    first client took RSS up 2.15 MiB and 14-19 ms of CPU, now 1.25 MiB and 9-10 ms (three
    runs each); a daemon after its first sync with an https:// cloud, 39.3 MiB RSS before
    and 38.4 MiB now (four starts each, all alike).
    """
    if "httpcore" in sys.modules or "h2.connection" in sys.modules:
        return
    sys.modules["h2.connection"] = None  # type: ignore[assignment]  # "not importable"
    try:
        import httpcore  # noqa: F401
    finally:
        del sys.modules["h2.connection"]


def tls_failure(exc: BaseException) -> str | None:
    """Why TLS failed, when `exc` (an httpx error) came from the handshake: OpenSSL's reason
    ("certificate verify failed: unable to get local issuer certificate"); else None."""
    import ssl

    seen: BaseException | None = exc
    for _ in range(8):  # httpx's error, httpcore's, then OpenSSL's
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


# `openssl rehash` names a folder's certificates `<subject hash>.<n>` (CRLs `.r<n>`).
_HASHED = re.compile(r"[0-9a-f]{8}\.r?[0-9]+")


def tls_context(env: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """The context an https:// call to the cloud verifies with: certificate and host name
    checked, TLS 1.2 at least, trusting the CAs `trust_locations` names."""
    import ssl

    cafile, capath = trust_locations(os.environ if env is None else env)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=cafile, capath=capath)
    return context


def trust_locations(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(cafile, capath): where the CA certificates come from, OpenSSL's own choices first.

    1. `SSL_CERT_FILE` and `SSL_CERT_DIR`, when either is set: the operator's, as OpenSSL
       itself reads them (a corporate CA, a private cloud). One that names nothing raises
       `TrustUnavailable`; `gastown-sandboxd run` and `check` report it at start.
    2. The system's CA folder (OpenSSL's default, `/etc/ssl/certs` on Debian) when it holds
       hashed certificates: looked up by the issuer's name during a handshake, one file each.
    3. The system's CA file, then certifi's bundle (httpx's own default): read whole.

    Why the folder first: a context that reads a bundle holds its ~120-140 certificates, and
    the memory stays with the process after the client is closed (glibc keeps what it frees;
    `malloc_trim` gave back 0.2 of 3.4 MiB). Measured with Python 3.11 and OpenSSL 3, neither
    variable set: making a client took 26 ms of CPU with certifi's bundle and 0.9 ms with
    the folder; a daemon after its first sync with an https:// cloud, 40.1 MiB against 39.1
    MiB RSS (three starts each, all alike).
    """
    defaults = _verify_paths()
    file_name, dir_name = defaults.openssl_cafile_env, defaults.openssl_capath_env
    cafile, capath = env.get(file_name) or None, env.get(dir_name) or None
    if cafile is not None or capath is not None:
        if cafile is not None and not os.path.isfile(cafile):
            raise TrustUnavailable(file_name, f"{cafile!r} is not a file")
        if capath is not None and not os.path.isdir(capath):
            raise TrustUnavailable(dir_name, f"{capath!r} is not a folder")
        return cafile, capath
    if _holds_hashed_certificates(defaults.openssl_capath):
        return None, defaults.openssl_capath
    if os.path.isfile(defaults.openssl_cafile):
        return defaults.openssl_cafile, None
    import certifi

    return certifi.where(), None


def _verify_paths() -> ssl.DefaultVerifyPaths:
    # ssl is imported where it is used: `exec` and `token` import this module (through the
    # option loader and the socket client) without ever speaking TLS.
    import ssl

    return ssl.get_default_verify_paths()


class TrustUnavailable(ValueError):
    """`SSL_CERT_FILE` or `SSL_CERT_DIR` names nothing: no https:// call can be verified."""

    FIX = "give CA certificates in PEM (a file, or a folder `openssl rehash` made), or unset it"

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}; {self.FIX}")


def _holds_hashed_certificates(folder: str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(_HASHED.fullmatch(entry.name) for entry in entries)
    except OSError:
        return False
