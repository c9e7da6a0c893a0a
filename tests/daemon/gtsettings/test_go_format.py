"""What the daemon writes into gt's files, against Go's own encoder (`encoding/json`).

gt is written in Go and saves its settings with `json.MarshalIndent(…, "", "  ")`. The
daemon renders a changed value itself (`gtsettings/json_text.py`); here Go renders the same
documents and the bytes must agree. Go sorts the keys of a map, so the documents are built
with sorted keys (gt's structs have an order of their own, which the daemon keeps from the
file). Go here is Debian's (1.19); gt needs 1.25. Between the two, one change touches this
format: since Go 1.22 the encoder writes `\\b` and `\\f` as Python does, not as `\\u0008` and
`\\u000c`, so an older Go's output is read with that change applied.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gastown_sandboxd.gtsettings.patch import render

SOURCE = Path(__file__).parents[2] / "fixtures" / "go_json" / "main.go"


@pytest.fixture(scope="module")
def go_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go program, built once (Debian's golang-go: `make tools` installs it)."""
    go = shutil.which("go")
    assert go is not None, "go is missing: make tools installs golang-go"
    folder = tmp_path_factory.mktemp("go-json")
    binary = folder / "go-json"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "GO111MODULE": "off",
           "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath")}  # fmt: skip
    subprocess.run([go, "build", "-o", str(binary), str(SOURCE)], env=env, check=True)
    return binary


def go_marshal(binary: Path, documents: list[Any]) -> list[bytes]:
    """Each document as Go's MarshalIndent writes it, with gt's Go for `\\b` and `\\f`."""
    done = subprocess.run(
        [binary], input=json.dumps(documents).encode(), capture_output=True, check=True
    )
    texts = done.stdout.split(b"\0")[:-1]
    if go_minor() < 22:
        texts = [t.replace(b"\\u0008", b"\\b").replace(b"\\u000c", b"\\f") for t in texts]
    return texts


@functools.cache
def go_minor() -> int:
    """The minor version of the Go that built the program (asked once)."""
    version = subprocess.run(["go", "version"], capture_output=True, text=True, check=True)
    return int(re.search(r"go1\.(\d+)", version.stdout).group(1))  # type: ignore[union-attr]


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


# Every character but the surrogates (no UTF-8 text holds one; the checks refuse them).
_text = st.text(max_size=12)
_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=12,
)
_documents = st.lists(st.dictionaries(_text, _value, max_size=5).map(_sorted), max_size=25)


def test_an_agent_as_a_patch_sets_it_renders_as_gt_writes_it(go_json: Path) -> None:
    """The strings of an agent that Go escapes and json.dumps does not: HTML's `<`, `>` and
    `&`, the two line separators; and what both escape alike."""
    agent = {
        "args": ["--append-system-prompt", "Fix <bugs> & write tests", ""],
        "command": "claude",
        "env": {"NOTE": "tab\there, bell\x07, line\u2028sep, para\u2029sep, é 漢 🙂"},
        "initial_prompt": 'Quote " and backslash \\ and \b\f\n\r\x1f\x7f',
    }
    documents: list[dict[str, Any]] = [
        {"agents": {"odd": agent}, "default_agent": "odd"},
        {},
        {"empty": [{}, []]},
    ]
    assert [render(doc) for doc in documents] == go_marshal(go_json, documents)


@settings(max_examples=40, deadline=None)
@given(batch=_documents)
def test_any_document_renders_as_gos_encoder_writes_it(go_json: Path, batch: list[Any]) -> None:
    """Arbitrary text (every character but surrogates), nesting, empty objects and arrays,
    integers: the daemon's bytes are Go's."""
    assert [render(doc) for doc in batch] == go_marshal(go_json, batch)
