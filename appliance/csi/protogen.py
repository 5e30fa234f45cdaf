"""Generate the CSI plugin's gRPC stubs from the CSI specification's ``csi.proto``.

Run at install time (setup.sh runs ``python -m appliance.csi.protogen``): the stubs are
build output, not source, and are never edited by hand. The proto is the specification's
own file, looked for in ``$CSI_PROTO``, else beside the project in
``../shared/reference/csi-spec-v1.12.0/csi.proto``; its SHA-256 must be the one of spec
v1.12.0 below, so that the plugin never speaks another version by accident.

The output goes to ``appliance/csi/proto/`` as ``csi_pb2.py``, ``csi_pb2.pyi`` and
``csi_pb2_grpc.py``. protoc names imports after the proto's path below its include root,
so the proto is copied to ``appliance/csi/proto/csi.proto`` inside a scratch include root:
the stubs then import each other as ``appliance.csi.proto.csi_pb2``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

SPEC_VERSION = "1.12.0"
PROTO_SHA256 = "5b81236a3809f3ff0b877ff9b82215d0b74a8e291d7f3ec6ee1a44f537c0f86a"
OUTPUT = Path(__file__).resolve().parent / "proto"
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def default_proto() -> Path:
    given = os.environ.get("CSI_PROTO")
    if given:
        return Path(given)
    root = Path(__file__).resolve().parents[2]
    return root.parent / "shared" / "reference" / f"csi-spec-v{SPEC_VERSION}" / "csi.proto"


def check_proto(proto: Path) -> bytes:
    """The proto's bytes; SystemExit naming the problem unless it is spec v1.12.0's."""
    try:
        data = proto.read_bytes()
    except OSError as exc:
        raise SystemExit(f"protogen: cannot read the CSI spec's csi.proto at {proto}: "
                         f"{exc.strerror}; give its path in CSI_PROTO") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != PROTO_SHA256:
        raise SystemExit(f"protogen: {proto} is not the csi.proto of CSI spec v{SPEC_VERSION} "
                         f"(SHA-256 {digest}, expected {PROTO_SHA256})")
    return data


def up_to_date(output: Path = OUTPUT) -> bool:
    stamp = output / "SOURCE_SHA256"
    return stamp.is_file() and stamp.read_text().strip() == PROTO_SHA256 and all(
        (output / name).is_file() for name in GENERATED)


def generate(proto: Path, output: Path = OUTPUT) -> None:
    from grpc_tools import protoc  # a build dependency only  # noqa: PLC0415

    data = check_proto(proto)
    includes = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        package = root / "appliance" / "csi" / "proto"
        package.mkdir(parents=True)
        (package / "csi.proto").write_bytes(data)
        status = protoc.main(["protoc", f"-I{root}", f"-I{includes}", f"--python_out={root}",
                              f"--pyi_out={root}", f"--grpc_python_out={root}",
                              "appliance/csi/proto/csi.proto"])
        if status != 0:
            raise SystemExit(f"protogen: protoc failed (status {status}) on {proto}")
        output.mkdir(exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(package / name, output / name)
    (output / "__init__.py").write_text('"""gRPC stubs generated from the CSI spec\'s '
                                        'csi.proto by appliance.csi.protogen."""\n')
    (output / "SOURCE_SHA256").write_text(PROTO_SHA256 + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.csi.protogen",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--proto", type=Path, default=None,
                        help="the spec's csi.proto (default: $CSI_PROTO, else "
                             "../shared/reference/csi-spec-v1.12.0/csi.proto)")
    parser.add_argument("--force", action="store_true", help="generate even if up to date")
    options = parser.parse_args(argv)
    if options.force or not up_to_date():
        generate(options.proto or default_proto())
        print(f"protogen: CSI v{SPEC_VERSION} stubs generated in {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
