"""The committed gRPC modules are what the .proto compiles to (regenerate: python -m moe_lightning.serving.grpc.codegen)."""

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) compiles the .proto")

from moe_lightning.serving.grpc import codegen  # noqa: E402


def test_committed_modules_equal_a_fresh_compile_of_the_proto(tmp_path):
    fresh = codegen.generate(tmp_path)
    assert [path.name for path in fresh] == list(codegen.GENERATED)
    stale = [path.name for path in fresh if path.read_text() != (codegen.PACKAGE_DIR / path.name).read_text()]
    assert not stale, (f"{stale} differ from a compile of {codegen.PROTO}: run python -m "
                       "moe_lightning.serving.grpc.codegen with the grpcio-tools version the dev extra pins")
