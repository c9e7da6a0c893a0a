"""Real peers of the agent suites: a stand-in Anthropic Messages endpoint, stand-in agent CLIs.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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


@contextmanager
def messages_standin(answer: Callable[[Seen], str]) -> Iterator[MessagesStandIn]:
    """Serve a `MessagesStandIn` on an ephemeral port until the block ends."""
    standin = MessagesStandIn(answer=answer)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            self._record({})
            self._json(404, {"type": "error", "error": {"type": "not_found_error"}})

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
            seen = self._record(body if isinstance(body, dict) else {})
            if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
                self._json(200, {"input_tokens": 10})
                return
            kind = standin.answer(seen)
            turn = len(standin.messages())
            if kind == "refuse":
                refusal = {"type": "authentication_error", "message": "invalid bearer token"}
                self._json(401, {"type": "error", "error": refusal})
                return
            if not seen.stream:
                self._json(200, _whole_message(kind, turn))
                return
            payload = "".join(
                f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                for event in _message_events(kind, turn)
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _record(self, body: dict[str, Any]) -> Seen:
            auth = self.headers.get("Authorization")
            seen = Seen(
                at=time.monotonic(),
                path=self.path,
                bearer=auth.removeprefix("Bearer ") if auth else None,
                api_key=self.headers.get("x-api-key"),
                stream=bool(body.get("stream")),
                tool_results=_tool_results(body),
            )
            standin.record(seen)
            return seen

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    standin.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="messages-standin", daemon=True)
    thread.start()
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


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
