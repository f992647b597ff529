"""Regenerates prfaas/v1/*_pb2*.py from protos/prfaas/v1/*.proto.

Run: python scripts/gen_protos.py   (tests/test_protos_fresh.py fails when the output is stale)
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "prfaas" / "v1").glob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out_dir / "prfaas" / "v1" / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC code. Do not edit: run scripts/gen_protos.py."""\n')


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    generate(out)
    print(f"generated into {out / 'prfaas' / 'v1'}")
