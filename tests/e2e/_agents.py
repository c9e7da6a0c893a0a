"""Real peers of the agent suites: stand-in Anthropic Messages and OpenAI Responses endpoints,
stand-in agent CLIs.

`MessagesStandIn` is a real HTTP server on 127.0.0.1 that records the credentials of every
request (bearer and x-api-key) and answers valid Messages API responses, streamed as SSE when
the request asks for it. A test decides per request whether the answer is a tool-use turn
(which keeps a `claude -p` session alive), the final text, or a refusal of the credentials
(401 with the Messages API's `authentication_error`, as a gateway refuses a token).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gastown_sandboxd.token.claims import decode_unverified
from tests.e2e._town import Town, create_town, wait_for_state, write_env
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess
from tests.waiting import wait_until

# The real agent CLIs, pinned and installed project-locally by `make tools` (npm).
NPM_BIN = Path(__file__).resolve().parents[2] / ".cache" / "npm" / "node_modules" / ".bin"

# A stand-in agent CLI: records the credential it would send, one JSON line per start. Like
# Claude Code, `claude` sends ANTHROPIC_AUTH_TOKEN when set, else its apiKeyHelper's output.
STANDIN_AGENT = """#!{python}
import json, os, subprocess, sys
name = os.path.basename(sys.argv[0])
source = "env"
if name == "claude":
    token = os.environ.get("ANTHROPIC_AUTH_TOKEN")
    if not token:
        home = os.environ.get("HOME", "")
        folder = os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join(home, ".claude")
        with open(os.path.join(folder, "settings.json")) as handle:
            helper = json.load(handle).get("apiKeyHelper")
        token = subprocess.run(helper, shell=True, capture_output=True, text=True).stdout.strip()
        source = "helper"
else:
    token = os.environ.get("KILOCODE_TOKEN")
line = {{"name": name, "token": token, "source": source, "args": sys.argv[1:]}}
with open(os.environ["AGENT_RECORD"], "a") as handle:
    handle.write(json.dumps(line) + "\\n")
"""


def make_standin_agents(folder: Path, names: tuple[str, ...] = ("claude", "kilo")) -> Path:
    """Executables named like agent CLIs that append what they would send to $AGENT_RECORD."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text(STANDIN_AGENT.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def read_records(path: Path) -> list[dict[str, Any]]:
    """The lines the stand-in agents wrote so far."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


@dataclass(frozen=True)
class Seen:
    """One request the stand-in answered: when, where, which credentials, what it carried."""

    at: float
    path: str
    bearer: str | None
    api_key: str | None
    stream: bool
    tool_results: int


@dataclass
class MessagesStandIn:
    """A Messages API on 127.0.0.1; `answer(seen) -> "tool" | "text" | "refuse"` picks each
    answer."""

    answer: Callable[[Seen], str] = lambda seen: "text"
    requests: list[Seen] = field(default_factory=list)
    url: str = ""
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def record(self, seen: Seen) -> None:
        with self._changed:
            self.requests.append(seen)
            self._changed.notify_all()

    def messages(self) -> list[Seen]:
        """The model calls (POST /v1/messages), in order."""
        with self._changed:
            return [r for r in self.requests if r.path.startswith("/v1/messages")]

    def wait_for(self, check: Callable[[list[Seen]], bool], deadline: float = 20.0) -> None:
        end = time.monotonic() + deadline
        with self._changed:
            while not check([r for r in self.requests if r.path.startswith("/v1/messages")]):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the stand-in never saw that; saw {self.requests}")
                self._changed.wait(min(remaining, 0.5))


def _message_events(kind: str, turn: int) -> list[dict[str, Any]]:
    """The SSE events of one assistant message: a Bash tool call, or a short text."""
    usage = {"input_tokens": 10, "output_tokens": 5}
    start = {
        "type": "message_start",
        "message": {
            "id": f"msg_{turn}",
            "type": "message",
            "role": "assistant",
            "model": "claude-standin",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        },
    }
    if kind == "tool":
        block = {"type": "tool_use", "id": f"toolu_{turn}", "name": "Bash", "input": {}}
        command = {"command": "true", "description": "keep the session going"}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(command)}
        stop_reason = "tool_use"
    else:
        block = {"type": "text", "text": ""}
        delta = {"type": "text_delta", "text": "done"}
        stop_reason = "end_turn"
    return [
        start,
        {"type": "content_block_start", "index": 0, "content_block": block},
        {"type": "content_block_delta", "index": 0, "delta": delta},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
        {"type": "message_stop"},
    ]


def _whole_message(kind: str, turn: int) -> dict[str, Any]:
    if kind == "tool":
        content: list[dict[str, Any]] = [
            {
                "type": "tool_use",
                "id": f"toolu_{turn}",
                "name": "Bash",
                "input": {"command": "true", "description": "keep the session going"},
            }
        ]
    else:
        content = [{"type": "text", "text": "done"}]
    return {
        "id": f"msg_{turn}",
        "type": "message",
        "role": "assistant",
        "model": "claude-standin",
        "content": content,
        "stop_reason": "tool_use" if kind == "tool" else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }


def _tool_results(body: dict[str, Any]) -> int:
    count = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(
                1 for c in content if isinstance(c, dict) and c.get("type") == "tool_result"
            )
    return count


class _Handler(BaseHTTPRequestHandler):
    """What both stand-ins share: HTTP/1.1 with lengths, quiet, JSON and SSE answers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization")
        return auth.removeprefix("Bearer ") if auth else None

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[dict[str, Any]]) -> None:
        payload = "".join(
            f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in events
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], name: str) -> Iterator[str]:
    """Serve `handler` on an ephemeral port of 127.0.0.1 until the block ends; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def messages_standin(answer: Callable[[Seen], str]) -> Iterator[MessagesStandIn]:
    """Serve a `MessagesStandIn` on an ephemeral port until the block ends."""
    standin = MessagesStandIn(answer=answer)

    class Handler(_Handler):
        def do_GET(self) -> None:
            self._record({})
            self._json(404, {"type": "error", "error": {"type": "not_found_error"}})

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            seen = self._record(self._body())
            if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
                self._json(200, {"input_tokens": 10})
                return
            kind = standin.answer(seen)
            turn = len(standin.messages())
            if kind == "refuse":
                refusal = {"type": "authentication_error", "message": "invalid bearer token"}
                self._json(401, {"type": "error", "error": refusal})
            elif seen.stream:
                self._sse(_message_events(kind, turn))
            else:
                self._json(200, _whole_message(kind, turn))

        def _record(self, body: dict[str, Any]) -> Seen:
            seen = Seen(
                at=time.monotonic(),
                path=self.path,
                bearer=self._bearer(),
                api_key=self.headers.get("x-api-key"),
                stream=bool(body.get("stream")),
                tool_results=_tool_results(body),
            )
            standin.record(seen)
            return seen

    with serving(Handler, "messages-standin") as url:
        standin.url = url
        yield standin


@dataclass
class ResponsesStandIn:
    """An OpenAI Responses API on 127.0.0.1 (what Codex speaks): `answer(bearer) -> "text" |
    "refuse"` picks each answer to `POST /v1/responses`; `bearers` are what they carried."""

    answer: Callable[[str | None], str] = lambda bearer: "text"
    bearers: list[str | None] = field(default_factory=list)
    url: str = ""


def _response_events(turn: int) -> list[dict[str, Any]]:
    """The SSE events of one streamed response whose output is the text `done`."""
    message = {
        "type": "message",
        "id": f"msg_{turn}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "done", "annotations": []}],
    }
    response = {"id": f"resp_{turn}", "object": "response", "status": "in_progress", "output": []}
    usage = {
        "input_tokens": 10,
        "output_tokens": 1,
        "total_tokens": 11,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    return [
        {"type": "response.created", "response": response},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {
            "type": "response.completed",
            "response": dict(response, status="completed", output=[message], usage=usage),
        },
    ]


@contextmanager
def responses_standin(answer: Callable[[str | None], str]) -> Iterator[ResponsesStandIn]:
    """Serve a `ResponsesStandIn` on an ephemeral port until the block ends; a refusal is a
    401 in OpenAI's error shape, as a gateway refuses a token."""
    standin = ResponsesStandIn(answer=answer)

    class Handler(_Handler):
        def do_GET(self) -> None:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

        def do_POST(self) -> None:
            self._body()
            if not self.path.endswith("/responses"):
                self.do_GET()
                return
            bearer = self._bearer()
            kind = standin.answer(bearer)
            standin.bearers.append(bearer)
            if kind == "refuse":
                refusal = {"message": "invalid token", "type": "invalid_request_error"}
                self._json(401, {"error": dict(refusal, code="invalid_api_key")})
            else:
                self._sse(_response_events(len(standin.bearers)))

    with serving(Handler, "responses-standin") as url:
        standin.url = url
        yield standin


@dataclass(frozen=True)
class AgentSandbox:
    """A town's daemon keeping the shim of one real agent CLI, with `home` as the agent's."""

    town: Town
    env_file: Path
    home: Path
    shims: Path
    daemon: DaemonProcess

    def refresh(self) -> str:
        """Have the daemon refresh now, in a later second than the current token's (the cloud
        mints by the second: within it, the same token again, and Claude Code asks within
        the town's own second in 3 runs of 10 here); the new token on disk."""
        iat = decode_unverified(self.town.token).iat
        wait_until(lambda: time.time() >= iat + 1, deadline=5, what="the next second")
        with self.daemon.local() as local:
            answer_json = local.post("/token/refresh").json()
        assert answer_json["token"]["fingerprint"], answer_json
        fresh = self.env_file.read_text().split("KILO_JWT=", 1)[1].split("\n", 1)[0]
        assert fresh != self.town.token
        return fresh


def start_agent_sandbox(
    cloud: CloudServer,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    cli: Path,
    *,
    agents_toml: str = "",
    home_files: Mapping[str, str] | None = None,
) -> AgentSandbox:
    """A daemon for a new town with the real CLI `cli` on its PATH and `cli`'s name alone in
    `agents.shims` (more `[agents]` settings in `agents_toml`), and `home_files` written in
    the home first; returned once its token is fresh."""
    town = create_town(cloud)
    env_file = write_env(tmp_path / "sandbox" / ".env.gateway", town.token)
    home, real, shims = tmp_path / "home", tmp_path / "real-bin", tmp_path / "shims"
    for name, text in (home_files or {}).items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(text)
    real.mkdir()
    (real / cli.name).symlink_to(cli)
    daemon = daemon_factory(
        town_id=town.id,
        cloud_url=cloud.url,
        env_file=env_file,
        config_toml=f'[agents]\nshims = ["{cli.name}"]\n{agents_toml}',
        extra_env={
            "INTERNAL_API_KEY": cloud.internal_key,
            "PATH": f"{real}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(home),
            "CLAUDE_CONFIG_DIR": "",
            "GASTOWN_SANDBOXD_SHIM_DIR": str(shims),
        },
    )
    wait_for_state(daemon, "fresh")
    return AgentSandbox(town, env_file, home, shims, daemon)


def claude_env(base_url: str, home: Path) -> dict[str, str]:
    """What a `claude -p` needs offline: the stand-in's URL, a home, no outside traffic."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(
        HOME=str(home),
        ANTHROPIC_BASE_URL=base_url,
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_ERROR_REPORTING="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        CLAUDE_CODE_DISABLE_TERMINAL_TITLE="1",
    )
    return env
