"""Generate ``waddle_pb`` (protobuf messages, gRPC stubs, type stubs) from ``protos/``.

``python -m waddle_common.protogen [OUT_DIR]`` writes into the project root by
default; the drift test writes into a temporary folder and compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "waddle_pb").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc; return the generated files (relative to ``out_dir``)."""
    import grpc_tools
    from grpc_tools import protoc  # a dev dependency: imported only when generating

    include = Path(grpc_tools.__file__).parent / "_proto"
    pkg = out_dir / "waddle_pb"
    pkg.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    init = pkg / "__init__.py"
    init.write_text('"""Generated from protos/ by `make protos`; do not edit."""\n')
    (pkg / "py.typed").write_text("")
    return sorted(p.relative_to(out_dir) for p in pkg.iterdir() if p.is_file())


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(f"generated {path}")


if __name__ == "__main__":
    main()
