"""The layers of the package stay visible: pure cores import no framework, no two modules
import each other (directly or through others), trio stays in the daemon and its store, and
nbdkit in the engine process package."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "appliance"
FRAMEWORKS = {"trio", "click", "nbdkit", "grpc", "boto3", "botocore", "hypercorn", "pyfuse3",
              "prometheus_client", "aetcd", "pyroute2"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_chain_imports_no_framework_and_nothing_above_it() -> None:
    for path in sorted((PACKAGE / "chain").rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FRAMEWORKS, f"{path.name} imports {name}"
            if top == "appliance":
                assert name.startswith(("appliance.chain", "appliance.errors",
                                        "appliance.units")), f"{path.name} imports {name}"


def test_errors_module_is_pure() -> None:
    assert imported_modules(PACKAGE / "errors.py") <= {"__future__", "errno"}


def test_backup_format_and_codec_are_pure() -> None:
    for name in ("format.py", "codec.py", "keys.py"):
        for module in imported_modules(PACKAGE / "backup" / name):
            top = module.split(".")[0]
            assert top not in FRAMEWORKS, f"backup/{name} imports {module}"
            if top == "appliance":
                assert module.startswith(("appliance.chain.format", "appliance.errors",
                                          "appliance.backup.keys", "appliance.secrets")), \
                    f"backup/{name} imports {module}"


def test_the_host_check_is_a_library() -> None:
    """appliance/hostcheck/ only finds and returns results: no CLI framework, no daemon, no
    printing (the command, appliance/cli/check.py, prints)."""
    for path in sorted((PACKAGE / "hostcheck").rglob("*.py")):
        for name in imported_modules(path):
            assert name.split(".")[0] not in FRAMEWORKS, f"hostcheck/{path.name} imports {name}"
            assert not name.startswith("appliance.cli"), f"hostcheck/{path.name} imports {name}"
            if name.startswith("appliance.node"):
                assert name == "appliance.node.config", f"hostcheck/{path.name} imports {name}"
        assert "print(" not in path.read_text(), f"hostcheck/{path.name} prints"


# -- the import graph ---------------------------------------------------------------------

# (and the browse helper: pyfuse3, its FUSE library, runs on trio)
TRIO_ALLOWED = ("appliance/node/", "appliance/control/sqlite_store.py",
                "appliance/control/etcd_store.py", "appliance/browse/fusefs.py",
                "appliance/browse/helper.py", "appliance/ui/")
# the host check names nbdkit's package and asks nbdkit about its Python plugin
# (--dump-plugin); it serves nothing with it
NBDKIT_ALLOWED = ("appliance/nbd/", "appliance/hostcheck/packages.py",
                  "appliance/hostcheck/interpreter.py")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(source: str, module: str, is_package: bool,
                   known: set[str]) -> dict[str, int]:
    """The modules of *known* that *module* imports (at the top, inside a function, or under
    ``if TYPE_CHECKING:``: a lazy or type-only import that hides a cycle still joins two
    modules that need each other), each with the line of its first import. ``from p import
    name`` depends on ``p.name`` if that is a module, else on ``p`` itself; importing a
    submodule runs its package's ``__init__`` too, but that edge is left out (a package
    re-exporting its modules would otherwise be a cycle of each)."""
    tree = ast.parse(source)
    base = module.split(".") if is_package else module.split(".")[:-1]
    edges: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = ".".join([*base[:len(base) - node.level + 1], *(
                [node.module] if node.module else [])]) if node.level else node.module or ""
            targets = [f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in known
                       else parent for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != module:
                edges[target] = min(edges.get(target, node.lineno), node.lineno)
    return edges


GENERATED = PACKAGE / "csi" / "proto"  # protoc's output (appliance.csi.protogen)


def source_files(package: Path = PACKAGE) -> list[Path]:
    """The package's own modules (not the generated gRPC stubs)."""
    return [path for path in sorted(package.rglob("*.py")) if GENERATED not in path.parents]


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    paths = {module_name(path, package): path for path in source_files(package)}
    known = set(paths)
    return {name: module_imports(path.read_text(), name, path.name == "__init__.py", known)
            for name, path in paths.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One cycle of *graph* as [a, b, ..., a], or [] if there is none (depth-first search,
    modules and their imports in sorted order so the report is stable)."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once explored
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, {})):
            if state.get(target) == "open":
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """A cycle in each group of modules that import each other (each strongly connected
    component of more than one module), so that one run reports every loop to break."""
    found: list[list[str]] = []
    remaining = {module: dict(edges) for module, edges in graph.items()}
    while cycle := find_cycle(remaining):
        found.append(cycle)
        group = reachable(remaining, cycle[0]) & {m for m in remaining
                                                  if cycle[0] in reachable(remaining, m)}
        remaining = {m: {t: n for t, n in edges.items() if t not in group}
                     for m, edges in remaining.items() if m not in group}
    return found


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for target in graph.get(todo.pop(), {}):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)) + \
        f" -> {cycle[-1]}"


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    cycles = [describe_cycle(cycle, graph) for cycle in find_cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_sees_lazy_and_type_checking_imports() -> None:
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    lazy = module_imports("def f():\n    from pkg import b\n", "pkg.a", False, known)
    assert lazy == {"pkg.b": 2}
    relative = module_imports("from .c import x\nfrom . import b\n", "pkg.a", False, known)
    assert relative == {"pkg.c": 1, "pkg.b": 2}
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    assert module_imports(typing_only, "pkg.b", False, known) == {"pkg.a": 3}
    graph = {"pkg.a": {"pkg.b": 1}, "pkg.b": {"pkg.c": 4}, "pkg.c": {"pkg.a": 9}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert describe_cycle(find_cycle(graph), graph) == \
        "pkg.a (line 1) -> pkg.b (line 4) -> pkg.c (line 9) -> pkg.a"
    assert find_cycle({"pkg.a": {"pkg.b": 1}, "pkg.b": {}}) == []
    two = {**graph, "pkg.d": {"pkg.e": 2}, "pkg.e": {"pkg.d": 3, "pkg.a": 5}}
    assert find_cycles(two) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.d", "pkg.e", "pkg.d"]]


# -- frameworks where they belong -------------------------------------------------------------


def modules_outside(allowed: tuple[str, ...]) -> list[Path]:
    root = PACKAGE.parent
    return [path for path in source_files()
            if not str(path.relative_to(root)).startswith(allowed)]


def test_trio_only_in_the_daemon_and_the_sqlite_store() -> None:
    """The cores are synchronous; only the node daemon and the store it uses run on trio."""
    found = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
             for path in modules_outside(TRIO_ALLOWED) for name in imported_modules(path)
             if name.split(".")[0] == "trio"]
    assert not found, found


GRPC_ALLOWED = ("appliance/csi/",)


def test_grpc_and_protobuf_only_in_the_csi_plugin() -> None:
    """The CSI plugin is an edge: gRPC stays in it, and it reaches the rest of the product
    through the node daemon's API client only (not the daemon, the engine or the stores)."""
    found = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
             for path in modules_outside(GRPC_ALLOWED) for name in imported_modules(path)
             if name.split(".")[0] in ("grpc", "google", "grpc_tools")]
    assert not found, found
    reach = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
             for path in source_files(PACKAGE / "csi") for name in imported_modules(path)
             if name.startswith(("appliance.node", "appliance.nbd", "appliance.control.store",
                                 "appliance.replication", "appliance.cli"))]
    assert not reach, reach


def starts_nbdkit(text: str) -> bool:
    """An argv[0] or a shell command line naming the nbdkit program: ``nbdkit`` alone (or a
    path to it), or followed by an option (``nbdkit -f ...``). Prose such as "nbdkit
    threads" or "(an nbdkit process)" is not a command."""
    words = text.split()
    if not words or not (words[0] == "nbdkit" or words[0].endswith("/nbdkit")):
        return False
    return len(words) == 1 or words[1].startswith("-")


def nbdkit_uses(source: str) -> list[tuple[int, str]]:
    """The ``nbdkit`` module imports and the strings that start the program, docstrings
    left out."""
    tree = ast.parse(source)
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            uses += [(node.lineno, f"import {n}") for n in names if n.split(".")[0] == "nbdkit"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                id(node) not in docstrings and starts_nbdkit(node.value):
            uses.append((node.lineno, repr(node.value)))
    return sorted(uses)


def test_nbdkit_only_in_the_engine_process_package() -> None:
    """The engine process (nbd/) is the only one that runs inside or starts nbdkit; the rest
    reaches it through nbd/launch.py and the engine's control socket."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
             for path in modules_outside(NBDKIT_ALLOWED)
             for line, what in nbdkit_uses(path.read_text())]
    assert not found, found


def test_the_nbdkit_check_tells_commands_from_prose() -> None:
    source = '''"""Runs nbdkit -f with the plugin (a docstring: prose)."""
import nbdkit
command = ["nbdkit", "-U", sock]
shell = "nbdkit -s --exit-with-parent memory 1M"
path = ["/usr/sbin/nbdkit", "-f"]
message = "nbdkit exited"
help = "Run in this process (nbdkit -f)."
'''
    assert [line for line, _ in nbdkit_uses(source)] == [2, 3, 4, 5]
