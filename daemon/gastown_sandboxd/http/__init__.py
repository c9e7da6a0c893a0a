"""The internal API (CONTRACT §4).

`app.py` holds the routes and the key check, `errors.py` the error body and one exception
handler per error class, `openapi.py` the OpenAPI document, and `server.py` the sockets and
hypercorn that serve the app, `local_socket.py` the local socket kept at its path.
"""

from gastown_sandboxd.http.app import ApiContext, create_app
from gastown_sandboxd.http.openapi import openapi_document
from gastown_sandboxd.http.server import bind_tcp, bind_unix, describe, serve_socket

__all__ = [
    "ApiContext",
    "bind_tcp",
    "bind_unix",
    "create_app",
    "describe",
    "openapi_document",
    "serve_socket",
]
