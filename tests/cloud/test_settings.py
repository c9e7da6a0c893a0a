"""Cloud settings: secrets from the environment, checked, and hidden from `repr`."""

from __future__ import annotations

from pathlib import Path

import pytest

from gastown_cloud.errors import SettingsError
from gastown_cloud.settings import CloudSettings
from gastown_cloud.tokens import TokenClaims
from gastown_sandboxd.token import claims
from tests.fixtures.net import make_local_ca

SECRET = "n" * 32
KEY = "k" * 16


def _settings(env: dict[str, str], **flags: int) -> CloudSettings:
    return CloudSettings.from_env(env, db=Path("cloud.db"), **flags)  # type: ignore[arg-type]


def test_valid_environment_gives_settings() -> None:
    """A 32-byte secret and a 16-character key are enough; flags fill the rest."""
    settings = _settings({"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}, port=0)
    assert settings.nextauth_secret == SECRET
    assert settings.internal_api_key == KEY
    assert settings.port == 0
    assert settings.token_lifetime == 86400


def test_repr_hides_secrets() -> None:
    """Neither the secret nor the key appear in the settings' repr."""
    text = repr(_settings({"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}))
    assert SECRET not in text
    assert KEY not in text
    assert "cloud.db" in text


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"INTERNAL_API_KEY": KEY}, "NEXTAUTH_SECRET"),
        ({"NEXTAUTH_SECRET": "", "INTERNAL_API_KEY": KEY}, "NEXTAUTH_SECRET"),
        ({"NEXTAUTH_SECRET": "n" * 31, "INTERNAL_API_KEY": KEY}, "NEXTAUTH_SECRET"),
        # Looks like an SSH key: PyJWT refuses it at every HS256 mint (a town was created
        # without its token, and every create answered 500).
        ({"NEXTAUTH_SECRET": "ssh-rsa " + "A" * 40, "INTERNAL_API_KEY": KEY}, "NEXTAUTH_SECRET"),
        ({"NEXTAUTH_SECRET": SECRET}, "INTERNAL_API_KEY"),
        ({"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": "short"}, "INTERNAL_API_KEY"),
    ],
)
def test_bad_secrets_name_the_setting(env: dict[str, str], setting: str) -> None:
    """A missing or short secret or key raises an error naming it and never echoing it."""
    with pytest.raises(SettingsError) as caught:
        _settings(env)
    assert caught.value.setting == setting
    assert str(caught.value).startswith(f"setting {setting}: ")
    assert "n" * 31 not in str(caught.value)


def test_secret_length_counts_bytes() -> None:
    """Sixteen two-byte characters make a 32-byte secret."""
    settings = _settings({"NEXTAUTH_SECRET": "é" * 16, "INTERNAL_API_KEY": KEY})
    assert len(settings.nextauth_secret.encode()) == 32


@pytest.mark.parametrize(
    ("flags", "setting"),
    [({"port": 70000}, "--port"), ({"token_lifetime": 0}, "--token-lifetime"),
     ({"token_lifetime": 9}, "--token-lifetime"),
     ({"token_lifetime": 8 * 86400}, "--token-lifetime")],
)  # fmt: skip
def test_bad_flags_name_the_flag(flags: dict[str, int], setting: str) -> None:
    """An impossible port or token lifetime is refused, naming the flag."""
    with pytest.raises(SettingsError) as caught:
        _settings({"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}, **flags)
    assert caught.value.setting == setting


def test_the_shortest_lifetime_is_the_shortest_a_sandbox_accepts() -> None:
    """10 s is the contract's shortest lifetime: the cloud mints it, and a sandbox takes it."""
    settings = _settings({"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}, token_lifetime=10)
    assert settings.token_lifetime == 10 == claims.MIN_LIFETIME


def test_new_settings_default_to_the_seed_with_the_binding_on() -> None:
    """By default: the seed's claims, the binding required, no admission limit."""
    settings = _settings({"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY})
    assert settings.token_claims is TokenClaims.SEED
    assert settings.allow_unbound_refresh is False
    assert settings.refresh_rate is None


@pytest.mark.parametrize("rate", [0, -5, 1_000_001])
def test_bad_refresh_rate_names_the_flag(rate: int) -> None:
    """A refresh rate under 1 or absurdly high is refused, naming --refresh-rate."""
    with pytest.raises(SettingsError) as caught:
        _settings({"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}, refresh_rate=rate)
    assert caught.value.setting == "--refresh-rate"


def _tls(cert: Path | None, key: Path | None) -> CloudSettings:
    env = {"NEXTAUTH_SECRET": SECRET, "INTERNAL_API_KEY": KEY}
    return CloudSettings.from_env(env, db=Path("cloud.db"), tls_cert=cert, tls_key=key)


def test_a_certificate_and_its_key_serve_tls(tmp_path: Path) -> None:
    ca = make_local_ca(tmp_path)
    settings = _tls(ca.cert, ca.key)
    assert settings.tls == (ca.cert, ca.key)
    assert _tls(None, None).tls is None


def test_bad_tls_files_name_the_flag(tmp_path: Path) -> None:
    """One without the other, a key of another certificate, a file that is not there."""
    ca, other = make_local_ca(tmp_path / "a"), make_local_ca(tmp_path / "b")
    for cert, key, setting, problem in [
        (ca.cert, None, "--tls-cert", "needs --tls-key"),
        (None, ca.key, "--tls-key", "needs --tls-cert"),
        (ca.cert, other.key, "--tls-cert", "cannot be served with --tls-key"),
        (tmp_path / "none.pem", ca.key, "--tls-cert", "cannot be served with --tls-key"),
    ]:
        with pytest.raises(SettingsError) as caught:
            _tls(cert, key)
        assert caught.value.setting == setting
        assert problem in str(caught.value)
