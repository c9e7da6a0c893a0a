"""A small client of the daemon's local socket, for the commands and for agents' tools."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from gastown_sandboxd._http import import_httpcore_without_http2
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

        import_httpcore_without_http2()
        self._socket = Path(socket)
        self._timeout = timeout
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

    def events(
        self,
        *,
        last_event_id: int | None = None,
        follow: bool = False,
        sleep: Callable[[float], object] = time.sleep,
    ) -> Iterator[dict[str, Any]]:
        """Every event from the stream as a dict, after `last_event_id` (None: from now on).

        Without `follow` it ends when the daemon closes the stream (a stop, a restart, the
        socket bound again), and falling behind the stream raises `DaemonUnavailable`.

        With `follow` it goes on across those: once a stream was open, each end or break is
        followed by a new connection that resumes after the last event yielded (ids are
        unique across the daemon's runs, so a new run's events are all replayed, after a gap
        notice), waiting `RECONNECT_FIRST_S` and twice as long at each failed try, up to
        `RECONNECT_CAP_S` (`sleep` waits). Without `last_event_id` it starts from the run's
        newest event as `/status` tells it, so that a break before the first event still
        resumes where the stream began. One line on stderr when the stream is lost and one
        when it is back. Only a daemon that cannot be reached at the start raises.
        """
        if not follow:
            yield from self._stream(last_event_id)
            return
        if last_event_id is None:
            newest = self.get("/status").get("last_event_id")
            last_event_id = newest if isinstance(newest, int) else None
        state = _Following(last_event_id)
        while True:
            try:
                for event in self._stream(state.last_id, opened=state.opened):
                    state.last_id = event.get("id", state.last_id)
                    yield event
                why = "the daemon ended it"
            except DaemonUnavailable as exc:
                if not state.reached:
                    raise
                why = str(exc)
            sleep(state.lost(why))

    def _stream(
        self, last_event_id: int | None, *, opened: Callable[[], object] = lambda: None
    ) -> Iterator[dict[str, Any]]:
        """One connection's events; `opened` is called once the daemon has answered."""
        import httpx
        from httpx_sse import SSEError, connect_sse  # only the `events` command needs it

        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        self._check_socket()
        try:
            with connect_sse(self._http, "GET", "/events", headers=headers) as source:
                if source.response.status_code != 200:
                    raise DaemonUnavailable(
                        f"the daemon answered {source.response.status_code} to GET /events"
                    )
                opened()
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
        except SSEError as exc:
            raise DaemonUnavailable(f"GET /events answered no event stream: {exc}") from None
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None

    def _request(self, method: str, path: str, *, ok: Collection[int]) -> dict[str, Any]:
        import httpx

        self._check_socket()
        try:
            response = self._http.request(method, path)
        except httpx.TimeoutException:
            # A daemon that takes the connection and never answers (its loop blocked, or
            # stopped with SIGSTOP): one line, not httpx's traceback.
            raise DaemonUnavailable(
                f"the daemon at {self._socket} did not answer {method} {path} within "
                f"{self._timeout:g} s"
            ) from None
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


# `DaemonClient.events(follow=True)`: the first wait before connecting again, doubled at
# each failed try up to the cap. A restart by systemd or supervisord takes ~0.3 s to READY.
RECONNECT_FIRST_S = 0.25
RECONNECT_CAP_S = 4.0


class _Following:
    """What `events(follow=True)` keeps between its connections."""

    def __init__(self, last_id: int | None) -> None:
        self.last_id = last_id
        self.reached = False  # some stream was open: from now on a break is waited out
        self._gone = False  # told on stderr that the stream was lost, not yet that it is back
        self._wait = RECONNECT_FIRST_S

    def opened(self) -> None:
        self.reached = True
        self._wait = RECONNECT_FIRST_S
        if self._gone:
            self._gone = False
            print("gastown-sandboxd: the event stream is back", file=sys.stderr)

    def lost(self, why: str) -> float:
        """Tell of the loss once (not at each try); the seconds to wait before the next."""
        if not self._gone:
            self._gone = True
            after = "" if self.last_id is None else f" after event {self.last_id}"
            print(
                f"gastown-sandboxd: the event stream ended ({why}); resuming{after}",
                file=sys.stderr,
            )
        wait, self._wait = self._wait, min(self._wait * 2, RECONNECT_CAP_S)
        return wait


def _unreachable(socket: Path, reason: str) -> str:
    return (
        f"cannot reach the daemon at {socket}: {reason} (is it running? name its socket with "
        "--socket or GASTOWN_SANDBOXD_SOCKET)"
    )
