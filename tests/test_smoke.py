"""The packages import and expose their versions."""

import gastown_cloud
import gastown_sandboxd


def test_packages_import() -> None:
    """Both packages are importable from the installed distribution."""
    assert gastown_sandboxd.__name__ == "gastown_sandboxd"
    assert gastown_cloud.__name__ == "gastown_cloud"
