"""Generate the committed gRPC/protobuf stubs from proto/ (what `make proto` runs).

protoc writes absolute imports (`from opd.teacher.v1 import ...`); they are rewritten to
live under `opd_client._proto` so the stubs need no sys.path tricks. `render()` returns
the files without writing them, so a test can check the committed copies are fresh.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROTO_ROOT = REPO / "proto"
PROTOS = ["opd/teacher/v1/teacher.proto"]
PACKAGE_DIRS = ["opd", "opd/teacher", "opd/teacher/v1"]


def render() -> dict[str, str]:
    """Return {relative path under _proto: file text} as `make proto` would write them."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}",
                f"--pyi_out={out}", *[str(PROTO_ROOT / p) for p in PROTOS]]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        files = {}
        for path in sorted(Path(out).rglob("*.py*")):
            text = re.sub(r"^from opd\.", "from opd_client._proto.opd.", path.read_text(), flags=re.M)
            files[str(path.relative_to(out))] = text
    for d in PACKAGE_DIRS:
        files[f"{d}/__init__.py"] = ""
    return files


def main() -> int:
    for rel, text in render().items():
        target = HERE / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
