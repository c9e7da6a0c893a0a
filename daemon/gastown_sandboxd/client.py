"""A small client of the daemon's local socket, for the commands and for agents' tools."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Collection, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from gastown_sandboxd.errors import GastownError

if TYPE_CHECKING:
    import httpx
    from _typeshed import StrPath


class DaemonUnavailable(GastownError):
    """The daemon's socket does not answer, or answered with an error."""


def running_daemon_env_file(socket: Path) -> Path | None:
    """The env file the daemon on `socket` writes (its `/status`); None when none answers."""
    import httpx  # as `DaemonClient` does; named here for its errors below

    try:
        with DaemonClient(socket, timeout=5.0) as client:
            value = client.get("/status").get("env_file")
    except (DaemonUnavailable, httpx.HTTPError, OSError, ValueError):
        return None
    return Path(value) if isinstance(value, str) and value else None


class DaemonClient:
    """`with DaemonClient(socket) as c: c.get("/status")`."""

    def __init__(self, socket: StrPath, *, timeout: float | None = 10.0) -> None:
        # Imported here: `exec` and the daemon itself rarely need an HTTP client (2-3 MiB).
        import httpx

        self._socket = Path(socket)
        self._http: httpx.Client = httpx.Client(
            # A Unix socket never speaks TLS: skip loading the CA bundle on every command.
            transport=httpx.HTTPTransport(uds=str(socket), verify=False),
            base_url="http://gastown-sandboxd",
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._http.close()

    def _check_socket(self) -> None:
        """Fail with a clear message before httpx tries (httpcore leaks a refused socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(5.0)
            try:
                probe.connect(str(self._socket))
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise DaemonUnavailable(_unreachable(self._socket, reason)) from None

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path, ok=(200,))

    def post(self, path: str, *, ok: Collection[int] = (200,)) -> dict[str, Any]:
        return self._request("POST", path, ok=ok)

    def events(self, *, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Every event from the stream as a dict; ends when the daemon closes it."""
        import httpx
        from httpx_sse import connect_sse  # only the `events` command needs it

        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        self._check_socket()
        try:
            with connect_sse(self._http, "GET", "/events", headers=headers) as source:
                for sse in source.iter_sse():
                    if not sse.data:
                        # httpx-sse turns a heartbeat comment after an `id:` into an empty event.
                        continue
                    if sse.event == "lagged":
                        raise DaemonUnavailable(
                            "fell behind the event stream; reconnect with --last-event-id"
                        )
                    if sse.event == "gap":
                        gap = json.loads(sse.data)
                        print(
                            "gastown-sandboxd: events after "
                            f"{gap.get('last_event_id')} are gone; the stream resumes at "
                            f"{gap.get('first_available_id')}",
                            file=sys.stderr,
                        )
                        continue
                    yield json.loads(sse.data)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None

    def _request(self, method: str, path: str, *, ok: Collection[int]) -> dict[str, Any]:
        import httpx

        self._check_socket()
        try:
            response = self._http.request(method, path)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code not in ok or not isinstance(body, dict):
            message = body.get("message") if isinstance(body, dict) else response.text[:200]
            raise DaemonUnavailable(f"the daemon answered {response.status_code}: {message}")
        return body

    def _unavailable(self, exc: Exception) -> DaemonUnavailable:
        return DaemonUnavailable(_unreachable(self._socket, str(exc)))


def _unreachable(socket: Path, reason: str) -> str:
    return (
        f"cannot reach the daemon at {socket}: {reason} (is it running? name its socket with "
        "--socket or GASTOWN_SANDBOXD_SOCKET)"
    )
