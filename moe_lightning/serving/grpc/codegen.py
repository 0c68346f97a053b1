"""Regenerates the committed Python modules of ``generation.proto`` (``python -m moe_lightning.serving.grpc.codegen``).

The generated modules are committed, so serving and the client need only grpcio and protobuf at run time, not the
compiler; ``tests/unit/serving/test_grpc_codegen.py`` regenerates them and fails when they differ from the
``.proto``. Generate with the grpcio-tools version the dev extra pins: the files carry its version stamp.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parents[2]
"""The directory holding ``moe_lightning/``: the proto's import root, so generated imports are absolute."""
PROTO = PACKAGE_DIR.relative_to(SOURCE_ROOT) / "generation.proto"
GENERATED = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")
"""The modules protoc writes beside the proto (messages, their type stubs, the service's stub and servicer)."""


def generate(out_root: Path) -> list[Path]:
    """Compile the proto into ``out_root`` (laid out like the source tree); returns the generated files."""
    from grpc_tools import protoc  # the dev extra: only regenerating needs the compiler

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    status = protoc.main([
        "grpc_tools.protoc", f"--proto_path={SOURCE_ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}", str(SOURCE_ROOT / PROTO),
    ])
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status} compiling {SOURCE_ROOT / PROTO}")
    return [out_root / PROTO.parent / name for name in GENERATED]


def main() -> None:
    for path in generate(SOURCE_ROOT):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
