"""``moe-lightning keygen``, ``sign`` and ``verify`` on a multi-shard transformers export written by ``export-hf``."""

import pytest

from moe_lightning.checkpoint.integrity import manifest_path, signature_path
from moe_lightning.cli import main
from moe_lightning.inference import export_safetensors
from tests.unit.checkpoint.artifacts import flipped, seeded_flips
from tests.unit.inference.conftest import tiny_model

pytest.importorskip("transformers", reason="export-hf needs the hf extra")


def run(argv, capsys):
    """The exit status (0: success), stdout and stderr of one ``moe-lightning`` command."""
    capsys.readouterr()
    try:
        main(argv)
        status = 0
    except SystemExit as exited:
        status = exited.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def hf_export(tmp_path, capsys):
    exported = tmp_path / "model.safetensors"
    export_safetensors(tiny_model(first_k_dense=0), exported)
    out_dir = tmp_path / "hf"
    assert run(["export-hf", str(exported), str(out_dir), "--family", "mixtral", "--max-shard-bytes", "40000"],
               capsys)[0] == 0
    return out_dir


def test_keygen_sign_verify_and_refusals(hf_export, tmp_path, capsys):
    shards = sorted(hf_export.glob("model-*.safetensors"))
    assert len(shards) > 3 and manifest_path(hf_export).is_file()  # export-hf wrote the manifest last
    assert run(["verify", str(hf_export)], capsys)[:2] == (
        0, f"verified: {hf_export} ({len(shards) + 2} file(s) match the manifest; unsigned check: give --public-key "
           "to check the signature)\n")
    for name in ("signer", "other"):
        assert run(["keygen", str(tmp_path / name)], capsys)[0] == 0
    status, _, err = run(["keygen", str(tmp_path / "signer")], capsys)
    assert status == 2 and "already exist" in err

    status, out, _ = run(["sign", str(hf_export), "--key", str(tmp_path / "signer")], capsys)
    assert status == 0 and str(signature_path(hf_export)) in out
    status, out, _ = run(["verify", str(hf_export), "--public-key", str(tmp_path / "signer.pub")], capsys)
    assert status == 0 and "signed by key" in out

    status, _, err = run(["verify", str(hf_export), "--public-key", str(tmp_path / "other.pub")], capsys)
    assert status == 1 and err.count("\n") == 1 and "not by the trusted key" in err
    for file, offset, mask in seeded_flips(shards, 4, seed=1):
        with flipped(file, offset, mask):
            status, _, err = run(["verify", str(hf_export), "--public-key", str(tmp_path / "signer.pub")], capsys)
        assert status == 1 and f"error: {file} is corrupt or altered" in err


def test_sign_refuses_a_lightning_checkpoint_and_a_missing_key(tmp_path, capsys):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"not checked")
    status, _, err = run(["sign", str(checkpoint), "--key", str(tmp_path / "absent")], capsys)
    assert status == 2 and "private key" in err and "does not exist" in err
    run(["keygen", str(tmp_path / "k")], capsys)
    status, _, err = run(["sign", str(checkpoint), "--key", str(tmp_path / "k")], capsys)
    assert status == 2 and "is not a .safetensors file or a directory" in err and "export it first" in err
