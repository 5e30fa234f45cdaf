#!/usr/bin/env bash
# The appliance on this node: the daemon started (and left running), a second disk added,
# a volume with two replicas on the two disks created and attached, ext4 made on it, files
# written, remounted and verified; then what to try next. Needs root (mount, loop).
# Idempotent: a running daemon is reused and the demo volume is made again.
# APPLIANCE_DATA_DIR (default /var/lib/appliance) and APPLIANCE_LISTEN (127.0.0.1:9500)
# choose where.
set -euo pipefail
cd "$(dirname "$0")/.."
appliance=$PWD/.venv/bin/appliance
data=${APPLIANCE_DATA_DIR:-/var/lib/appliance}
listen=${APPLIANCE_LISTEN:-127.0.0.1:9500}
export APPLIANCE_URL="http://$listen" APPLIANCE_TOKEN_FILE="$data/token"
mnt=$data/demo-mnt
step() { printf '\n== %s\n' "$*"; }
healthy() { .venv/bin/python -c "import sys, urllib.request
try: urllib.request.urlopen('$APPLIANCE_URL/healthz', timeout=2)
except OSError: sys.exit(1)"; }

step "the node daemon (appliance serve) on $listen, data in $data"
if healthy; then
    echo "already running"
else
    mkdir -p "$data"
    setsid "$appliance" serve --data-dir "$data" --listen "$listen" \
        </dev/null >>"$data/daemon.log" 2>&1 &
    for _ in $(seq 300); do healthy && break; sleep 0.1; done
    healthy || { echo "the daemon did not start; see $data/daemon.log" >&2; exit 1; }
    echo "started (log: $data/daemon.log, API token: $data/token)"
fi

step "two disks: the default one and a second directory"
mkdir -p "$data/disks/second"
$appliance disk list -o json | grep -q "\"path\": \"$data/disks/second\"" \
    || $appliance disk add "$data/disks/second" --tag demo
$appliance disk list

step "a 256 MiB volume with two replicas, one on each disk"
mountpoint -q "$mnt" && umount "$mnt"
if $appliance volume show demo >/dev/null 2>&1; then $appliance volume delete demo; fi
$appliance volume create demo --size 256M --replicas 2
$appliance volume show demo -o yaml | sed -n '/replica_list/,$p'

step "attach it, make ext4, write files"
device=$($appliance volume attach demo)
echo "attached at $device"
mkfs.ext4 -q -F "$device"
mkdir -p "$mnt"
mount "$device" "$mnt"
for index in 1 2 3 4; do head -c 8M /dev/urandom > "$mnt/file$index"; done
(cd "$mnt" && sha256sum file* > "$data/demo.sums")
umount "$mnt"

step "detach, attach again, check the files"
$appliance volume detach demo
device=$($appliance volume attach demo)
fsck.ext4 -n -f "$device" | tail -1
mount "$device" "$mnt"
(cd "$mnt" && sha256sum -c --quiet "$data/demo.sums") && echo "all 4 files intact"
umount "$mnt"
$appliance volume list

cat <<EOF

== next
The daemon keeps running, and volume demo is attached at $device.
Its web UI is at $APPLIANCE_URL/ui/ (log in with the token in $APPLIANCE_TOKEN_FILE).
    export APPLIANCE_URL=$APPLIANCE_URL APPLIANCE_TOKEN_FILE=$APPLIANCE_TOKEN_FILE
    .venv/bin/appliance volume list
    .venv/bin/appliance snapshot create demo first
    .venv/bin/appliance volume clone demo demo-copy --snapshot first
    .venv/bin/appliance volume expand demo --size 512M --resize-fs
    mkdir -p /var/tmp/backups && .venv/bin/appliance backup-target set file:///var/tmp/backups
    .venv/bin/appliance backup create demo && .venv/bin/appliance backup list
    .venv/bin/appliance events --volume demo
    .venv/bin/appliance node show
    .venv/bin/appliance volume detach demo && .venv/bin/appliance snapshot revert demo first
    curl -s -H "Authorization: Bearer \$(cat $APPLIANCE_TOKEN_FILE)" $APPLIANCE_URL/metrics
    .venv/bin/appliance --help
EOF
