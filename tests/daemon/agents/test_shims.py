"""Shims: found outside their folder, written once and right, never a token, never themselves."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

from gastown_sandboxd.agents.shims import (
    SHIM_MARKER,
    ShimSpec,
    find_real,
    is_shim,
    shim_text,
    sync_shims,
)
from tests.daemon.minting import TOWN, mint


def _tool(folder: Path, name: str, body: str = "#!/bin/sh\necho real\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body)
    path.chmod(0o755)
    return path


def _spec(tmp_path: Path) -> ShimSpec:
    return ShimSpec(
        python=sys.executable,
        env_file=tmp_path / "env file" / ".env.gateway",
        socket=tmp_path / "d.sock",
        claude_helper_ttl_ms=300_000,
        town_id=TOWN,
    )


def test_find_real_skips_the_shim_folder_shims_elsewhere_and_non_executables(
    tmp_path: Path,
) -> None:
    """The first executable on PATH that is neither in the shim folder nor a shim itself."""
    shims, other_shims, plain, real = (tmp_path / n for n in ("shims", "old", "plain", "real"))
    _tool(shims, "codex")
    _tool(other_shims, "codex", "#!/bin/sh\n" + SHIM_MARKER + " for codex\n")
    _tool(plain, "codex").chmod(0o644)
    target = _tool(real, "codex")
    search = os.pathsep.join(str(p) for p in (shims, other_shims, plain, "relative", real))
    assert find_real("codex", search_path=search, shim_dir=shims) == target
    assert find_real("gemini", search_path=search, shim_dir=shims) is None


def test_claude_is_also_found_at_its_installers_place(tmp_path: Path) -> None:
    """Not on PATH: ~/.claude/local/claude, where gt looks too, then ~/.local/bin/claude, the
    native installer's (the daemon's PATH holds neither: that claude got no shim, and login
    shells, whose ~/.profile puts ~/.local/bin first, ran it unshimmed)."""
    native = _tool(tmp_path / ".local" / "bin", "claude")
    shims = tmp_path / "shims"
    assert find_real("claude", search_path="", shim_dir=shims, home=tmp_path) == native
    local = _tool(tmp_path / ".claude" / "local", "claude")
    assert find_real("claude", search_path="", shim_dir=shims, home=tmp_path) == local
    assert find_real("codex", search_path="", shim_dir=shims, home=tmp_path) is None


def test_sync_writes_keeps_rewrites_and_removes(tmp_path: Path) -> None:
    """Missing or wrong shims are (re)written; right ones kept; a gone CLI's shim removed."""
    shims, real = tmp_path / "shims", tmp_path / "real"
    shims.mkdir()
    _tool(real, "kilo")
    env = {"PATH": f"{shims}{os.pathsep}{real}", "HOME": str(tmp_path)}
    spec = _spec(tmp_path)

    first = sync_shims(["kilo", "gemini"], shim_dir=shims, spec=spec, environ=env)
    assert [(c.name, c.action) for c in first] == [("kilo", "written"), ("gemini", "absent")]
    assert (shims / "kilo").stat().st_mode & 0o777 == 0o755
    assert not (shims / "gemini").exists()

    again = sync_shims(["kilo"], shim_dir=shims, spec=spec, environ=env)
    assert [c.action for c in again] == ["kept"]

    (shims / "kilo").write_text("#!/bin/sh\nexec /somewhere/else\n")
    assert [c.action for c in sync_shims(["kilo"], shim_dir=shims, spec=spec, environ=env)] == [
        "written"
    ]
    assert (shims / "kilo").read_text() == shim_text("kilo", real / "kilo", spec)

    (real / "kilo").unlink()
    assert [c.action for c in sync_shims(["kilo"], shim_dir=shims, spec=spec, environ=env)] == [
        "removed"
    ]
    assert not (shims / "kilo").exists()


def test_a_file_in_the_shim_folder_that_is_no_shim_is_never_removed(tmp_path: Path) -> None:
    """An operator's own file named like an absent CLI stays."""
    shims = tmp_path / "shims"
    own = _tool(shims, "gemini", "#!/bin/sh\necho mine\n")
    changes = sync_shims(["gemini"], shim_dir=shims, spec=_spec(tmp_path), environ={"PATH": ""})
    assert [c.action for c in changes] == ["absent"]
    assert own.read_text() == "#!/bin/sh\necho mine\n"


def test_a_name_dropped_from_the_list_loses_its_shim_and_only_shims_go(tmp_path: Path) -> None:
    """`agents.shims` without `kilo`: its shim, written with the paths of its day, is removed
    (left, it wrapped kilo with an env file nothing refreshed any more); the operator's own
    file, a symlink to a shim and a folder stay."""
    shims, real = tmp_path / "shims", tmp_path / "real"
    shims.mkdir()
    _tool(real, "kilo")
    _tool(real, "codex")
    env = {"PATH": f"{shims}{os.pathsep}{real}", "HOME": str(tmp_path)}
    old_spec = dataclasses.replace(_spec(tmp_path), env_file=tmp_path / "old" / ".env.gateway")
    sync_shims(["kilo", "codex"], shim_dir=shims, spec=old_spec, environ=env)
    own = _tool(shims, "mine", "#!/bin/sh\necho mine\n")
    (shims / "link").symlink_to(shims / "codex")
    (shims / "folder").mkdir()

    changes = sync_shims(["codex"], shim_dir=shims, spec=_spec(tmp_path), environ=env)

    assert [(c.name, c.action) for c in changes] == [("codex", "written"), ("kilo", "unlisted")]
    assert sorted(p.name for p in shims.iterdir()) == ["codex", "folder", "link", "mine"]
    assert own.read_text() == "#!/bin/sh\necho mine\n"
    assert str(old_spec.env_file) not in (shims / "codex").read_text()
    again = sync_shims(["codex"], shim_dir=shims, spec=_spec(tmp_path), environ=env)
    assert [(c.name, c.action) for c in again] == [("codex", "kept")]


def test_a_shim_carries_paths_only_and_quotes_them(tmp_path: Path) -> None:
    """Absolute paths (spaces quoted), the town, the helper TTL for claude, no token, no PATH
    lookup."""
    spec = _spec(tmp_path)
    text = shim_text("claude", Path("/opt/my tools/claude"), spec)
    assert text.startswith("#!/bin/sh\n")
    assert f"--town-id {TOWN}" in text
    assert f"'{spec.env_file}'" in text
    assert "'/opt/my tools/claude'" in text
    assert "--helper-ttl-ms 300000" in text
    assert "--helper-ttl-ms" not in shim_text("kilo", Path("/usr/bin/kilo"), spec)
    assert "KILO_JWT" not in text
    assert "eyJ" not in text
    assert is_shim(tmp_path / "missing") is False


def test_a_shim_runs_the_real_binary_with_the_token_through_exec(tmp_path: Path) -> None:
    """The written shim, run by /bin/sh, becomes the real binary with the env file's token."""
    token = mint(time.time())
    shims, real = tmp_path / "shims", tmp_path / "real"
    shims.mkdir()
    _tool(real, "kilo", '#!/bin/sh\nprintf "%s|%s|%s" "$KILOCODE_TOKEN" "$1" "$2"\n')
    spec = _spec(tmp_path)
    spec.env_file.parent.mkdir()
    spec.env_file.write_text(f"KILO_JWT={token}\n")
    sync_shims(["kilo"], shim_dir=shims, spec=spec, environ={"PATH": str(real)})
    done = subprocess.run(
        [str(shims / "kilo"), "run", "a b"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "/nowhere", "KILOCODE_TOKEN": "stale"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{token}|run|a b", "")
    # The agent's own tools find the daemon the shim used.
    probe = real / "kilo"
    probe.write_text('#!/bin/sh\nprintf "%s|%s" "$GASTOWN_ENV_FILE" "$GASTOWN_SANDBOXD_SOCKET"\n')
    done = subprocess.run(
        [str(shims / "kilo")], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert done.stdout == f"{spec.env_file}|{spec.socket}"
    # An env file with another town's token: the shim's town keeps it from the agent.
    probe.write_text('#!/bin/sh\nprintf "%s|%s" "$KILOCODE_TOKEN" "$KILO_JWT"\n')
    spec.env_file.write_text(f"KILO_JWT={mint(time.time(), town_id='town-other')}\n")
    done = subprocess.run(
        [str(shims / "kilo")], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert (done.returncode, done.stdout) == (0, "|")


def test_a_cli_in_a_folder_whose_name_is_not_utf8_gets_a_shim_that_runs_it(tmp_path: Path) -> None:
    """PATH names folders by bytes: a name that is not UTF-8 is written into the shim as the
    same bytes, and the shim runs the real CLI (before: UnicodeEncodeError, the daemon down)."""
    token = mint(time.time())
    shims = tmp_path / "shims"
    shims.mkdir()
    real = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bin\xff"))
    _tool(real, "kilo", '#!/bin/sh\nprintf "%s" "$KILOCODE_TOKEN"\n')
    spec = _spec(tmp_path)
    spec.env_file.parent.mkdir()
    spec.env_file.write_text(f"KILO_JWT={token}\n")
    changes = sync_shims(["kilo"], shim_dir=shims, spec=spec, environ={"PATH": str(real)})
    assert [c.action for c in changes] == ["written"]
    assert b"/bin\xff/kilo" in (shims / "kilo").read_bytes()
    done = subprocess.run(
        [str(shims / "kilo")], env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=30
    )
    assert (done.returncode, done.stdout) == (0, token.encode())
    again = sync_shims(["kilo"], shim_dir=shims, spec=spec, environ={"PATH": str(real)})
    assert [c.action for c in again] == ["kept"]
