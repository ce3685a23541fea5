"""Regenerate the Python stubs (and .pyi) from protos/ into OUT (default: the repo root).

`make protos` runs this; tests/unit/test_protos.py runs it into a temp dir and fails on drift.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    sources = sorted(PROTOS.glob("loopserve/*/v1/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for src in sources:
        pkg = out / src.parent.relative_to(PROTOS)
        for parent in [pkg, *pkg.parents]:
            if parent == out or parent == out / "loopserve":
                break
            (parent / "__init__.py").touch()
        written.extend(sorted(pkg.glob("*_pb2*.py*")))
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path.relative_to(out))
