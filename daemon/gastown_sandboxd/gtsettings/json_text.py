"""Reading and writing gt's settings JSON, keeping every untouched top-level value byte-exact.

gt writes two-space indented JSON (Go's `MarshalIndent`). `render` writes a changed value
as gt would: `json.dumps(indent=2, ensure_ascii=False)`, with `<`, `>`, `&`, U+2028 and
U+2029 escaped as Go escapes them; and an unchanged top-level value as the very text it had
in the file, so a PATCH never rewrites what it did not change. Proven against Go's own
encoder (`tests/daemon/gtsettings/test_go_format.py`): a document of keys in Go's order
renders as `MarshalIndent` writes it, byte for byte.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, NoReturn

from gastown_sandboxd._types import all_unicode
from gastown_sandboxd.errors import SettingsFileUnreadable
from gastown_sandboxd.gtsettings.schema import FILE_TYPES, SCHEMA_VERSION, Doc, Scope

_WS = re.compile(r"[ \t\n\r]*")


def parse_document(raw: bytes, scope: Scope, *, file: str) -> Doc:
    """The document in `raw`, or `SettingsFileUnreadable` naming `file` and the reason.

    Readable means: UTF-8 JSON (no NaN or Infinity) holding an object whose `type`, when
    present, is this scope's type and whose `version`, when present, is an integer <= 1.
    """
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
    except UnicodeDecodeError:
        _unreadable(file, "is not UTF-8 text")
    except (ValueError, RecursionError) as exc:
        _unreadable(file, f"is not valid JSON ({_reason(exc)})")
    if not isinstance(doc, dict):
        _unreadable(file, "does not hold a JSON object")
    # UTF-8 cannot hold a surrogate, so only an escape can bring one in (`"\ud800"` is JSON
    # by the grammar; Go reads it as U+FFFD). Such a text could be neither hashed for the
    # revision nor written back: the file is unreadable, as a body holding one is invalid.
    if b"\\u" in raw and not all_unicode(doc):
        _unreadable(file, "holds a lone surrogate (an unpaired \\ud800-\\udfff escape)")
    expected = FILE_TYPES[scope]
    kind = doc.get("type", expected)
    if kind != expected:
        _unreadable(file, f"has type {_short(kind)}, expected {expected!r}")
    version = doc.get("version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        _unreadable(file, f"has a version that is not an integer: {_short(version)}")
    if version > SCHEMA_VERSION:
        _unreadable(file, f"has version {version}; this daemon understands version 1")
    return doc


def render(doc: Doc, *, original: bytes | None = None, original_doc: Doc | None = None) -> bytes:
    """`doc` as gt writes it: two-space indent (Go's `json.MarshalIndent`), and no newline at
    the end, as gt's `SaveTownSettings` and `SaveRigSettings` write none, unless `original`
    ended with one (a file written by hand or by an editor keeps its ending).

    With `original` (the file's bytes before the change), each top-level key whose value
    did not change is written with the key and value text it had there. `original_doc`, the
    document parsed from `original`, saves the comparison of every value `doc` shares with
    it (a merge keeps what it did not change: `merge_patch`). The member texts of what it
    renders are kept, so rendering over these bytes next time scans nothing.
    """
    kept = _top_level_texts(original) if original is not None else {}
    before = original_doc if original_doc is not None else {}
    members: dict[str, _Member] = {}
    for key, value in doc.items():
        old = kept.get(key)
        if old is None or not (before.get(key) is value or same(old.value, value)):
            old = _Member(_dumps(key), _dumps(value), value)
        members[key] = old
    ending = "\n" if original is not None and original.endswith(b"\n") else ""
    if not members:
        return ("{}" + ending).encode("utf-8")
    lines = ",\n".join(f"  {m.key_text}: {m.value_text}" for m in members.values())
    data = ("{\n" + lines + "\n}" + ending).encode("utf-8")
    _keep(data, members)
    return data


def same(left: Any, right: Any) -> bool:
    """Equal as JSON texts: unlike `==`, tells 1 from 1.0 and true, and key order counts.

    The one object is the same text, and two objects are the same when their keys are, in
    order, and each value is: a merge shares what it did not change (`merge_patch`), so a
    comparison of a document with its successor dumps only what the PATCH touched.
    """
    if left is right:
        return True
    if isinstance(left, dict) and isinstance(right, dict):
        return list(left) == list(right) and all(same(left[k], right[k]) for k in left)
    return json.dumps(left) == json.dumps(right)


@dataclass(frozen=True, slots=True)
class _Member:
    key_text: str
    value_text: str
    value: Any


# The member texts of the few files last rendered or read: the next PATCH renders over them.
_MEMBERS: dict[bytes, dict[str, _Member]] = {}
_MEMBERS_LOCK = threading.Lock()
_KEPT = 16


def _keep(data: bytes, members: dict[str, _Member]) -> None:
    with _MEMBERS_LOCK:
        _MEMBERS[data] = members
        while len(_MEMBERS) > _KEPT:
            del _MEMBERS[next(iter(_MEMBERS))]


def _top_level_texts(original: bytes) -> dict[str, _Member]:
    # The exact text of each top-level member; nothing when the text is not a JSON object.
    # Callers only read the answer.
    members = _MEMBERS.get(original)
    if members is None:
        try:
            members = _scan_members(original.decode("utf-8"))
        except (ValueError, IndexError, RecursionError):
            members = {}
        _keep(original, members)
    return members


def _scan_members(text: str) -> dict[str, _Member]:
    decoder = json.JSONDecoder()
    members: dict[str, _Member] = {}
    index = _skip(text, 0)
    if text[index] != "{":
        return {}
    index = _skip(text, index + 1)
    if text[index] == "}":
        return {}
    while True:
        key, key_end = decoder.raw_decode(text, index)
        if not isinstance(key, str):
            return {}
        key_text = text[index:key_end]
        index = _skip(text, key_end)
        if text[index] != ":":
            return {}
        index = _skip(text, index + 1)
        value, value_end = decoder.raw_decode(text, index)
        members[key] = _Member(key_text, text[index:value_end], value)
        index = _skip(text, value_end)
        if text[index] == "}":
            return members
        if text[index] != ",":
            return {}
        index = _skip(text, index + 1)


def _skip(text: str, index: int) -> int:
    match = _WS.match(text, index)
    return match.end() if match else index


# What Go's encoder escapes that json.dumps writes as it is: HTML's three, and the two line
# separators JavaScript does not allow in a string. Only strings can hold them.
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def _dumps(value: Any) -> str:
    # Nested lines move two spaces right: the value sits one level inside the document.
    text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")
    return text.translate(_GO_ESCAPES)


def reject_constant(name: str) -> NoReturn:
    """`json.loads`'s `parse_constant`: NaN and Infinity, which Python reads and no JSON
    answer or file can carry back, are refused as not JSON."""
    raise ValueError(f"{name} is not JSON")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _unreadable(file: str, reason: str) -> NoReturn:
    raise SettingsFileUnreadable(f"{file} {reason}; it was left untouched")
