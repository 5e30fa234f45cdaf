#!/usr/bin/env bash
# The main job: the appliance on this node (scripts/demo-node.sh). The lower layers have
# their own demonstrations: scripts/demo-replica.sh (the replica store) and
# scripts/demo-volume.sh (replica servers and an engine driven by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/demo-node.sh
