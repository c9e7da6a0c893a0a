"""packaging/gastown-sandboxd.service: what it declares, and what systemd-analyze says of it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "gastown-sandboxd.service"
EXEC = "/usr/local/bin/gastown-sandboxd"

Sections = dict[str, dict[str, list[str]]]

# Directive: the one value it must have (the contract of §9 and the hardening the image relies on).
SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": f"{EXEC} run",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "RestartSec": "2",
    "RestartPreventExitStatus": "2",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "10",
    "User": "gt",
    "Group": "gt",
    "EnvironmentFile": "-/etc/gastown-sandboxd/env",
    "RuntimeDirectory": "gastown-sandboxd",
    "RuntimeDirectoryMode": "0750",
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "read-only",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
}


def parse(text: str) -> Sections:
    """Sections → directive → every value it is given, in order (systemd allows repeats)."""
    sections: Sections = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"continuation lines make the unit hard to read: {raw}"
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        assert current is not None, f"directive outside a section: {raw}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> Sections:
    return parse(UNIT.read_text())


def test_service_directives(unit: Sections) -> None:
    """Every directive of the contract and the hardening list is there once, with its value."""
    service = unit["Service"]
    wrong = {key: service.get(key) for key, value in SERVICE.items() if service.get(key) != [value]}
    assert wrong == {}


def test_a_reload_checks_the_file_with_the_units_environment_before_the_sighup(
    unit: Sections,
) -> None:
    """`systemctl reload` runs `check` first, in the unit's environment (which a check from a
    shell lacks: the reviewer's check of a healthy daemon's file failed there), then sends
    SIGHUP; a failed check fails the reload and sends nothing."""
    assert unit["Service"]["ExecReload"] == [f"{EXEC} check", "/bin/kill -HUP $MAINPID"]


def test_environment_and_socket(unit: Sections) -> None:
    """The API listens on all interfaces and the socket lives in the unit's runtime folder."""
    env = dict(item.split("=", 1) for item in unit["Service"]["Environment"])
    assert env["GASTOWN_SANDBOXD_LISTEN"] == "0.0.0.0:8080"
    socket = PurePosixPath(env["GASTOWN_SANDBOXD_SOCKET"])
    assert socket.parent == PurePosixPath("%t") / unit["Service"]["RuntimeDirectory"][0]


def test_writable_paths_are_minimal_and_enough(unit: Sections) -> None:
    """ReadWritePaths covers the town root and the env file's folder (rename), and no more."""
    paths = [PurePosixPath(p) for p in " ".join(unit["Service"]["ReadWritePaths"]).split()]
    home = PurePosixPath("/home/gt")  # User=gt's home: ~ in the daemon's defaults
    needed = [home / "gt", (home / ".env.gateway").parent]
    for path in needed:
        assert any(path.is_relative_to(allowed) for allowed in paths), path
    assert all(any(n.is_relative_to(p) for n in needed) for p in paths)


def test_install_and_ordering(unit: Sections) -> None:
    """The unit starts at boot and after the network is up."""
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert unit["Unit"]["After"] == ["network-online.target"]
    assert unit["Unit"]["Wants"] == ["network-online.target"]


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    return found


def runnable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit in tmp_path with an ExecStart that exists here, which verify insists on.

    The venv's console script once the package is installed, else /bin/true; User=gt need
    not exist for verify.
    """
    script = Path(sys.executable).parent / "gastown-sandboxd"
    executable = str(script) if script.exists() else "/bin/true"
    copy = tmp_path / UNIT.name
    copy.write_text((text or UNIT.read_text()).replace(EXEC, executable))
    return copy


def verify(unit_file: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify's exit code and the lines of its output about this unit."""
    result = subprocess.run(
        [analyze(), "verify", "--man=no", str(unit_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    # Lines about other units of the host are the host's business, not this unit's.
    return result.returncode, [line for line in lines if unit_file.name in line]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit with no warning about it."""
    code, about_unit = verify(runnable_copy(tmp_path))
    assert (code, about_unit) == (0, [])


def test_verify_would_catch_a_bad_directive(tmp_path: Path) -> None:
    """A misspelled directive shows in verify's output, so the clean run above means something."""
    broken = UNIT.read_text().replace("ProtectClock=yes", "ProtectClok=yes")
    _, about_unit = verify(runnable_copy(tmp_path, broken))
    assert any("ProtectClok" in line for line in about_unit)


def test_security_exposure(tmp_path: Path) -> None:
    """systemd-analyze security rates the unit at most 2.0 on its 0-10 exposure scale."""
    tool = analyze()
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"systemd (\d+)", version.stdout)
    if match is None or int(match.group(1)) < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or later")
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--threshold=20", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert "Overall exposure level" in result.stdout
