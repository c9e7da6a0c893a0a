"""`make demo`: the cloud and the daemon on a temporary town with 30-second tokens.

Shows, with timestamps: the initial token's claims and scheduled refresh, two refreshes, a
config push from the dashboard (through the cloud), the events a subscriber receives, an agent
started through `gastown-sandboxd exec` calling the gateway, and the usage the cloud recorded.
Ends by itself (or on Ctrl-C) and leaves nothing running or behind.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

TOKEN_LIFETIME = 30
STEP_DEADLINE = 45.0
_START = time.monotonic()

AGENT_SCRIPT = """
import json, os, sys, urllib.request
request = urllib.request.Request(
    os.environ["DEMO_GATEWAY_URL"],
    data=json.dumps({"model": "anthropic/claude-sonnet-4.5",
                     "messages": [{"role": "user", "content": "Hello from a polecat"}]}).encode(),
    headers={"Authorization": "Bearer " + os.environ["ANTHROPIC_AUTH_TOKEN"],
             "Content-Type": "application/json"},
)
with urllib.request.urlopen(request, timeout=10) as answer:
    body = json.load(answer)
print(json.dumps({"pid": os.getpid(), "reply": body["choices"][0]["message"]["content"],
                  "usage": body["usage"]}))
"""

TOWN_SETTINGS = {
    "type": "town-settings",
    "version": 1,
    "_comment": "written by gt; the daemon manages only the model keys",
    "default_agent": "claude",
    "agents": {},
    "role_agents": {"mayor": "claude"},
    "scheduler": {"max_polecats": 4},
}


def say(text: str, *, detail: Any = None) -> None:
    stamp = f"[{time.monotonic() - _START:6.1f}s]"
    print(f"{stamp} {text}", flush=True)
    if detail is not None:
        body = detail if isinstance(detail, str) else json.dumps(detail, indent=2)
        for line in body.splitlines():
            print(f"{' ' * len(stamp)}   {line}", flush=True)


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a JWT, without the signature (the demo never prints a token)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def process(
    argv: list[str], *, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=sink)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(predicate: Any, what: str, deadline: float = STEP_DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def read_listening_url(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("gastown-cloud listening on "):
            return line.rsplit(" ", 1)[1]
    return None


class EventTail:
    """`gastown-sandboxd events` as a subprocess; its lines land in a queue."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.received = 0
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def next(self, kind: str, deadline: float = STEP_DEADLINE) -> dict[str, Any]:
        end = time.monotonic() + deadline
        while True:
            try:
                event = self.events.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no {kind} event within {deadline:.0f} s") from None
            self.received += 1
            say(
                f"subscriber got its event #{self.received}, {event['type']}",
                detail=f"id {event['id']}: {_event_line(event)}",
            )
            if event["type"] == kind:
                return event

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _event_line(event: dict[str, Any]) -> str:
    fields = {k: v for k, v in event.items() if k not in {"id", "type", "time"}}
    return json.dumps(fields)


def run(workdir: Path) -> None:
    python = sys.executable
    cloud_key = secrets.token_hex(16)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("GASTOWN_", "GT_"))}
    base_env.pop("NOTIFY_SOCKET", None)
    cloud_env = dict(
        base_env,
        NEXTAUTH_SECRET=secrets.token_hex(32),
        INTERNAL_API_KEY=cloud_key,
        PYTHONUNBUFFERED="1",
    )
    cloud_log = workdir / "cloud.log"
    daemon_log = workdir / "daemon.log"
    town_root = workdir / "gt"
    (town_root / "settings").mkdir(parents=True)
    (town_root / "settings" / "config.json").write_text(json.dumps(TOWN_SETTINGS, indent=2) + "\n")
    (town_root / "frontend").mkdir()
    env_file = workdir / "home" / ".env.gateway"
    env_file.parent.mkdir()
    sock = workdir / "sandboxd.sock"
    daemon_port = free_port()

    with ExitStack() as stack:
        say(f"starting the cloud (SQLite in a temporary folder, {TOKEN_LIFETIME} s tokens)")
        stack.enter_context(
            process(
                [
                    python,
                    "-m",
                    "gastown_cloud",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--db",
                    str(workdir / "cloud.db"),
                    "--token-lifetime",
                    str(TOKEN_LIFETIME),
                ],
                env=cloud_env,
                log=cloud_log,
            )
        )
        cloud_url = wait_for(lambda: read_listening_url(cloud_log), "the cloud to listen")
        cloud = stack.enter_context(
            httpx.Client(base_url=cloud_url, headers={"x-internal-api-key": cloud_key}, timeout=15)
        )
        say(f"cloud listening on {cloud_url}")

        answer = cloud.post(
            "/api/gastown/towns",
            json={
                "userId": "user-ada",
                "organizationId": "org-kilo",
                "name": "demo town",
                "sandboxUrl": f"http://127.0.0.1:{daemon_port}",
            },
        )
        answer.raise_for_status()
        town, token = answer.json()["town"], answer.json()["token"]
        say("createTown minted the initial token; its claims:", detail=claims_of(token))
        env_file.write_text(
            f"# written at sandbox boot\nKILO_API_URL={cloud_url}\nKILO_JWT={token}\n"
        )
        env_file.chmod(0o600)
        say("provisioning wrote that token into the sandbox's env file (0600)")
        key_only = cloud.post("/api/gastown/refresh-token", json={"townId": town["id"]})
        say(
            f"the internal key alone refreshes no town: HTTP {key_only.status_code} "
            f"{key_only.json()['error']}; the daemon sends its token as Bearer"
        )

        daemon_env = dict(
            base_env,
            TOWN_ID=town["id"],
            CLOUD_API_URL=cloud_url,
            INTERNAL_API_KEY=cloud_key,
            GT_TOWN_ROOT=str(town_root),
            GASTOWN_ENV_FILE=str(env_file),
            GASTOWN_SANDBOXD_LISTEN=f"127.0.0.1:{daemon_port}",
            GASTOWN_SANDBOXD_SOCKET=str(sock),
            GASTOWN_SANDBOXD_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        cli = [python, "-m", "gastown_sandboxd"]
        say("starting gastown-sandboxd")
        daemon = stack.enter_context(process([*cli, "run"], env=daemon_env, log=daemon_log))

        def daemon_ready() -> bool:
            if daemon.poll() is not None:  # it stopped: its log says why
                raise RuntimeError(f"the daemon exited with {daemon.returncode}")
            return "daemon_ready" in daemon_log.read_text(errors="replace")

        wait_for(daemon_ready, "the daemon")
        status = subprocess.run(
            [*cli, "status"], env=daemon_env, capture_output=True, text=True, check=True
        )
        say("gastown-sandboxd status", detail=status.stdout.rstrip())

        tail = EventTail([*cli, "events"], daemon_env)
        stack.callback(tail.close)
        wait_for(lambda: _subscribers(daemon_env) > 0, "the subscriber to connect")
        say("a subscriber follows GET /events; waiting for two refreshes driven by `exp`")
        for number in (1, 2):
            event = tail.next("token.refreshed")
            say(
                f"refresh {number}: new token valid until exp={event['exp']} "
                f"(lifetime {event['exp'] - event['iat']} s)"
            )

        patch = {
            "town": {
                "agents": {
                    "kilo-sonnet": {
                        "provider": "claude",
                        "command": "claude",
                        "args": ["--model", "anthropic/claude-sonnet-4.5"],
                    }
                },
                "role_agents": {"mayor": "kilo-sonnet", "polecat": "kilo-sonnet"},
            }
        }
        say(
            "the dashboard pushes a model choice: PATCH /api/gastown/towns/{id}/config",
            detail=patch,
        )
        answer = cloud.patch(f"/api/gastown/towns/{town['id']}/config", json=patch)
        say(
            f"the cloud forwarded it to the sandbox: HTTP {answer.status_code}",
            detail={k: answer.json().get(k) for k in ("changed", "revision", "files")},
        )
        tail.next("config.changed")
        written = json.loads((town_root / "settings" / "config.json").read_text())
        say(
            "gt's town settings now read (unmanaged keys kept):",
            detail={
                k: written[k]
                for k in ("type", "version", "_comment", "agents", "role_agents", "scheduler")
                if k in written
            },
        )

        say("an agent starts through `gastown-sandboxd exec` and calls the gateway")
        agent_env = dict(daemon_env, DEMO_GATEWAY_URL=f"{cloud_url}/api/gateway/chat/completions")
        agent = subprocess.run(
            [*cli, "exec", "--", python, "-c", AGENT_SCRIPT],
            env=agent_env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if agent.returncode != 0:
            raise RuntimeError(f"the agent failed: {agent.stderr.strip()}")
        say("the agent's answer", detail=json.loads(agent.stdout))

        usage = cloud.get("/api/gastown/usage", params={"townId": town["id"]}).json()["usage"]
        say("usage the cloud attributed", detail=usage)
        say("stopping the daemon (SIGTERM) and the cloud")
    say("done: nothing left running; the temporary folder is removed")


def _subscribers(env: dict[str, str]) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    return int(json.loads(out.stdout)["subscribers"]) if out.returncode == 0 else 0


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="gastown-demo-"))
    try:
        run(workdir)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    except (RuntimeError, httpx.HTTPError, subprocess.SubprocessError) as exc:
        say(f"demo failed: {exc}")
        for name in ("cloud.log", "daemon.log"):
            log = workdir / name
            if log.exists():
                print(
                    f"--- last lines of {name} ---\n"
                    + "\n".join(log.read_text().splitlines()[-20:])
                )
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
