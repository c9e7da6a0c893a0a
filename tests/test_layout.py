"""The package's rooms: imports flow down the floors, and the README's module map is the tree."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "daemon" / "gastown_sandboxd"
README = (ROOT / "README.md").read_text()

# Ground floor first. A module may import from a lower floor and from its own room only.
FLOORS: tuple[frozenset[str], ...] = (
    frozenset(
        {"_types", "_files", "_lazy", "_http", "_hypercorn", "errors", "own_writes", "__init__"}
    ),
    frozenset({"atomic"}),
    frozenset({"events"}),
    frozenset({"ops"}),
    frozenset({"token", "gtsettings"}),
    frozenset({"options", "watcher", "client"}),
    frozenset({"agents", "http"}),
    frozenset({"daemon"}),
    frozenset({"cli"}),
    frozenset({"__main__"}),
)


def _room(module: str) -> str:
    """`gastown_sandboxd.token.claims` → `token`; `gastown_sandboxd` → `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _floor(room: str) -> int:
    for number, rooms in enumerate(FLOORS):
        if room in rooms:
            return number
    raise AssertionError(f"room {room!r} has no floor in tests/test_layout.py")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        found[".".join(relative.parts).removesuffix(".__init__")] = path
    return found


def _type_checking_blocks(tree: ast.Module) -> set[ast.AST]:
    """Nodes under `if TYPE_CHECKING:`: annotations only, no dependency when the code runs."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for child in node.body:
                inside.update(ast.walk(child))
    return inside


def _imports(module: str, path: Path) -> set[str]:
    """Every module of the package that `module` imports when it runs, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    annotations_only = _type_checking_blocks(tree)
    for node in ast.walk(tree):
        if node in annotations_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    known = _modules()
    return {name for name in names if name in known and name != module}


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down_the_floors(module: str) -> None:
    """A module imports its own room and lower floors, never a sibling room or a higher floor."""
    room = _room(module)
    for imported in _imports(module, MODULES[module]):
        other = _room(imported)
        if other == room or other == "__init__":
            continue
        assert _floor(other) < _floor(room), f"{module} imports {imported}"


def test_token_never_imports_gtsettings() -> None:
    """The token room knows nothing of gt's settings files."""
    for module, path in MODULES.items():
        if _room(module) == "token":
            assert not any(_room(m) == "gtsettings" for m in _imports(module, path)), module


def test_every_room_has_a_floor() -> None:
    """A new room must be placed on a floor before it can be imported."""
    for module in MODULES:
        _floor(_room(module))


def test_readme_module_map_is_the_tree() -> None:
    """Every module of the package appears in the README's map, and the map names no other."""
    section = README[README.index("| floor | module | what |") :]
    section = section[: section.index("\n\n")]
    listed = set(re.findall(r"`([a-z_/]+\.py)`", section))
    tree = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" or path.parent == PACKAGE
    }
    tree.discard("__init__.py")
    assert listed == tree, {"missing from README": tree - listed, "not in tree": listed - tree}


# The subpackages: a room of several modules behind one face.
ROOMS = sorted(_room(m) for m, path in MODULES.items() if path.name == "__init__.py" and "." in m)


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_has_a_face(room: str) -> None:
    """Each room's `__init__` says what the room is for and names in `__all__` what other
    rooms use from it; every name resolves (a lazy face maps each to its module)."""
    package = importlib.import_module(f"gastown_sandboxd.{room}")
    assert package.__doc__, room
    assert package.__all__, room
    for name in package.__all__:
        assert getattr(package, name) is not None, f"{room}.{name}"
