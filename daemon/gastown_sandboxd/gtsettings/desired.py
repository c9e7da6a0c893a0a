"""The cloud's desired configuration over HTTP: read it, report how applying it went.

`GET {cloud}/api/gastown/towns/{town}/config` and `POST …/config/status`, each with
`x-internal-api-key` and the current token as Bearer, one deadline for the whole exchange
(as the token's `CloudClient`). Every failure is a `DesiredConfigUnavailable` whose `status`
is what `POST /config/sync` answers: 504 for a timeout, 503 when the cloud cannot be reached
or says it is busy (503, 429), 502 for any other answer. Bodies the cloud sends are never
repeated in errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import anyio

from gastown_sandboxd._http import TrustUnavailable, cloud_client, tls_failure
from gastown_sandboxd.errors import DesiredConfigUnavailable

if TYPE_CHECKING:
    import httpx  # imported at the first call (`cloud_client`)

CONFIG_PATH = "/api/gastown/towns/{town}/config"
STATUS_PATH = "/api/gastown/towns/{town}/config/status"
MAX_BODY_BYTES = 1024 * 1024
REPORT_TIMEOUT = 4.0


@dataclass(frozen=True, slots=True)
class DesiredConfig:
    """What the cloud wants: `desired` (a PATCH /config body) at `generation`."""

    generation: int
    desired: dict[str, Any]
    observed_generation: int | None = None
    state: str | None = None


class DesiredConfigClient:
    """Reads one town's desired configuration and reports its status to the cloud."""

    def __init__(
        self,
        *,
        base_url: str,
        internal_key: str,
        town_id: str,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        town = quote(town_id, safe="")
        self._config_url = base + CONFIG_PATH.format(town=town)
        self._status_url = base + STATUS_PATH.format(town=town)
        self._key = internal_key
        self._timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"DesiredConfigClient(url={self._config_url!r})"

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
        if self._client is not None:
            await self._client.aclose()

    @property
    def _http(self) -> httpx.AsyncClient:
        # Made at the first call, not at start: building its TLS context costs start-up time.
        if self._client is None:
            self._client = cloud_client(
                self._config_url, timeout=self._timeout, transport=self._transport
            )
        return self._client

    async def fetch(self, bearer: str | None) -> DesiredConfig:
        """The desired configuration; raises `DesiredConfigUnavailable`."""
        status, body = await self._exchange("GET", self._config_url, bearer, None)
        if status != 200:
            raise _refused(status, "read the desired configuration")
        return _parse(body)

    async def report(
        self,
        bearer: str | None,
        *,
        observed_generation: int,
        revision: str,
        error: Mapping[str, Any] | None,
    ) -> None:
        """`POST …/config/status`; raises `DesiredConfigUnavailable` unless the cloud takes it."""
        payload = {"observedGeneration": observed_generation, "revision": revision, "error": error}
        # Shorter than a read: the sync's answer waits for it, and the next sync reports again.
        deadline = min(self._timeout, REPORT_TIMEOUT)
        status, _ = await self._exchange("POST", self._status_url, bearer, payload, deadline)
        if not 200 <= status <= 204:
            raise _refused(status, "take the sync's status")

    async def _exchange(
        self,
        method: str,
        url: str,
        bearer: str | None,
        payload: object,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        import httpx

        timeout = self._timeout if timeout is None else timeout
        headers = {
            "x-internal-api-key": self._key,
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            # One deadline for the whole exchange: httpx's timeouts are per read.
            with anyio.fail_after(timeout):
                async with self._http.stream(
                    method, url, headers=headers, json=payload
                ) as response:
                    return response.status_code, await _read_capped(response)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise DesiredConfigUnavailable(
                504, "timeout", f"the cloud did not answer within {timeout:g} s"
            ) from exc
        except httpx.ConnectError as exc:
            failure = tls_failure(exc)
            if failure is not None:
                raise DesiredConfigUnavailable(
                    502, "tls_error", f"the cloud's TLS was refused: {failure}"
                ) from exc
            raise DesiredConfigUnavailable(
                503, "connect_error", "the cloud cannot be reached (connection failed)"
            ) from exc
        except TrustUnavailable as exc:  # its CA file or folder went since the start
            raise DesiredConfigUnavailable(502, "tls_error", str(exc)) from exc
        except httpx.TransportError as exc:
            raise DesiredConfigUnavailable(
                502, "transport_error", f"the exchange with the cloud broke ({type(exc).__name__})"
            ) from exc


def _refused(status: int, what: str) -> DesiredConfigUnavailable:
    if status in (429, 503):
        return DesiredConfigUnavailable(503, f"http_{status}", f"the cloud is busy ({status})")
    if status in (401, 403):
        message = f"the cloud refused to {what}: the key or the token was refused ({status})"
        return DesiredConfigUnavailable(502, "unauthorized", message)
    if status in (404, 409, 410, 423):
        message = f"the cloud refused to {what}: the town is unknown or not active ({status})"
        return DesiredConfigUnavailable(502, "town_inactive", message)
    return DesiredConfigUnavailable(502, f"http_{status}", f"the cloud answered {status}")


async def _read_capped(response: httpx.Response) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # A compressed body could expand far past the cap.
        raise DesiredConfigUnavailable(502, "content_encoding", "the cloud's answer is compressed")
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise DesiredConfigUnavailable(502, "body_too_large", "the cloud's answer is too large")
    chunks: list[bytes] = []
    size = 0
    # Content-Encoding is identity (checked above), so these are the bytes as sent.
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise DesiredConfigUnavailable(502, "body_too_large", "the cloud's answer is too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> DesiredConfig:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise DesiredConfigUnavailable(502, "bad_json", "the cloud's answer is not JSON") from exc
    if not isinstance(document, dict):
        raise DesiredConfigUnavailable(502, "bad_body", "the cloud's answer is not an object")
    generation = document.get("generation")
    desired = document.get("desired")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        raise DesiredConfigUnavailable(
            502, "bad_body", "the cloud's answer has no generation (a whole number)"
        )
    if desired is None:
        desired = {}
    if not isinstance(desired, dict):
        raise DesiredConfigUnavailable(502, "bad_body", "the cloud's desired is not an object")
    observed = document.get("observedGeneration")
    state = document.get("state")
    return DesiredConfig(
        generation=generation,
        desired=desired,
        observed_generation=observed if _is_int(observed) else None,
        state=state if isinstance(state, str) else None,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def error_report(message: str, details: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The `error` of a status report: `{"message", "details"}`."""
    return {"message": message, "details": [dict(detail) for detail in details]}
