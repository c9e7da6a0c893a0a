"""The CAs an https:// cloud is verified with (`_http.trust_locations`, `tls_context`), each
tried in a real handshake with OpenSSL against a TLS server on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import certifi
import httpx
import pytest

from gastown_sandboxd import _http
from gastown_sandboxd.errors import (
    DesiredConfigUnavailable,
    OptionsProblems,
    RefreshError,
)
from gastown_sandboxd.gtsettings.desired import DesiredConfigClient
from gastown_sandboxd.options import load_options
from gastown_sandboxd.token.cloud import CloudClient
from tests.fixtures.net import LocalCA, make_local_ca, unused_port


@pytest.fixture
def local_ca(tmp_path: Path) -> LocalCA:
    return make_local_ca(tmp_path / "ca")


@pytest.fixture
def tls_server(local_ca: LocalCA) -> Iterator[int]:
    """A TLS server on 127.0.0.1 with the local CA's certificate; its port. Each connection
    is handshaken and closed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(local_ca.cert, local_ca.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                peer = listener.accept()[0]
            except OSError:
                return
            try:
                with context.wrap_socket(peer, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass  # a client that refused the certificate

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def handshake(context: ssl.SSLContext, port: int, host: str = "127.0.0.1") -> str:
    """A real TLS handshake with the server at `port`; its TLS version."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(b"x")
        version = tls.version()
    assert version is not None
    return version


@pytest.fixture
def system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """OpenSSL's default CA file and folder, as paths under `tmp_path` (neither there yet)."""
    cafile, capath = tmp_path / "system" / "cert.pem", tmp_path / "system" / "certs"
    defaults = ssl.get_default_verify_paths()._replace(
        openssl_cafile=str(cafile), openssl_capath=str(capath)
    )
    monkeypatch.setattr(_http, "_verify_paths", lambda: defaults)
    return cafile, capath


def test_the_systems_hashed_folder_is_used_and_read_only_when_needed(
    local_ca: LocalCA, tls_server: int, system: tuple[Path, Path]
) -> None:
    """The system's CA folder first: nothing is loaded until a handshake asks for its
    issuer, then that one certificate (where a bundle loads every one up front)."""
    cafile, capath = system
    capath.parent.mkdir()
    local_ca.folder.rename(capath)
    cafile.write_bytes(certifi.contents().encode())  # a bundle beside it: not read
    assert _http.trust_locations({}) == (None, str(capath))
    context = _http.tls_context({})
    assert context.cert_store_stats()["x509_ca"] == 0
    assert handshake(context, tls_server) in {"TLSv1.2", "TLSv1.3"}
    assert context.cert_store_stats()["x509_ca"] == 1


def test_a_folder_without_hashed_names_gives_way_to_the_systems_file(
    local_ca: LocalCA, tls_server: int, system: tuple[Path, Path]
) -> None:
    """A CA folder nobody hashed is of no use to OpenSSL's lookup: the system's file it is."""
    cafile, capath = system
    capath.mkdir(parents=True)
    (capath / "ca.pem").write_bytes(local_ca.ca_file.read_bytes())
    cafile.write_bytes(local_ca.ca_file.read_bytes())
    assert _http.trust_locations({}) == (str(cafile), None)
    assert handshake(_http.tls_context({}), tls_server)


def test_with_no_system_cas_certifis_bundle_is_used(
    tls_server: int, system: tuple[Path, Path]
) -> None:
    """No CA folder and no CA file: httpx's own default, which trusts public CAs only."""
    assert _http.trust_locations({}) == (certifi.where(), None)
    context = _http.tls_context({})
    assert context.cert_store_stats()["x509_ca"] > 100
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, tls_server)


@pytest.mark.parametrize("variables", ["file", "folder", "both"])
def test_ssl_cert_file_and_dir_are_the_operators_choice(
    variables: str, local_ca: LocalCA, tls_server: int, system: tuple[Path, Path]
) -> None:
    """SSL_CERT_FILE and SSL_CERT_DIR, as OpenSSL reads them, win over the system's CAs."""
    env = {
        "file": {"SSL_CERT_FILE": str(local_ca.ca_file)},
        "folder": {"SSL_CERT_DIR": str(local_ca.folder)},
        "both": {"SSL_CERT_FILE": str(local_ca.ca_file), "SSL_CERT_DIR": str(local_ca.folder)},
    }[variables]
    assert _http.trust_locations(env) == (env.get("SSL_CERT_FILE"), env.get("SSL_CERT_DIR"))
    assert handshake(_http.tls_context(env), tls_server)


def test_a_certificate_of_another_ca_or_name_is_refused(
    tmp_path: Path, local_ca: LocalCA, tls_server: int
) -> None:
    """Verification is on: a server whose CA is not trusted, or whose certificate names
    another host, fails the handshake."""
    other = make_local_ca(tmp_path / "other", name="another CA")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(_http.tls_context({"SSL_CERT_DIR": str(other.folder)}), tls_server)
    trusting = _http.tls_context({"SSL_CERT_DIR": str(local_ca.folder)})
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(trusting, tls_server, host="localhost")


@pytest.mark.parametrize(
    ("variable", "kind"), [("SSL_CERT_FILE", "file"), ("SSL_CERT_DIR", "folder")]
)
def test_a_variable_that_names_nothing_is_a_clear_error(
    variable: str, kind: str, tmp_path: Path
) -> None:
    missing = str(tmp_path / "nothing")
    with pytest.raises(_http.TrustUnavailable) as caught:
        _http.trust_locations({variable: missing})
    assert caught.value.variable == variable
    assert f"{missing!r} is not a {kind}" in str(caught.value)
    assert "openssl rehash" in str(caught.value)


def test_the_daemon_refuses_to_start_with_an_https_cloud_and_a_bad_variable(
    tmp_path: Path,
) -> None:
    """Checked with the other settings at start (exit 2, one line); an http:// cloud never
    speaks TLS, so the variable does not matter to it."""
    env = {
        "TOWN_ID": "town-1",
        "INTERNAL_API_KEY": "k" * 32,
        "SSL_CERT_FILE": str(tmp_path / "nothing.pem"),
        "HOME": str(tmp_path),
    }
    with pytest.raises(OptionsProblems) as caught:
        load_options(env={**env, "CLOUD_API_URL": "https://cloud.test"})
    assert str(caught.value) == (
        f"setting SSL_CERT_FILE: {env['SSL_CERT_FILE']!r} is not a file; "
        f"{_http.TrustUnavailable.FIX}"
    )
    load_options(env={**env, "CLOUD_API_URL": "http://cloud.test"})


async def test_a_refused_certificate_is_named_in_the_refresh_and_the_sync(
    tls_server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reason says TLS, not a connection failure: the fix is a CA, not the network."""
    other = make_local_ca(tmp_path / "other", name="another CA")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(other.folder))
    unavailable = await both_fail_with_tls_error(f"https://127.0.0.1:{tls_server}")
    assert "certificate verify failed: unable to get local issuer" in unavailable.message


async def test_a_ca_folder_gone_since_the_start_fails_the_call_not_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked at start, SSL_CERT_DIR can still go later: each call fails with `tls_error`
    (retried as an outage) until it is back."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "gone"))
    unavailable = await both_fail_with_tls_error(f"https://127.0.0.1:{unused_port()}")
    assert "SSL_CERT_DIR" in unavailable.message


async def both_fail_with_tls_error(url: str) -> DesiredConfigUnavailable:
    """A refresh and a read of the desired configuration from `url` both fail with
    `tls_error`, as an outage (retried) and a 502; the read's error is returned."""
    async with CloudClient(base_url=url, internal_key="k", town_id="t") as cloud:
        with pytest.raises(RefreshError) as refused:
            await cloud.refresh(None)
    assert (refused.value.kind, refused.value.reason) == ("outage", "tls_error")
    async with DesiredConfigClient(base_url=url, internal_key="k", town_id="t") as client:
        with pytest.raises(DesiredConfigUnavailable) as unavailable:
            await client.fetch(None)
    assert (unavailable.value.status, unavailable.value.reason) == (502, "tls_error")
    return unavailable.value


def test_tls_failure_is_none_for_other_errors() -> None:
    assert _http.tls_failure(httpx.ConnectError("refused")) is None
