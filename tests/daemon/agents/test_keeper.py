"""The agent keeper: Claude's helper kept with every other key, bad files untouched, logs once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from gastown_sandboxd.agents import AgentKeeper
from gastown_sandboxd.agents.claude import helper_in_place, is_daemon_helper, with_helper


def _keeper(tmp_path: Path, *, path: str, names: tuple[str, ...] = ("claude",)) -> AgentKeeper:
    return AgentKeeper(
        shim_dir=tmp_path / "shims",
        names=names,
        env_file=tmp_path / ".env.gateway",
        socket=tmp_path / "d.sock",
        claude_helper_ttl=1.0,
        environ={"PATH": path, "HOME": str(tmp_path / "home")},
        python=sys.executable,
    )


def _real_claude(tmp_path: Path) -> str:
    real = tmp_path / "real"
    real.mkdir(exist_ok=True)
    (real / "claude").write_text("#!/bin/sh\n")
    (real / "claude").chmod(0o755)
    (tmp_path / "shims").mkdir(exist_ok=True)
    return str(real)


def _settings(tmp_path: Path) -> Path:
    return tmp_path / "home" / ".claude" / "settings.json"


def test_a_new_settings_file_gets_the_helper_and_mode_0600(tmp_path: Path) -> None:
    """No settings yet: the folder and a 0600 file holding only the helper."""
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    with capture_logs() as logs:
        keeper.sync()
    data = json.loads(_settings(tmp_path).read_text())
    assert list(data) == ["apiKeyHelper"]
    assert is_daemon_helper(data["apiKeyHelper"])
    assert str(tmp_path / ".env.gateway") in data["apiKeyHelper"]
    assert _settings(tmp_path).stat().st_mode & 0o777 == 0o600
    assert [e["event"] for e in logs] == ["agent_shim_written", "claude_api_key_helper_set"]


def test_every_other_key_is_kept_in_order_with_the_files_mode(tmp_path: Path) -> None:
    """Existing settings: the helper replaced or added, the rest as it was, mode kept."""
    path = _settings(tmp_path)
    path.parent.mkdir(parents=True)
    before = {"theme": "dark", "apiKeyHelper": "/bin/old-helper", "env": {"A": "1"}, "z": [1]}
    path.write_text(json.dumps(before))
    path.chmod(0o640)
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    keeper.sync()
    after = json.loads(path.read_text())
    assert list(after) == list(before)
    assert {k: v for k, v in after.items() if k != "apiKeyHelper"} == {
        k: v for k, v in before.items() if k != "apiKeyHelper"
    }
    assert is_daemon_helper(after["apiKeyHelper"])
    assert path.stat().st_mode & 0o777 == 0o640
    mtime = path.stat().st_mtime_ns
    keeper.sync()
    assert path.stat().st_mtime_ns == mtime  # nothing to change: nothing written


@pytest.mark.parametrize(
    "text",
    ['{"theme": ', "[]", "\udcff", '{"a":' + "[" * 100_000 + "]" * 100_000 + "}", '{"x": 1e400}',
     '{"x": NaN}'],
    ids=["cut", "array", "bytes", "nested_100000", "beyond_a_double", "nan"],
)  # fmt: skip
def test_settings_that_are_not_json_are_never_overwritten_and_logged_once(
    tmp_path: Path, text: str
) -> None:
    """A settings file that is not a JSON object stays byte for byte; one warning only."""
    path = _settings(tmp_path)
    path.parent.mkdir(parents=True)
    data = text.encode("utf-8", "surrogateescape")
    path.write_bytes(data)
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    with capture_logs() as logs:
        for _ in range(3):
            keeper.sync()
    assert path.read_bytes() == data
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, logs
    assert warnings[0]["event"] in {"claude_settings_not_json", "claude_settings_unreadable"}
    assert warnings[0]["path"] == str(path)


def test_a_symlinked_settings_file_is_written_where_it_leads_with_its_mode(
    tmp_path: Path,
) -> None:
    """settings.json -> a dotfiles checkout's file (0600): the helper lands in that file, the
    link stays, the mode is the file's (before: a regular 0644 file replaced the link, and the
    dotfile never got the helper)."""
    dotfile = tmp_path / "dotfiles" / "claude-settings.json"
    dotfile.parent.mkdir()
    dotfile.write_text('{"theme": "dark", "env": {"MY_SECRET": "x"}}')
    dotfile.chmod(0o600)
    path = _settings(tmp_path)
    path.parent.mkdir(parents=True)
    path.symlink_to(dotfile)
    _keeper(tmp_path, path=_real_claude(tmp_path)).sync()
    assert path.is_symlink()
    data = json.loads(dotfile.read_text())
    assert data["theme"] == "dark"
    assert is_daemon_helper(data["apiKeyHelper"])
    assert dotfile.stat().st_mode & 0o777 == 0o600


def test_an_empty_settings_file_is_written_only_once_it_stayed_empty_a_whole_pass(
    tmp_path: Path,
) -> None:
    """Claude Code writes its settings by truncating the file: an empty file may be one
    between its truncate and its write. The first pass leaves it; if it is still the same
    empty file at the next, it gets the helper; if Claude Code wrote it meanwhile, its keys
    are kept (before: the first pass renamed the helper alone over it, losing the write)."""
    path = _settings(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("")
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    keeper.sync()
    assert path.read_text() == ""
    keeper.sync()
    assert list(json.loads(path.read_text())) == ["apiKeyHelper"]

    again = tmp_path / "again"
    path2 = _settings(again)
    path2.parent.mkdir(parents=True)
    path2.write_text("")
    keeper2 = _keeper(again, path=_real_claude(again))
    keeper2.sync()
    with path2.open("w") as handle:  # Claude Code's write lands between the two passes
        handle.write('{"theme": "light"}')
    keeper2.sync()
    data = json.loads(path2.read_text())
    assert data["theme"] == "light"
    assert is_daemon_helper(data["apiKeyHelper"])


def test_a_settings_file_written_while_the_keeper_reads_it_is_left_to_the_next_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claude Code's write landing between the keeper's read and its rename: the rename is
    not made (it would lose that write), and the next pass keeps both."""
    import gastown_sandboxd.agents.claude as claude_module

    path = _settings(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"theme": "dark"}')
    real_with_helper = claude_module.with_helper
    writes = ['{"theme": "dark", "model": "opus"}']

    def with_helper_during_a_write(text: str, command: str) -> str | None:
        if writes:
            path.write_text(writes.pop())  # Claude Code writes as the keeper works
        return real_with_helper(text, command)

    monkeypatch.setattr(claude_module, "with_helper", with_helper_during_a_write)
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    keeper.sync()
    assert json.loads(path.read_text()) == {"theme": "dark", "model": "opus"}
    keeper.sync()
    data = json.loads(path.read_text())
    assert (data["theme"], data["model"]) == ("dark", "opus")
    assert is_daemon_helper(data["apiKeyHelper"])


def test_a_lone_surrogate_escape_is_kept_as_the_escape(tmp_path: Path) -> None:
    """`"\\ud83d"` alone is JSON Node writes: the helper is set, the escape written back as
    it was read, every other text as it was (before: UnicodeEncodeError, the daemon down)."""
    path = _settings(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"note": "\\ud83d", "theme": "caf\u00e9"}')
    _keeper(tmp_path, path=_real_claude(tmp_path)).sync()
    text = path.read_text()
    assert '"note": "\\ud83d"' in text
    assert json.loads(text)["theme"] == "caf\u00e9"
    assert is_daemon_helper(json.loads(text)["apiKeyHelper"])


def test_a_fifo_in_the_settings_place_never_blocks_and_is_left_alone(tmp_path: Path) -> None:
    """A FIFO where the settings file should be: read without blocking, left as it is, logged
    once; exec asks it without blocking too (before: the keeper's first pass, and with it the
    daemon's start, waited for a writer)."""
    path = _settings(tmp_path)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    with capture_logs() as logs:
        keeper.sync()
        keeper.sync()
    assert path.is_fifo()
    assert [(e["event"], e["problem"]) for e in logs if e["log_level"] == "warning"] == [
        ("claude_settings_not_json", "not a regular file")
    ]
    assert helper_in_place({"HOME": str(tmp_path / "home")}) is False


def test_a_pass_that_meets_the_unforeseen_is_logged_and_the_next_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keeper's passes never end the daemon: an error no branch foresaw is logged once,
    and the next pass does its work."""
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    real_sync = keeper.sync
    calls = []

    def sync() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")
        real_sync()

    monkeypatch.setattr(keeper, "sync", sync)
    with capture_logs() as logs:
        for _ in range(3):
            keeper.guarded_sync()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["agent_keeper_pass_failed"]
    assert is_daemon_helper(json.loads(_settings(tmp_path).read_text())["apiKeyHelper"])


def test_a_shim_folder_gone_after_start_is_logged_once_and_made_good_when_back(
    tmp_path: Path,
) -> None:
    """The shim folder replaced by a file (another program, a clean-up script): one warning
    however often the keeper looks, no shim written elsewhere; once the folder is back,
    the shim is written again. A shim that is gone is written again too."""
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    keeper.sync()
    shims = tmp_path / "shims"
    (shims / "claude").unlink()
    shims.rmdir()
    shims.write_text("not a folder")
    with capture_logs() as logs:
        for _ in range(3):
            keeper.sync()
    assert [(e["event"], e["folder"]) for e in logs] == [("agent_shims_failed", str(shims))]
    assert shims.read_text() == "not a folder"
    shims.unlink()
    shims.mkdir()
    with capture_logs() as logs:
        keeper.sync()
    assert [e["event"] for e in logs] == ["agent_shim_written"]
    assert (shims / "claude").read_text().startswith("#!/bin/sh\n")


def test_a_file_where_claudes_folder_should_be_is_left_alone_and_logged_once(
    tmp_path: Path,
) -> None:
    """`~/.claude` is a file: its settings cannot be read, so nothing is written; one
    warning however often the keeper looks."""
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".claude").write_text("a file where Claude's folder should be")
    with capture_logs() as logs:
        for _ in range(3):
            keeper.sync()
    told = [e for e in logs if e["event"].startswith("claude_settings")]
    assert [(e["event"], e["log_level"]) for e in told] == [
        ("claude_settings_unreadable", "warning")
    ]
    assert (tmp_path / "home" / ".claude").read_text() == "a file where Claude's folder should be"


def test_an_absent_cli_gets_no_shim_and_is_logged_once(tmp_path: Path) -> None:
    """Absent CLIs: no shim, one `agent_cli_absent` each however often the keeper looks."""
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path), names=("claude", "codex", "gemini"))
    with capture_logs() as logs:
        for _ in range(3):
            keeper.sync()
    absent = [e["name"] for e in logs if e["event"] == "agent_cli_absent"]
    assert absent == ["codex", "gemini"]
    assert sorted(os.listdir(tmp_path / "shims")) == ["claude"]


def test_no_claude_means_no_settings_written(tmp_path: Path) -> None:
    """Without a claude to shim, Claude's settings are not touched."""
    (tmp_path / "shims").mkdir()
    _keeper(tmp_path, path="").sync()
    assert not _settings(tmp_path).exists()


def test_with_helper_changes_nothing_when_the_helper_is_there() -> None:
    """The same helper already set: no new text (nothing to write)."""
    text = with_helper('{"a": 1}', "cmd")
    assert text is not None
    assert json.loads(text) == {"a": 1, "apiKeyHelper": "cmd"}
    assert with_helper(text, "cmd") is None


@pytest.mark.anyio
async def test_run_syncs_before_it_reports_started_and_stops_on_cancel(tmp_path: Path) -> None:
    """`run` has written the shims by the time `tg.start` returns."""
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    async with anyio.create_task_group() as tg:
        await tg.start(keeper.run)
        assert (tmp_path / "shims" / "claude").exists()
        tg.cancel_scope.cancel()


def test_update_takes_effect_at_the_next_sync(tmp_path: Path) -> None:
    """New names and TTL (a SIGHUP): the claude shim is rewritten with the new TTL."""
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    keeper.sync()
    assert "--helper-ttl-ms 1000" in (tmp_path / "shims" / "claude").read_text()
    keeper.update(names=("claude", "codex"), claude_helper_ttl=2.5)
    with capture_logs() as logs:
        keeper.sync()
    assert "--helper-ttl-ms 2500" in (tmp_path / "shims" / "claude").read_text()
    assert [e["event"] for e in logs] == ["agent_shim_written", "agent_cli_absent"]


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path: Path) -> None:
    """`.claude.*.tmp` in the shim folder and `.settings.json.*.tmp` old enough are removed."""
    keeper = _keeper(tmp_path, path=_real_claude(tmp_path))
    settings = _settings(tmp_path)
    settings.parent.mkdir(parents=True)
    stale = [tmp_path / "shims" / ".claude.x1.tmp", settings.parent / ".settings.json.x2.tmp"]
    for path in stale:
        path.write_text("half")
        os.utime(path, (1, 1))
    keeper.remove_stale_temporaries()
    assert not [path for path in stale if path.exists()]
