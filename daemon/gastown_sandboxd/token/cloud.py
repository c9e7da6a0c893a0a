"""The cloud's refresh endpoint over HTTP: one call, its answer mapped to a token or an error.

It extracts the token from the answer but does not judge it: the refresher checks every
token before anything is written. Error reasons are short codes; bodies are never repeated
(a body may hold a token).

Memory: a refresh comes every few hours, so nothing of it is kept in between: each refresh
makes its own `httpx.AsyncClient` and closes it. Its TLS context reads the system's CA folder
one issuer at a time (`_http.trust_locations`): a context that loaded a whole bundle took
2-4 MiB that the process kept after the client was closed (glibc keeps what it freed). An
`http://` cloud gets no TLS context at all (it never speaks TLS: redirects are not followed).
httpx itself is imported by the first call to the cloud (`_http.cloud_client`), once the
daemon serves: the sync of the desired configuration at start, or a refresh when the token
is not fresh, whichever comes first.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio

from gastown_sandboxd._http import TrustUnavailable, cloud_client, tls_failure
from gastown_sandboxd._types import Clock, SystemClock
from gastown_sandboxd.errors import RefreshError
from gastown_sandboxd.token.schedule import parse_retry_after

if TYPE_CHECKING:
    import httpx  # imported at the first call (`cloud_client`)

REFRESH_PATH = "/api/gastown/refresh-token"
MAX_BODY_BYTES = 64 * 1024
ACCEPT = "application/json, text/plain;q=0.9"

_INACTIVE = frozenset({404, 409, 410, 423})
_UNAUTHORIZED = frozenset({401, 403})


class CloudClient:
    """Calls `POST {base_url}/api/gastown/refresh-token` for one town."""

    def __init__(
        self,
        *,
        base_url: str,
        internal_key: str,
        town_id: str,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`clock` reads HTTP-date `Retry-After` values; the system clock by default."""
        self._clock = clock or SystemClock()
        self._url = base_url.rstrip("/") + REFRESH_PATH
        self._key = internal_key
        self._town_id = town_id
        self._timeout = timeout
        self._transport = transport
        # Only with an injected transport (tests): one client, closed by aclose().
        self._shared: httpx.AsyncClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"CloudClient(url={self._url!r}, town_id={self._town_id!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse further calls (RuntimeError) and close the shared client, if any."""
        self._closed = True
        if self._shared is not None:
            await self._shared.aclose()
            self._shared = None

    def _client(self) -> httpx.AsyncClient:
        return cloud_client(self._url, timeout=self._timeout, transport=self._transport)

    async def refresh(self, current_token: str | None) -> str:
        """A new token from the cloud, as text; raises `RefreshError` with a kind and reason.

        `current_token` (even an expired one) is sent as the Bearer credential.
        """
        headers = {
            "x-internal-api-key": self._key,
            "Accept": ACCEPT,
            # Read the body as sent: a compressed body could expand far past the cap.
            "Accept-Encoding": "identity",
        }
        if current_token is not None:
            headers["Authorization"] = f"Bearer {current_token}"
        if self._closed:
            raise RuntimeError("the cloud client is closed")
        import httpx

        try:
            if self._transport is None:
                http = self._client()
            else:
                http = self._shared = self._shared or self._client()
        except TrustUnavailable as exc:  # its CA file or folder went since the start
            raise RefreshError("outage", "tls_error") from exc
        try:
            # One deadline for the whole exchange: httpx's timeouts are per read.
            with anyio.fail_after(self._timeout):
                async with http.stream(
                    "POST", self._url, json={"townId": self._town_id}, headers=headers
                ) as response:
                    _raise_for_status(response, self._clock.time())
                    body = await _read_capped(response)
        except TimeoutError as exc:
            raise RefreshError("outage", "timeout") from exc
        except httpx.TimeoutException as exc:
            raise RefreshError("outage", "timeout") from exc
        except httpx.TransportError as exc:
            raise RefreshError("outage", _transport_reason(exc)) from exc
        finally:
            if http is not self._shared:
                with anyio.CancelScope(shield=True):
                    await http.aclose()
        return _extract_token(response, body)


def _raise_for_status(response: httpx.Response, now: float) -> None:
    status = response.status_code
    if status == 200:
        return
    reason = f"http_{status}"
    if status in _UNAUTHORIZED:
        raise RefreshError("unauthorized", "unauthorized", status=status)
    if status in _INACTIVE:
        raise RefreshError("inactive", reason, status=status)
    retry_after = _retry_after(response, now)
    if status == 429 or (status == 503 and retry_after is not None):
        raise RefreshError("busy", reason, status=status, retry_after=retry_after)
    if 500 <= status <= 599:
        raise RefreshError("outage", reason, status=status)
    raise RefreshError("broken", reason, status=status)


def _retry_after(response: httpx.Response, now: float) -> float | None:
    value = response.headers.get("retry-after")
    return None if value is None else parse_retry_after(value, now)


async def _read_capped(response: httpx.Response) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RefreshError("broken", "content_encoding", status=response.status_code)
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RefreshError("broken", "body_too_large", status=response.status_code)
    chunks: list[bytes] = []
    size = 0
    # Content-Encoding is identity (checked above), so these are the bytes as sent.
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RefreshError("broken", "body_too_large", status=response.status_code)
        chunks.append(chunk)
    return b"".join(chunks)


def _extract_token(response: httpx.Response, body: bytes) -> str:
    status = response.status_code
    if not body.strip():
        raise RefreshError("broken", "empty_body", status=status)
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RefreshError("broken", "not_utf8", status=status) from exc
    if media_type == "text/plain":
        return text.strip()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise RefreshError("broken", "bad_json", status=status) from exc
        token = _token_in(document)
        if token is None:
            raise RefreshError("broken", "no_token_in_body", status=status)
        return token
    raise RefreshError("broken", "bad_content_type", status=status)


def _token_in(document: Any) -> str | None:
    if not isinstance(document, dict):
        return None
    token = document.get("token")
    if isinstance(token, str):
        return token
    result = document.get("result")
    data = result.get("data") if isinstance(result, dict) else None
    if isinstance(data, dict):
        data = data.get("json")
    return data if isinstance(data, str) else None


def _transport_reason(exc: httpx.TransportError) -> str:
    import httpx

    if tls_failure(exc) is not None:
        return "tls_error"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.ProtocolError):
        return "protocol_error"
    return "transport_error"
