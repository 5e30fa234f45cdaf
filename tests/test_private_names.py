"""No module uses another module's private names (in the spirit of S3QL's import checker).

A name beginning with one underscore belongs to the module that defines it: state and rules
that two modules share go through a public, documented name, so that an invariant such as
"commit only under the exclusive lock" is kept by one module instead of by convention across
several. Every module of ``appliance/``, ``tests/`` and ``bench/`` is parsed, and a use of
``_x`` is reported unless the using module defines ``_x`` itself:

* ``from m import _x`` (and ``import m._x``);
* ``m._x`` or ``obj._x`` (read, written or deleted);
* the same by string: ``getattr(obj, "_x")``, ``monkeypatch.setattr(m, "_x", ...)``,
  ``mock.patch("m._x")``.

A module defines ``_x`` by a ``def``/``class``, an assignment, a parameter, an import alias,
or an attribute assigned as ``self._x``/``cls._x``. ``self._x``, ``cls._x``, ``super()._x``
and dunders are always allowed, and so are the few standard-library names of
:data:`STDLIB_ALLOWED`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("appliance", "tests", "bench")

# Standard-library names that begin with an underscore but are the documented interface.
STDLIB_ALLOWED = {
    "os._exit": "a forked child or a plugin that must die at once leaves without running "
                "the cleanup it inherited; documented in the os module",
}

DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
BY_STRING = {"getattr", "setattr", "hasattr", "delattr"}  # builtins and monkeypatch's


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@dataclass(frozen=True, order=True)
class Use:
    """One use of another module's private name."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def defined_names(tree: ast.AST) -> set[str]:
    """The private names the module defines itself, in any scope."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                owner_is_self(node.value):
            names.add(node.attr)
    return {name for name in names if is_private(name)}


def owner_is_self(value: ast.expr) -> bool:
    """``self``, ``cls`` or ``super()``: the object's own attributes, wherever defined."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and \
        value.func.id == "super"


def call_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else \
        func.attr if isinstance(func, ast.Attribute) else ""


def private_uses(source: str, path: str = "<snippet>") -> list[Use]:
    """Every use in *source* of a private name the module does not define."""
    tree = ast.parse(source)
    own = defined_names(tree)
    uses: list[Use] = []

    def foreign(name: str) -> bool:
        return is_private(name) and name not in own

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            uses += [Use(path, node.lineno, f"from {module} import {alias.name}")
                     for alias in node.names if is_private(alias.name)]
            if any(is_private(part) for part in (node.module or "").split(".")):
                uses.append(Use(path, node.lineno, f"from {module} import ..."))
        elif isinstance(node, ast.Import):
            uses += [Use(path, node.lineno, f"import {alias.name}") for alias in node.names
                     if any(is_private(part) for part in alias.name.split("."))]
        elif isinstance(node, ast.Attribute) and foreign(node.attr) and \
                not owner_is_self(node.value) and ast.unparse(node) not in STDLIB_ALLOWED:
            uses.append(Use(path, node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call):
            uses += string_uses(node, path, foreign)
    return sorted(set(uses))


def string_uses(call: ast.Call, path: str, foreign: Callable[[str], bool]) -> list[Use]:
    """``getattr(obj, "_x")``-style and ``patch("m._x")``-style uses."""
    name, args = call_name(call), call.args
    strings = [(i, a.value) for i, a in enumerate(args[:2])
               if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    by_name = [text for index, text in strings if index == 1 and foreign(text) and
               name in BY_STRING | {"object"} and not owner_is_self(args[0])]
    by_path = [text for index, text in strings if index == 0 and DOTTED.fullmatch(text) and
               name in ("patch", "setattr", "delattr") and any(map(foreign, text.split(".")))]
    return [Use(path, call.lineno, f"{ast.unparse(call.func)}(..., {text!r})")
            for text in by_name + by_path]


GENERATED = ROOT / "appliance" / "csi" / "proto"  # protoc's output (appliance.csi.protogen)


def scanned_modules() -> list[Path]:
    return sorted(path for top in SCANNED for path in (ROOT / top).rglob("*.py")
                  if GENERATED not in path.parents)


def test_no_module_uses_another_modules_private_names() -> None:
    uses = [use for path in scanned_modules()
            for use in private_uses(path.read_text(), str(path.relative_to(ROOT)))]
    assert not uses, (f"{len(uses)} uses of another module's private names (make the name "
                      "public and documented, or move the code to its owner):\n"
                      + "\n".join(map(str, uses)))


BAD = '''
import os
import appliance.chain._state
from appliance.chain.replica import _commit, Replica
from ._private import thing

def purge(replica: Replica) -> None:
    replica._files.clear()
    replica._epoch = 3
    del replica._view
    os._exit(1)
    getattr(replica, "_access")

def test_patch(monkeypatch) -> None:
    monkeypatch.setattr(replica_module, "_BATCH", 7)
    monkeypatch.setattr("appliance.chain.replica._BATCH", 7)
    mock.patch.object(replica_module, "_write")
'''

GOOD = '''
import os
from appliance.chain.replica import Replica

_CACHE: dict[str, int] = {}

class Holder:
    _shared = 0

    def __init__(self, other: "Holder") -> None:
        self._files = {}
        self.__dict__.update(other.__dict__)
        super()._setup()
        other._files.clear()  # the same class's private name, in its own module
        getattr(self, "_missing", None)

    def _helper(self) -> None:
        cls = type(self)
        cls._shared += 1

def quit() -> None:
    _CACHE.clear()
    os._exit(0)
    Holder(Holder(None))._helper()
'''


def test_the_checker_flags_each_kind_of_use() -> None:
    found = [use.what for use in private_uses(BAD)]
    assert found == [
        "import appliance.chain._state",
        "from appliance.chain.replica import _commit",
        "from ._private import ...",
        "replica._files",
        "replica._epoch",
        "replica._view",
        "getattr(..., '_access')",
        "monkeypatch.setattr(..., '_BATCH')",
        "monkeypatch.setattr(..., 'appliance.chain.replica._BATCH')",
        "mock.patch.object(..., '_write')",
    ], found
    assert [use.line for use in private_uses(BAD)][:3] == [3, 4, 5]


def test_the_checker_accepts_own_names_self_super_dunders_and_allowed_stdlib() -> None:
    assert private_uses(GOOD) == []
