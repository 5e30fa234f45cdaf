#!/usr/bin/env bash
# The main job: the replica store demo, then a replicated volume demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/demo-replica.sh
scripts/demo-volume.sh
