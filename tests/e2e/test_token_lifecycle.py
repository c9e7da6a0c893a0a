"""The token's life end to end (issue 3): real cloud, real daemon, real env file, real bash.

Scheduled refreshes reach bash, `exec` and the cloud's gateway; a stopped or destroyed town
goes inactive and a forced refresh brings it back; pushed tokens pass the sandbox's checks;
start-up repairs a bad env file, and a running daemon one rewritten without its token; and
SIGKILL at any moment never leaves a bad env file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gastown_cloud.tokens import verify_gastown_token
from gastown_sandboxd.token.claims import acceptability_reasons, decode_unverified, fingerprint
from gastown_sandboxd.token.envfile import read_env_values
from tests.e2e._town import (
    EventStream,
    Town,
    cli,
    client_env,
    create_town,
    env_text,
    metric_value,
    source_token,
    start_daemon,
    token_fingerprint_is,
    wait_for_state,
    wait_for_status,
    write_env,
)
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess, make_town
from tests.waiting import wait_until

MODEL = "anthropic/claude-sonnet-4.5"
PRINT_TOKENS = 'printf "%s %s" "$ANTHROPIC_AUTH_TOKEN" "$KILOCODE_TOKEN"'


def _gateway(town: Town, token: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{town.cloud.url}/api/gateway/chat/completions"
    return httpx.post(url, json=body, headers=headers, timeout=10)


def _without_token_line(text: str) -> str:
    return "".join(line for line in text.splitlines(True) if not line.startswith("KILO_JWT="))


def _cloud_log(cloud: CloudServer) -> list[dict[str, Any]]:
    records = []
    for line in cloud.log_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def _issued_after(iat: int) -> Callable[[dict[str, Any]], bool]:
    return lambda event: bool(event["iat"] > iat)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_three_scheduled_refreshes_reach_bash_exec_and_the_gateway(
    cloud_factory: Callable[..., CloudServer], daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """With 20 s tokens the daemon refreshes on schedule three times; each token works anywhere."""
    cloud = cloud_factory(token_lifetime=20)
    town = create_town(cloud, user_id="user-lc", org="org-lc")
    # Issued 7 s ago, its refresh point (8–10 s after issue) is near: less waiting, same schedule.
    first = town.mint(now=int(time.time()) - 7)
    env_file = write_env(tmp_path / "home" / ".env.gateway", first)
    daemon = start_daemon(daemon_factory, town, env_file)
    # A slow start may reach the refresh point before ready: either way the provisioned token is
    # held, and the first refresh below comes no earlier than its refresh point.
    assert daemon.wait_for_log("daemon_ready")["state"] in {"fresh", "refreshing"}
    previous = decode_unverified(first)
    used = len(cloud.usage(town.id))
    agent_env = client_env(daemon, town.id)
    with EventStream(daemon.socket) as stream, daemon.local() as local:
        for round_ in range(1, 4):
            event = stream.wait_for(
                "token.refreshed", where=_issued_after(previous.iat), deadline=20
            )
            assert event["source"] == "cloud"
            # Not before the refresh point less the jitter window, and before the old one expired.
            assert event["iat"] - previous.iat >= 8
            assert event["iat"] < previous.exp
            assert event["exp"] - event["iat"] == 20

            token = source_token(env_file)
            claims = decode_unverified(token)
            assert (claims.iat, claims.exp) == (event["iat"], event["exp"])
            assert acceptability_reasons(token, town_id=town.id, now=time.time()) == []
            status = local.get("/status").json()
            assert status["token"]["fingerprint"] == fingerprint(token)
            assert (status["token"]["sub"], status["token"]["organization_id"]) == (
                "user-lc",
                "org-lc",
            )
            assert env_file.read_text() == env_text(token)
            assert _mode(env_file) == 0o600

            done = cli("exec", "--", "bash", "-c", PRINT_TOKENS, env=agent_env)
            assert (done.returncode, done.stdout, done.stderr) == (0, f"{token} {token}", "")

            assert _gateway(town, token).status_code == 200
            usage = cloud.usage(town.id)
            assert len(usage) == used + round_
            assert {k: usage[-1][k] for k in ("userId", "organizationId", "townId", "model")} == {
                "userId": "user-lc",
                "organizationId": "org-lc",
                "townId": town.id,
                "model": MODEL,
            }
            previous = claims
        refreshed = [e for e in stream.events if e["type"] == "token.refreshed"]
        failed = [e for e in stream.events if e["type"] == "token.refresh_failed"]
    assert len(refreshed) >= 3
    assert failed == []
    print(f"scheduled refreshes at iat {[e['iat'] - refreshed[0]['iat'] for e in refreshed]}")


def test_a_stopped_then_destroyed_town_goes_inactive_and_a_forced_refresh_recovers(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """409 and 410 from the cloud make the town inactive; the API keeps serving; start recovers."""
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file)
    with EventStream(daemon.socket) as stream, daemon.local() as local, daemon.tcp() as tcp:
        cloud.set_status(town.id, "stop")
        held = env_file.read_bytes()
        answer = local.post("/token/refresh")
        assert answer.status_code == 409
        body = answer.json()
        assert body["error"] == "town_inactive"
        assert body["details"][0]["status"] == 409
        event = stream.wait_for("town.inactive")
        assert event["status"] == 409
        status = local.get("/status").json()
        assert status["state"] == "town_inactive"
        # Regular refresh stops: the next call is the hourly probe.
        next_at = datetime.fromisoformat(status["next_refresh_at"]).timestamp()
        assert next_at - time.time() > 3500
        assert env_file.read_bytes() == held
        # The API keeps serving.
        assert tcp.get("/healthz").status_code == 200
        assert tcp.get("/status").json()["state"] == "town_inactive"
        assert tcp.get("/config").status_code == 200
        metrics = tcp.get("/metrics").text
        assert (
            metric_value(
                metrics,
                "gastown_sandboxd_token_state",
                gastown_sandboxd_token_state="town_inactive",
            )
            == 1
        )
        inactive = "gastown_sandboxd_token_refresh_attempts_total"

        cloud.set_status(town.id, "start")
        # The cloud mints by the second: in the second of the town's own token it would hand
        # that one back, which the daemon keeps with the schedule it had (a run that fit in
        # one second failed the check of the next refresh below). A new second, a new token.
        iat = decode_unverified(town.token).iat
        wait_until(lambda: time.time() >= iat + 1, deadline=5, what="the next second")
        # The attempts counted by the daemon: only the forced one while the town was stopped.
        assert metric_value(tcp.get("/metrics").text, inactive, result="inactive") == 1
        answer = local.post("/token/refresh")
        assert answer.status_code == 200, answer.text
        status = local.get("/status").json()
        assert status["state"] == "fresh"
        assert status["token"]["fingerprint"] == answer.json()["token"]["fingerprint"]
        assert fingerprint(source_token(env_file)) == status["token"]["fingerprint"]
        assert datetime.fromisoformat(status["next_refresh_at"]).timestamp() - time.time() > 3600

        refreshed = time.time()
        cloud.set_status(town.id, "destroy")
        held = env_file.read_bytes()
        # Within the least gap (2 s) after a call that brought a token, a forced refresh is
        # answered with that token and calls nobody (the refresher's tests show it on a
        # simulated clock); after it, the next one finds the news.
        wait_until(lambda: time.time() > refreshed + 2.0, deadline=5, what="the least gap")
        answer = local.post("/token/refresh")
        assert answer.status_code == 409
        assert answer.json()["details"][0]["status"] == 410
        event = stream.wait_for("town.inactive", where=lambda e: e["status"] == 410)
        assert local.get("/status").json()["state"] == "town_inactive"
        assert tcp.get("/healthz").status_code == 200
        assert env_file.read_bytes() == held
        assert metric_value(tcp.get("/metrics").text, inactive, result="inactive") == 2


def test_a_refresh_writes_where_a_symlinked_env_file_leads_and_keeps_the_link(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`~/.env.gateway` a link to a file on a volume: the refreshed token is in that file,
    which bash reads through the link, and the link stays a link (a reviewer: the first
    write replaced it with a file of its own; the volume's file kept the old token)."""
    town = create_town(cloud)
    target = write_env(tmp_path / "volume" / "env.gateway", town.token)
    link = tmp_path / "home" / ".env.gateway"
    link.parent.mkdir()
    link.symlink_to(target)
    daemon = start_daemon(daemon_factory, town, link)
    with daemon.local() as local:
        wait_until(lambda: time.time() >= decode_unverified(town.token).iat + 1, deadline=5)
        answer = local.post("/token/refresh")
        answered = time.time()  # the call has ended: the least gap (2 s) counts from before
        assert answer.status_code == 200, answer.text
        refreshed = answer.json()["token"]["fingerprint"]
        assert link.is_symlink()
        assert os.readlink(link) == str(target)
        assert fingerprint(source_token(link)) == refreshed
        assert _mode(target) == 0o600
        # The link swapped for a file of its own (`sed -i` does that): the next write goes
        # there, since where the path leads is looked up at each write.
        swapped = link.with_name(".swapped")
        swapped.write_text(f"EDITED=1\nKILO_JWT={source_token(link)}\n")
        swapped.chmod(0o600)
        swapped.replace(link)
        wait_until(lambda: time.time() >= answered + 2.05, deadline=5, what="the least gap")
        again = local.post("/token/refresh")
        assert again.status_code == 200, again.text
    assert again.json()["token"]["fingerprint"] != refreshed
    assert not link.is_symlink()
    assert fingerprint(source_token(link)) == again.json()["token"]["fingerprint"]
    assert link.read_text().startswith("EDITED=1\n")
    assert fingerprint(source_token(target)) == refreshed


def test_put_token_accepts_a_cloud_token(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A token the cloud mints for this town, pushed with the key, lands in the env file."""
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file)
    pushed = town.mint(now=int(time.time()) - 30)
    assert pushed != town.token
    with EventStream(daemon.socket) as stream, daemon.tcp() as tcp:
        answer = tcp.put("/token", json={"token": pushed})
        assert answer.status_code == 200, answer.text
        assert answer.json()["token"]["fingerprint"] == fingerprint(pushed)
        assert pushed not in answer.text
        event = stream.wait_for("token.refreshed", where=lambda e: e["source"] == "push")
        assert event["iat"] == decode_unverified(pushed).iat
        assert env_file.read_text() == env_text(pushed)
        assert _mode(env_file) == 0o600
        assert source_token(env_file) == pushed
        # The same token again changes nothing and announces nothing.
        before = env_file.stat()
        assert tcp.put("/token", json={"token": pushed}).status_code == 200
        assert env_file.stat().st_ino == before.st_ino
        assert tcp.get("/status").json()["token"]["fingerprint"] == fingerprint(pushed)
        # The next new token is the second event: the repeated one announced nothing.
        newer = town.mint(now=int(time.time()) - 20)
        assert tcp.put("/token", json={"token": newer}).status_code == 200
        stream.wait_for("token.refreshed", where=lambda e: e["iat"] == decode_unverified(newer).iat)
        assert [e["type"] for e in stream.events] == ["token.refreshed"] * 2


@pytest.mark.parametrize("case", ["no token line", "no file", "expired", "another town's"])
def test_a_bad_env_file_at_start_is_refreshed_at_once(
    cloud_factory: Callable[..., CloudServer],
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    case: str,
) -> None:
    """A daemon whose env file has no usable token gets a fresh one as it starts: an expired
    token of the town binds the refresh; with none, the cloud must allow key-only refresh."""
    flags = [] if case == "expired" else ["--allow-unbound-refresh"]
    cloud = cloud_factory(flags=flags)
    town = create_town(cloud)
    env_file = tmp_path / "home" / ".env.gateway"
    old: str | None = None
    if case == "no token line":
        write_env(env_file, None)
    elif case == "expired":
        old = town.mint(lifetime=20, now=int(time.time()) - 100)
    elif case == "another town's":
        old = create_town(cloud, user_id="user-other").token
    if old is not None:
        write_env(env_file, old)
    daemon = start_daemon(daemon_factory, town, env_file)
    status = wait_for_state(daemon, "fresh", deadline=10)
    token = source_token(env_file)
    assert token != old
    assert acceptability_reasons(token, town_id=town.id, now=time.time()) == []
    assert status["token"]["fingerprint"] == fingerprint(token)
    kept = "" if case == "no file" else env_text(None)
    assert _without_token_line(env_file.read_text()) == kept
    assert _mode(env_file) == 0o600
    # The cloud's own log names the token it minted for this town.
    minted = [r for r in _cloud_log(cloud) if r.get("event") == "token_refreshed"]
    assert {"town_id": town.id, "token": fingerprint(token)} in [
        {"town_id": r["town_id"], "token": r["token"]} for r in minted
    ]


def test_an_env_files_folder_made_again_is_followed(
    cloud_factory: Callable[..., CloudServer], daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """The env file's folder renamed away and made again with another token of the town (a
    home folder restored from a backup): the daemon adopts that token, and its next refresh
    lands in the new folder. Before, it went on holding the old token and never saw the file
    come back."""
    cloud = cloud_factory()
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file)
    wait_for_state(daemon, "fresh")
    env_file.parent.rename(tmp_path / "home.old")
    restored = town.mint(now=int(time.time()) - 30)  # not the token it holds
    assert restored != town.token
    write_env(env_file, restored)
    wait_for_status(daemon, token_fingerprint_is(fingerprint(restored)))
    with daemon.local() as client:
        refreshed = client.post("/token/refresh").raise_for_status().json()["token"]
    token = source_token(env_file)
    assert token != restored
    assert refreshed["fingerprint"] == fingerprint(token)
    assert acceptability_reasons(token, town_id=town.id, now=time.time()) == []
    assert source_token(tmp_path / "home.old" / ".env.gateway") == town.token


def test_an_env_file_rewritten_without_its_token_gets_it_back_and_refreshes_still_bind(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Someone rewrites the env file with its other lines but no token line: the daemon puts
    its token back (bash sourcing it gets it again), and the next refresh still carries it
    as the Bearer the cloud binds refreshes to. Before, the daemon dropped the token and every
    refresh went without a Bearer: 401 for good."""
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file)
    wait_for_state(daemon, "fresh")
    write_env(env_file, None)
    wait_until(lambda: source_token(env_file) == town.token, deadline=10, what="the token back")
    assert _without_token_line(env_file.read_text()) == env_text(None)
    assert _mode(env_file) == 0o600
    # The cloud mints by the second: in the token's own, it would mint the same one again.
    iat = decode_unverified(town.token).iat
    wait_until(lambda: time.time() >= iat + 1, deadline=5, what="the next second")
    with daemon.local() as client:
        refreshed = client.post("/token/refresh").raise_for_status().json()["token"]
    token = source_token(env_file)
    assert token != town.token
    assert refreshed["fingerprint"] == fingerprint(token)
    assert acceptability_reasons(token, town_id=town.id, now=time.time()) == []


@dataclass
class _Sample:
    at: float
    data: bytes | None
    sourced: str


class _EnvFileReader:
    """Reads the env file and sources it with bash, over and over, recording what it saw."""

    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file
        self.samples: list[_Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="env-reader", daemon=True)

    def __enter__(self) -> _EnvFileReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            at = time.time()
            try:
                data: bytes | None = self.env_file.read_bytes()
            except FileNotFoundError:
                data = None
            self.samples.append(_Sample(at, data, source_token(self.env_file)))


def test_sigkill_during_200_refreshes_and_pushes_never_leaves_a_bad_env_file(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Refreshes and pushes under random SIGKILLs: every value ever read is a whole good token."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    town_root = make_town(tmp_path / "town")
    base = int(time.time())
    pushes = [town.mint(now=base - 60 - k) for k in range(100)]
    assert len(set(pushes)) == 100
    outcomes: Counter[str] = Counter()
    kills = 0
    next_kill = rng.randint(20, 40)
    started = time.monotonic()

    def launch() -> DaemonProcess:
        return start_daemon(daemon_factory, town, env_file, town_root=town_root, name=f"k{kills}")

    with _EnvFileReader(env_file) as reader:
        daemon = launch()
        local, tcp = daemon.local(), daemon.tcp()
        for op in range(200):
            killing = op == next_kill
            # The kill lands somewhere in the next operation, or just after it.
            delay = rng.uniform(0, 0.015) if killing else 0.0
            timer = threading.Timer(delay, os.kill, (daemon.process.pid, signal.SIGKILL))
            if killing:
                timer.start()
            try:
                if op % 2 == 0:
                    answer = local.post("/token/refresh")
                else:
                    answer = tcp.put("/token", json={"token": pushes[op // 2]})
                outcomes[str(answer.status_code)] += 1
                assert answer.status_code == 200 or killing, answer.text
            except httpx.TransportError:
                assert killing
                outcomes["cut by SIGKILL"] += 1
            if killing:
                timer.join()
                assert daemon.process.wait(10) == -signal.SIGKILL
                local.close()
                tcp.close()
                kills += 1
                next_kill = op + rng.randint(20, 40)
                daemon = launch()
                local, tcp = daemon.local(), daemon.tcp()
        final = local.get("/status").json()
    elapsed = time.monotonic() - started

    assert kills >= 4
    assert final["state"] == "fresh"
    assert fingerprint(source_token(env_file)) == final["token"]["fingerprint"]
    values: set[str] = set()
    for sample in reader.samples:
        assert sample.data is not None, "the env file was missing"
        text = sample.data.decode()
        assert _without_token_line(text) == env_text(None)
        parsed = read_env_values(text)["KILO_JWT"]
        for value in (parsed, sample.sourced):
            assert acceptability_reasons(value, town_id=town.id, now=sample.at) == []
            values.add(value)
    for value in values:
        # Signed by the cloud: a torn or mixed value would not verify.
        assert verify_gastown_token(value, secret=cloud.secret).town_id == town.id
    leftovers = sorted(p.name for p in env_file.parent.iterdir() if p != env_file)
    print(
        f"seed {seed}: {kills} SIGKILLs, {len(reader.samples)} reads of the env file, "
        f"{len(values)} distinct tokens seen, outcomes {dict(outcomes)}, "
        f"leftover files {leftovers}, {elapsed:.1f} s"
    )


def _put_in_place(env_file: Path, kind: str) -> None:
    """A folder or a FIFO where the env file was. The daemon puts a deleted env file back
    at once, so the folder is renamed in, again if it did."""
    staged = env_file.with_name(f"staged-{kind}")
    if kind == "fifo":
        os.mkfifo(staged)
        os.replace(staged, env_file)
        return
    staged.mkdir()
    for _ in range(100):
        with contextlib.suppress(FileNotFoundError):
            env_file.unlink()
        try:
            os.rename(staged, env_file)
        except OSError:
            continue
        return
    pytest.fail("the daemon kept putting the env file back")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_an_env_file_turned_into_a_folder_or_fifo_fails_refreshes_and_the_daemon_stays(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path, kind: str
) -> None:
    """A folder or a FIFO put where the env file was, while the daemon runs: a forced
    refresh gets the cloud's token and answers 503 `storage_unavailable` (JSON), the daemon
    runs on and says `degraded`, and once a file can be written again the next refresh
    writes it. Before, the first refresh's read of the env file (a PermissionError or
    IsADirectoryError) ended the daemon with a traceback, exit 1, and a FIFO held it in
    `open` past SIGTERM."""
    town = create_town(cloud)
    # A minute old: the cloud's answer (minted now) is another token, which must be written.
    older = town.mint(now=int(time.time()) - 60)
    env_file = write_env(tmp_path / "home" / ".env.gateway", older)
    daemon = start_daemon(daemon_factory, town, env_file)
    _put_in_place(env_file, kind)
    with daemon.local() as api:
        refused = api.post("/token/refresh")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "storage_unavailable"
        assert api.get("/status").json()["state"] == "degraded"
        if kind == "folder":
            env_file.rmdir()
        else:
            env_file.unlink()
        answer = api.post("/token/refresh")
        assert answer.status_code == 200, answer.text
    wait_until(lambda: source_token(env_file) not in ("", older), "the new token written")
    assert daemon.process.poll() is None


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_at_the_env_files_path_stops_start_up_and_check(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path, kind: str
) -> None:
    """At start the same is a setting to fix: `check` and `run` exit 2 with one line naming
    it (before: check said ok, run exited 1 with a traceback, or hung in `open`)."""
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file)
    env = client_env(
        daemon,
        town.id,
        CLOUD_API_URL=cloud.url,
        INTERNAL_API_KEY=cloud.internal_key,
        GT_TOWN_ROOT=str(daemon.town_root),
    )
    daemon.stop()
    _put_in_place(env_file, kind)
    for command in ("check", "run"):
        done = cli(command, env=env, timeout=20)
        assert done.returncode == 2, (command, done.stderr)
        (line,) = done.stderr.splitlines()
        assert "GASTOWN_ENV_FILE" in line
        assert f"is a {'FIFO' if kind == 'fifo' else 'folder'}, not a file" in line
