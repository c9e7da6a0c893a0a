"""The daemon's sockets accept connections from the moment they are bound."""

from __future__ import annotations

import socket
from pathlib import Path

from gastown_sandboxd.http.server import bind_tcp, bind_unix
from gastown_sandboxd.options import parse_listen


def test_a_bound_tcp_socket_already_listens() -> None:
    """A client that connects before hypercorn runs waits in the backlog, never refused."""
    server = bind_tcp(parse_listen("127.0.0.1:0"))
    try:
        with socket.create_connection(server.getsockname()[:2], timeout=5) as client:
            accepted, _ = server.accept()
            client.sendall(b"x")
            assert accepted.recv(1) == b"x"
            accepted.close()
    finally:
        server.close()


def test_a_bound_unix_socket_already_listens(tmp_path: Path) -> None:
    """The local socket takes connections at once too, with its 0660 mode."""
    path = tmp_path / "d.sock"
    server = bind_unix(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
            accepted, _ = server.accept()
            accepted.close()
        assert path.stat().st_mode & 0o777 == 0o660
    finally:
        server.close()
