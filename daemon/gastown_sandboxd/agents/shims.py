"""Agent shims: `<shim folder>/<name>` runs the real CLI through `gastown-sandboxd exec`.

A shim is a two-line `#!/bin/sh` script that `exec`s the daemon's Python on the light entry
(`python -I -m gastown_sandboxd.agents exec`) with the env file, the socket and the real
binary by absolute path: one Python start, whatever the agent's environment holds. It holds
paths only, never a token. The real binary is looked up on the daemon's `PATH` with the shim
folder and every shim left out, so a shim never runs itself.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gastown_sandboxd.agents.claude import TTL_VARIABLE

SHIM_MARKER = "# gastown-sandboxd agent shim"
SHIM_MODE = 0o755


@dataclass(frozen=True, kw_only=True)
class ShimSpec:
    """What a shim needs to know: the daemon's Python and the paths it carries."""

    python: str
    env_file: Path
    socket: Path
    claude_helper_ttl_ms: int
    town_id: str | None = None  # not a secret: a token of another town is then refused


def shim_text(name: str, real: Path, spec: ShimSpec) -> str:
    """The shim's whole text; equal inputs give equal bytes (a changed input rewrites it)."""
    argv = [spec.python, "-I", "-m", "gastown_sandboxd.agents", "exec"]
    argv += ["--env-file", str(spec.env_file), "--socket", str(spec.socket)]
    if spec.town_id:
        argv += ["--town-id", spec.town_id]
    if name == "claude":
        argv += ["--helper-ttl-ms", str(spec.claude_helper_ttl_ms)]
    argv += ["--", str(real)]
    return (
        "#!/bin/sh\n"
        f"{SHIM_MARKER} for {name}: the real binary with the current gateway token; "
        f"kept by the daemon ({TTL_VARIABLE} for claude), holds no secret.\n"
        f'exec {shlex.join(argv)} "$@"\n'
    )


def is_shim(path: Path) -> bool:
    """True when the file at `path` is a shim (of this or of another shim folder)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(256)
    except OSError:
        return False
    return SHIM_MARKER.encode() in head


def find_real(
    name: str, *, search_path: str, shim_dir: Path, home: Path | None = None
) -> Path | None:
    """The first executable `name` on `search_path` that is not in the shim folder nor a shim.

    Claude Code's installers also put it at `~/.claude/local/claude` (the local install)
    and `~/.local/bin/claude` (the native one, a folder Debian's `~/.profile` puts on a login
    shell's PATH ahead of the shim folder): those are tried last, in that order.
    """
    shim_real = os.path.realpath(shim_dir)
    candidates = [
        Path(folder or ".") / name
        for folder in search_path.split(os.pathsep)
        if folder and os.path.realpath(folder) != shim_real
    ]
    if name == "claude" and home is not None:
        candidates.append(home / ".claude" / "local" / "claude")
        candidates.append(home / ".local" / "bin" / "claude")
    for candidate in candidates:
        if not candidate.is_absolute():
            continue  # a relative PATH entry would change with each agent's folder
        try:
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                continue
        except OSError:
            continue
        if os.path.realpath(candidate).startswith(shim_real + os.sep) or is_shim(candidate):
            continue
        return candidate
    return None


@dataclass(frozen=True)
class ShimChange:
    """One outcome of a sync for one name: `written`, `removed` (its CLI is gone),
    `unlisted` (removed: the name left `agents.shims`), `absent` or `kept`."""

    name: str
    action: str
    target: Path | None = None


def sync_shims(
    names: Sequence[str],
    *,
    shim_dir: Path,
    spec: ShimSpec,
    environ: Mapping[str, str],
) -> list[ShimChange]:
    """Make the shim folder hold exactly one correct shim per CLI found; report each name.

    A shim whose CLI is gone is removed, and so is a shim of a name no longer in `names`
    (dropped from `agents.shims`): left, it would wrap its CLI for good with the paths of the
    day it was written, an env file or socket nothing serves any more. Only files that are
    shims are ever removed.
    """
    from gastown_sandboxd.atomic import write_atomic

    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    search_path = environ.get("PATH", os.defpath)
    changes = []
    for name in names:
        path = shim_dir / name
        real = find_real(name, search_path=search_path, shim_dir=shim_dir, home=home)
        if real is None:
            if is_shim(path):
                path.unlink(missing_ok=True)
                changes.append(ShimChange(name, "removed"))
            else:
                changes.append(ShimChange(name, "absent"))
            continue
        # A path is bytes: one that is not UTF-8 goes back as the bytes it was read from.
        text = shim_text(name, real, spec).encode("utf-8", "surrogateescape")
        if _current(path) == text and os.access(path, os.X_OK):
            changes.append(ShimChange(name, "kept", real))
            continue
        write_atomic(path, text, mode=SHIM_MODE)
        changes.append(ShimChange(name, "written", real))
    for path in _unlisted_shims(shim_dir, names):
        path.unlink(missing_ok=True)
        changes.append(ShimChange(path.name, "unlisted"))
    return changes


def _unlisted_shims(shim_dir: Path, names: Sequence[str]) -> list[Path]:
    """The shims in `shim_dir` (regular files only) of names not in `names`, sorted."""
    try:
        entries = list(os.scandir(shim_dir))
    except OSError:
        return []
    listed = set(names)
    return sorted(
        Path(entry.path)
        for entry in entries
        if entry.name not in listed
        and entry.is_file(follow_symlinks=False)
        and is_shim(Path(entry.path))
    )


def _current(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if not path.is_symlink() else None
    except OSError:
        return None
