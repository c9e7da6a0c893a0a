"""The HTTP client the daemon calls its cloud with: one configuration for every such call.

httpx is imported by the first call (`import_httpx`), not at start. The daemon's first calls
(the sync of the desired configuration, and a refresh when the token is not fresh) come once
it serves, so its ~25 ms import is no longer before READY. The same import, moved: the CPU of
a start is the same. It runs in a worker thread, so that the event loop goes on serving
meanwhile: imported on the loop, it held a SIGTERM just after READY until it was done (the
stop of a daemon just started took 114 ms instead of 64, `bench/ops_bench.py`).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

import anyio.to_thread

if TYPE_CHECKING:
    import httpx


async def import_httpx() -> None:
    """Import httpx in a worker thread, the first time; a stop meanwhile does not wait for
    it (the thread is abandoned, and the process ends without it)."""
    if "httpx" not in sys.modules:
        await anyio.to_thread.run_sync(importlib.import_module, "httpx", abandon_on_cancel=True)


def cloud_client(
    url: str, *, timeout: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """A client for calls to `url`: one `timeout` per read, no redirects followed, no proxy or
    netrc from the environment, and TLS verified for https:// only.

    No TLS is ever spoken to an http:// URL (no redirect is followed), so its client skips
    loading the CA bundle: ~40 % of an idle start's CPU after the imports, and 2.6-3.8 MiB.
    """
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        transport=transport,
        follow_redirects=False,
        trust_env=False,
        verify=url.startswith("https://"),
    )
