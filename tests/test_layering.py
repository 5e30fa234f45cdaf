"""The layers of the package stay visible: pure cores import no framework."""

from __future__ import annotations

import ast
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
