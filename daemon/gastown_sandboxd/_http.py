"""The HTTP client the daemon calls its cloud with: one configuration for every such call.

httpx is imported at the first call, not at start. The daemon's first calls (the sync of the
desired configuration, and a refresh when the token is not fresh) come once it serves, so
its ~25 ms import is no longer before READY. The same import, moved: the CPU of a start is
the same, and for those ~25 ms right after READY the event loop is busy with it (a SIGTERM
sent just then is handled after it: 114 ms from signal to exit against 64, ops_bench).
Imported in a worker thread instead, the loop went on serving, but under load the first
sync and refresh came so late that the kill loops' daemons (tests/faults) got no sync done
in their short lives: on 2 cores the import then shares the GIL with every request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    https:// only.

    No TLS is ever spoken to an http:// URL (no redirect is followed), so its client skips
    loading the CA bundle: ~40 % of an idle start's CPU after the imports, and 2.6-3.8 MiB.
    """
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_S
        ),
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        verify=url.startswith("https://"),
    )
