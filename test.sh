#!/usr/bin/env bash
# Run the whole test suite (lint, types, tests). Extra arguments go to pytest.
# Run ./setup.sh first on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/pytest ]; then
    echo "test.sh: no virtualenv yet: run ./setup.sh first" >&2
    exit 1
fi
.venv/bin/ruff check appliance tests bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
