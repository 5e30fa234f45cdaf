#!/usr/bin/env bash
# Set up this machine for the appliance, then run the main job.
#
#   ./setup.sh            install what is missing, then run the demo
#   ./setup.sh --no-demo  install only
#
# Installs the Debian packages the appliance and its tests use, and a virtualenv at .venv
# made from the system's /usr/bin/python3 (nbdkit's Python plugin embeds that interpreter,
# so the engine can import the project from the same virtualenv). Idempotent: it installs
# only what is missing and can be run again at any time. Needs root for apt.
set -euo pipefail
cd "$(dirname "$0")"

demo=1
for arg in "$@"; do
    case "$arg" in
        --no-demo) demo=0 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

packages=(
    python3 python3-venv python3-dev pkg-config    # the virtualenv and packages built from source
    qemu-utils e2fsprogs xfsprogs util-linux       # images, filesystems, loop devices
    nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd fio   # the NBD data path and its clients
    stress-ng                                      # CPU load under the reliability tests
    fuse3 libfuse3-dev nftables iproute2           # attach, and test hosts in network namespaces
    gcc                                            # builds the tests' FUSE file system (hungfs)
    prometheus                                     # promtool checks the metrics exposition
    etcd-server etcd-client                        # the cluster's state store (and its tests)
    lintian shellcheck openssh-server              # the .deb's and the scripts' checks; SSH into test hosts
    kmod nbd-client python3-cryptography           # what the Ansible roles install (their tests are offline)
    tgt libiscsi-bin libiscsi-dev qemu-block-extra # the iSCSI frontend, its initiators and its load generator
    nfs-ganesha nfs-ganesha-vfs libnfs-utils rpcbind   # RWX shares over NFS and their clients
    chromium                                       # the browser of the web UI's tests
)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: run as root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

python=/usr/bin/python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    # Ubuntu 22.04 ships Python 3.10 as python3; its python3.11 packages serve instead.
    if [ ! -x /usr/bin/python3.11 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv \
            python3.11-dev >/dev/null
    fi
    python=/usr/bin/python3.11
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
    rm -rf .venv
    "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum <pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    echo "setup.sh: installing the Python packages into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 \
        | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
        | grep -v '^WARNING: Location' || true
    .venv/bin/python -c 'import appliance.cli.main'   # fail here if the install did not work
    rm -f .venv/.installed-*
    touch "$stamp"
fi
# the web UI's browser-side packages (appliance/ui/package.json: htmx, Pico CSS, and axe-core
# for the tests), from the npm registry as the lock file pins them; never committed
if ! command -v npm >/dev/null; then
    echo "setup.sh: installing nodejs and npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
ui_stamp="appliance/ui/node_modules/.installed-$(sha256sum <appliance/ui/package-lock.json | cut -c1-16)"
if [ ! -e "$ui_stamp" ]; then
    echo "setup.sh: installing the web UI's npm packages into appliance/ui/node_modules"
    (cd appliance/ui && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    touch "$ui_stamp"
fi
# the CSI plugin's gRPC stubs, generated from the CSI spec's csi.proto (CSI_PROTO, default
# ../shared/reference/csi-spec-v1.12.0/csi.proto); nothing is done when they are current
.venv/bin/python -m appliance.csi.protogen
echo "setup.sh: ready (.venv/bin/appliance)"

if [ "$demo" = 1 ]; then
    exec scripts/demo.sh
fi
