"""The agents' options: shim folder precedence and defaults, the shim list, the helper TTL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gastown_sandboxd.errors import OptionsError
from gastown_sandboxd.options import (
    DEFAULT_AGENT_SHIMS,
    Options,
    default_shim_dir,
    load_client_options,
    load_options,
)

REQUIRED = {
    "TOWN_ID": "town-1",
    "CLOUD_API_URL": "http://127.0.0.1:9",
    "INTERNAL_API_KEY": "k" * 16,
    "HOME": "/home/gt",
}


def _load(
    tmp_path: Path, toml: str = "", env: dict[str, str] | None = None, **flags: Any
) -> Options:
    config = tmp_path / "config.toml"
    config.write_text(toml)
    return load_options(flags, {**REQUIRED, **(env or {})}, config_file=config)


def test_shim_dir_flag_beats_environment_beats_toml_beats_default(tmp_path: Path) -> None:
    """--shim-dir > GASTOWN_SANDBOXD_SHIM_DIR > agents.shim_dir > the XDG default."""
    toml = '[agents]\nshim_dir = "~/from-toml"\n'
    env = {"GASTOWN_SANDBOXD_SHIM_DIR": "/from-env"}
    assert _load(tmp_path, toml, env, shim_dir="/from-flag").shim_dir == Path("/from-flag")
    assert _load(tmp_path, toml, env).shim_dir == Path("/from-env")
    assert _load(tmp_path, toml).shim_dir == Path("/home/gt/from-toml")
    assert _load(tmp_path).shim_dir == Path("/home/gt/.local/share/gastown-sandboxd/bin")
    xdg = _load(tmp_path, env={"XDG_DATA_HOME": "/xdg"}).shim_dir
    assert xdg == Path("/xdg/gastown-sandboxd/bin")
    assert default_shim_dir({"HOME": "/h"}) == Path("/h/.local/share/gastown-sandboxd/bin")


def test_shims_and_helper_ttl_default_and_parse(tmp_path: Path) -> None:
    """Defaults: the five CLIs and 5 min; the TOML can narrow the list and set the TTL."""
    settings = _load(tmp_path)
    assert settings.agent_shims == DEFAULT_AGENT_SHIMS
    assert settings.claude_helper_ttl == 300.0
    narrowed = _load(tmp_path, '[agents]\nshims = ["claude", "claude"]\nclaude_helper_ttl = "1s"\n')
    assert narrowed.agent_shims == ("claude",)
    assert narrowed.claude_helper_ttl == 1.0


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[agents]\nshims = "claude"\n', "agents.shims"),
        ('[agents]\nshims = ["../claude"]\n', "agents.shims"),
        ('[agents]\nclaude_helper_ttl = "soon"\n', "agents.claude_helper_ttl"),
        ("[agents]\nshim_dir = 3\n", "agents.shim_dir"),
        ('[agents]\nshim = ["claude"]\n', "agents.shim"),
        ('agents = "yes"\n', "[agents]"),
    ],
)
def test_bad_agent_options_name_the_setting(tmp_path: Path, toml: str, named: str) -> None:
    """Each bad value is one OptionsError naming its key."""
    with pytest.raises(OptionsError) as caught:
        _load(tmp_path, toml)
    assert caught.value.setting == named


def test_env_file_given_only_when_something_names_one(tmp_path: Path) -> None:
    """exec asks the daemon only when no flag, variable or TOML key names the env file."""
    config = tmp_path / "c.toml"
    config.write_text("")

    def given(flags: dict[str, str], env: dict[str, str]) -> tuple[bool, Path]:
        settings = load_client_options(flags, env, config)
        return settings.env_file_given, settings.env_file

    assert given({}, {"HOME": "/h"}) == (False, Path("/h/.env.gateway"))
    assert given({}, {"GASTOWN_ENV_FILE": "/e"}) == (True, Path("/e"))
    config.write_text('env_file = "~/x.env"\n')
    assert given({}, {"HOME": "/h"}) == (True, Path("/h/x.env"))
    assert given({"env_file": "/f"}, {}) == (True, Path("/f"))
