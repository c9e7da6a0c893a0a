"""The real CloudClient and TokenRefresher against the real cloud, through a chaos proxy.

Each fault must leave the env file byte-identical (never a partial or corrupted token), be
counted and reported with the right kind, and the first refresh after the proxy passes
through again must write a new acceptable token that bash gets by sourcing the file.
"""

from __future__ import annotations

import email.utils
import functools
import itertools
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from gastown_sandboxd._types import Clock
from gastown_sandboxd.errors import RefreshError
from gastown_sandboxd.events.types import DomainEvent
from gastown_sandboxd.token import envfile
from gastown_sandboxd.token.claims import TokenView, acceptability_reasons, fingerprint
from gastown_sandboxd.token.cloud import CloudClient
from gastown_sandboxd.token.refresher import State, TokenRefresher
from tests.daemon.simclock import SimulatedClock
from tests.fixtures.cloud import CloudServer, launch_cloud

from .chaos_proxy import ChaosProxy, Fault, Mode, chaos_proxy

HOUR = 3600
# Short enough that a stall costs a second, long enough for a loaded CI machine.
TIMEOUT = 1.0
HOSTILE_BODY = b"$(touch pwned)\n"
HOSTILE_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + f"Content-Length: {len(HOSTILE_BODY)}\r\n\r\n".encode()
    + HOSTILE_BODY
)
DISCONNECTED = {"protocol_error", "transport_error"}


@pytest.fixture(scope="module")
def chaos_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudServer]:
    """One real cloud for the whole suite (each test makes its own town)."""
    server = launch_cloud(tmp_path_factory.mktemp("chaos-cloud"))
    yield server
    server.stop()


@pytest.fixture
async def proxy(chaos_cloud: CloudServer) -> AsyncIterator[ChaosProxy]:
    """A chaos proxy in front of the cloud, passing through until told otherwise."""
    async with chaos_proxy(chaos_cloud.url) as running:
        yield running


class Sandbox:
    """A refresher behind the proxy: a real env file, a real CloudClient, the events it emits."""

    def __init__(
        self, town_id: str, env: Path, old_token: str, client: CloudClient, clock: Clock
    ) -> None:
        self.town_id = town_id
        self.env = env
        self.old_token = old_token
        self.clock = clock
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.refreshed = anyio.Event()
        self.refresher = TokenRefresher(
            town_id=town_id, env_file=env, client=client, emit=self.emit, clock=clock
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[TokenRefresher]:
        """The refresher's loop, as the daemon runs it, until the block ends."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.refresher.run)
            yield self.refresher
            tg.cancel_scope.cancel()

    async def force(self) -> TokenView:
        """A forced refresh, 2 s after the last call on a clock that stands still: calls to
        the cloud keep that gap (CONTRACT §3), forced ones too."""
        if isinstance(self.clock, SimulatedClock) and not self.clock.autojump:
            self.clock.advance(2)
        return await self.refresher.refresh_now()

    def emit(self, event: DomainEvent) -> None:
        self.events.append((event.TYPE, event.fields()))
        if event.TYPE == "token.refreshed":
            self.refreshed.set()

    def assert_untouched(self, before: bytes) -> None:
        """The env file is exactly as it was, and no temporary file was left beside it."""
        assert self.env.read_bytes() == before
        assert sorted(os.listdir(self.env.parent)) == [self.env.name]

    def assert_fresh(self, view: TokenView) -> str:
        """A new acceptable token is on disk, bash sources it, the other lines are kept."""
        token = envfile.read_token(self.env)
        assert token is not None
        assert token != self.old_token
        assert acceptability_reasons(token, town_id=self.town_id, now=time.time()) == []
        assert view.fingerprint == fingerprint(token)
        assert sourced_token(self.env) == token
        text = self.env.read_text()
        assert text == f"# gateway\nexport OTHER=keep-me\nKILO_JWT={token}\nLAST=1\n"
        assert os.stat(self.env).st_mode & 0o777 == 0o600
        assert sorted(os.listdir(self.env.parent)) == [self.env.name]
        status = self.refresher.status()
        assert (status.state, status.consecutive_failures) == (State.FRESH, 0)
        assert self.events[-1][0] == "token.refreshed"
        return token


MakeSandbox = Callable[..., Awaitable[Sandbox]]


@pytest.fixture
async def make_sandbox(
    chaos_cloud: CloudServer, proxy: ChaosProxy, tmp_path: Path
) -> AsyncIterator[MakeSandbox]:
    """Build sandboxes for new towns: `await make_sandbox(timeout=1.0, clock=…, age=1 h)`.

    The default clock stands still at the real time, so the refresher's loop never fires by
    itself: only forced refreshes call the cloud.
    """
    clients: list[CloudClient] = []

    async def make(
        *, timeout: float = TIMEOUT, clock: Clock | None = None, age: int = HOUR
    ) -> Sandbox:
        clock = clock or SimulatedClock(time.time(), autojump=False)
        create = functools.partial(chaos_cloud.create_town, f"user-{len(clients)}", name="chaos")
        town, _ = await anyio.to_thread.run_sync(create)
        old = chaos_cloud.mint(town["userId"], town["id"], now=int(clock.time()) - age)
        folder = tmp_path / f"sandbox-{len(clients)}"
        folder.mkdir()
        env = folder / ".env.gateway"
        env.write_text(f"# gateway\nexport OTHER=keep-me\nKILO_JWT={old}\nLAST=1\n")
        client = CloudClient(
            base_url=proxy.url,
            internal_key=chaos_cloud.internal_key,
            town_id=town["id"],
            timeout=timeout,
            clock=clock,
        )
        clients.append(client)
        return Sandbox(town["id"], env, old, client, clock)

    yield make
    for client in clients:
        await client.aclose()


def sourced_token(env: Path) -> str:
    """What bash gets for KILO_JWT after `set -a; . FILE; set +a`."""
    script = 'set -a; . "$1"; set +a; printf %s "$KILO_JWT"'
    done = subprocess.run(
        ["bash", "-c", script, "bash", str(env)],
        capture_output=True,
        check=True,
        cwd=env.parent,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=10,
    )
    return done.stdout.decode()


FAULTS = [
    pytest.param(Fault(Mode.RESET), "outage", DISCONNECTED, id="reset-on-accept"),
    pytest.param(Fault(Mode.RESET_AFTER_REQUEST), "outage", DISCONNECTED, id="reset-after-request"),
    pytest.param(Fault(Mode.STALL), "outage", {"timeout"}, id="stall"),
    # Each byte comes well within httpx's read timeout: only the whole-exchange deadline ends it.
    pytest.param(Fault(Mode.DRIBBLE, delay=0.05), "outage", {"timeout"}, id="slow-dribble"),
    pytest.param(Fault(Mode.TRUNCATE, keep=40), "outage", {"protocol_error"}, id="truncate"),
    pytest.param(
        Fault(Mode.TRUNCATE, keep=40, framed=False), "broken", {"bad_json"}, id="truncate-unframed"
    ),
    pytest.param(Fault(Mode.STORM), "outage", {"http_503"}, id="503"),
    pytest.param(Fault(Mode.STORM, status=500), "outage", {"http_500"}, id="500"),
    pytest.param(Fault(Mode.STORM, status=429), "busy", {"http_429"}, id="429"),
    pytest.param(Fault(Mode.GARBAGE), "outage", {"protocol_error"}, id="garbage"),
    pytest.param(
        Fault(Mode.GARBAGE, garbage=HOSTILE_200), "broken", {"unacceptable_token"}, id="hostile-200"
    ),
]


@pytest.mark.parametrize(("fault", "kind", "reasons"), FAULTS)
async def test_fault_keeps_the_last_good_token(
    make_sandbox: MakeSandbox, proxy: ChaosProxy, fault: Fault, kind: str, reasons: set[str]
) -> None:
    """A faulty exchange leaves the file as it was, is counted and reported; the next one heals."""
    sandbox = await make_sandbox()
    before = sandbox.env.read_bytes()
    async with sandbox.running() as refresher:
        proxy.set(fault)
        with pytest.raises(RefreshError) as caught:
            await sandbox.force()
        assert caught.value.kind == kind, caught.value
        assert caught.value.reason in reasons, caught.value
        sandbox.assert_untouched(before)
        status = refresher.status()
        assert (status.state, status.consecutive_failures) == (State.DEGRADED, 1)
        assert status.last_failure == caught.value.reason
        assert status.token is not None
        assert status.token.fingerprint == fingerprint(sandbox.old_token)
        ((event, fields),) = sandbox.events
        assert event == "token.refresh_failed"
        assert (fields["reason"], fields["consecutive_failures"]) == (caught.value.reason, 1)
        assert not (sandbox.env.parent / "pwned").exists()

        proxy.set(Fault())
        sandbox.assert_fresh(await sandbox.force())
    assert [hit.mode for hit in proxy.hits] == [fault.mode, Mode.PASS]


async def test_token_cut_inside_its_signature_is_refused(
    chaos_cloud: CloudServer, make_sandbox: MakeSandbox, proxy: ChaosProxy
) -> None:
    """A 200 whose close-delimited text/plain body lost the signature's tail is not written."""
    sandbox = await make_sandbox()
    cut = chaos_cloud.mint("user-0", sandbox.town_id)[:-3]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    proxy.set(Fault(Mode.GARBAGE, garbage=head + cut.encode()))
    before = sandbox.env.read_bytes()
    async with sandbox.running():
        with pytest.raises(RefreshError) as caught:
            await sandbox.force()
    assert (caught.value.kind, caught.value.reason) == ("broken", "unacceptable_token")
    assert envfile.read_token(sandbox.env) != cut
    sandbox.assert_untouched(before)
    ((event, fields),) = sandbox.events
    assert event == "token.refresh_failed"
    assert (fields["status"], fields["problems"]) == (200, ["bad_signature"])


async def test_dribbled_answer_within_the_deadline_is_read_whole(
    make_sandbox: MakeSandbox, proxy: ChaosProxy
) -> None:
    """An answer sent one byte at a time still gives the exact token when it ends in time."""
    sandbox = await make_sandbox(timeout=10.0)
    proxy.set(Fault(Mode.DRIBBLE, delay=0.0005))
    async with sandbox.running():
        sandbox.assert_fresh(await sandbox.force())
    assert [hit.mode for hit in proxy.hits] == [Mode.DRIBBLE]


async def test_failures_in_a_row_are_counted_then_cleared(
    make_sandbox: MakeSandbox, proxy: ChaosProxy
) -> None:
    """Three different faults count 1, 2, 3 failures in events and status; a success clears them."""
    sandbox = await make_sandbox()
    before = sandbox.env.read_bytes()
    faults = [Fault(Mode.RESET), Fault(Mode.STALL), Fault(Mode.TRUNCATE)]
    async with sandbox.running() as refresher:
        for count, fault in enumerate(faults, start=1):
            proxy.set(fault)
            with pytest.raises(RefreshError):
                await sandbox.force()
            assert refresher.status().consecutive_failures == count
            sandbox.assert_untouched(before)
        counts = [fields["consecutive_failures"] for _, fields in sandbox.events]
        assert counts == [1, 2, 3]
        proxy.set(Fault())
        sandbox.assert_fresh(await sandbox.force())


async def test_busy_answer_sets_the_next_attempt_after_retry_after(
    make_sandbox: MakeSandbox, proxy: ChaosProxy
) -> None:
    """A 503 with Retry-After is "busy", and the next attempt is planned no sooner."""
    clock = SimulatedClock(time.time(), autojump=False)
    sandbox = await make_sandbox(clock=clock)
    proxy.set(Fault(Mode.STORM, retry_after="120"))
    async with sandbox.running() as refresher:
        with pytest.raises(RefreshError) as caught:
            await sandbox.force()
        assert (caught.value.kind, caught.value.retry_after) == ("busy", 120.0)
        status = refresher.status()
        assert status.next_refresh_at == clock.time() + 120


def _http_date(clock: SimulatedClock, ahead: float) -> str:
    return email.utils.formatdate(clock.time() + ahead, usegmt=True)


@pytest.mark.parametrize(
    ("retry_after", "storms", "least", "most"),
    [
        pytest.param(lambda clock: "120", 3, 120.0, 120.001, id="seconds"),
        pytest.param(lambda clock: "3600", 2, 299.999, 300.001, id="capped-at-300"),
        pytest.param(lambda clock: _http_date(clock, 200), 1, 198.999, 200.001, id="http-date"),
    ],
)
async def test_storm_loop_waits_at_least_retry_after(
    make_sandbox: MakeSandbox,
    proxy: ChaosProxy,
    retry_after: Callable[[SimulatedClock], str],
    storms: int,
    least: float,
    most: float,
) -> None:
    """The running refresher waits Retry-After (capped at 300 s) between attempts in a 503 storm."""
    clock = SimulatedClock(time.time(), autojump=True)
    # Past its half-life, the token is refreshed as soon as the refresher starts.
    sandbox = await make_sandbox(clock=clock, age=13 * HOUR)
    proxy.stamp = clock.time
    proxy.set(Fault(Mode.STORM, retry_after=retry_after(clock)), times=storms)
    with anyio.fail_after(10):
        async with sandbox.running():
            await sandbox.refreshed.wait()
    assert [hit.mode for hit in proxy.hits] == [Mode.STORM] * storms + [Mode.PASS]
    stamps = [hit.at for hit in proxy.hits]
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    assert all(least <= gap <= most for gap in gaps), gaps
    failed = [fields for kind, fields in sandbox.events if kind == "token.refresh_failed"]
    assert [fields["status"] for fields in failed] == [503] * storms
    sandbox.assert_fresh(_view(sandbox))


def _view(sandbox: Sandbox) -> TokenView:
    status = sandbox.refresher.status()
    assert status.token is not None
    return status.token


async def test_proxy_passes_the_cloud_through_byte_for_byte(
    chaos_cloud: CloudServer, proxy: ChaosProxy
) -> None:
    """Pass-through gives the cloud's own answers; each request is one connection and one hit."""
    create = functools.partial(chaos_cloud.create_town, "user-direct", name="direct")
    town, initial = await anyio.to_thread.run_sync(create)
    for base in (chaos_cloud.url, proxy.url, proxy.url):
        async with CloudClient(
            base_url=base, internal_key=chaos_cloud.internal_key, town_id=town["id"]
        ) as client:
            token = await client.refresh(initial)
        assert acceptability_reasons(token, town_id=town["id"], now=time.time()) == []
    assert [hit.mode for hit in proxy.hits] == [Mode.PASS, Mode.PASS]
