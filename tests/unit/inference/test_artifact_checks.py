"""What every entry point does with a truncated, corrupted, unsigned or wrongly signed checkpoint: refuse it with
one error naming the file. And a signed export loads and generates exactly what the model did."""

import dataclasses

import pytest
import torch
import yaml

from moe_lightning.checkpoint.errors import ArtifactError
from moe_lightning.checkpoint.integrity import TRUSTED_KEY_ENV, manifest_path
from moe_lightning.checkpoint.signing import generate_key_pair, sign_artifact
from moe_lightning.cli import main
from moe_lightning.inference import InferenceEngine, export_safetensors
from tests.unit.checkpoint.artifacts import flipped, seeded_flips, truncate
from tests.unit.inference.conftest import tiny_model

PROMPTS = [[1, 2, 3], [7, 5]]


@pytest.fixture(autouse=True)
def no_configured_keys(monkeypatch):
    monkeypatch.delenv(TRUSTED_KEY_ENV, raising=False)
    monkeypatch.delenv("MOE_LIGHTNING_API_KEYS", raising=False)


@pytest.fixture
def exported(tmp_path):
    path = tmp_path / "model.safetensors"
    export_safetensors(tiny_model(), path)
    return path


@pytest.fixture
def keys(tmp_path):
    return generate_key_pair(tmp_path / "signer"), generate_key_pair(tmp_path / "other")


@pytest.fixture
def lightning_checkpoint(tmp_path):
    """A ``.ckpt`` and its ``config.yaml`` in LightningCLI's layout."""
    model = tiny_model()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model_spec = {"class_path": "moe_lightning.models.MoETransformer",
                  "init_args": {"config": dataclasses.asdict(model.config)}}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"model": model_spec}}}))
    path = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"model.{key}": value for key, value in model.state_dict().items()}}, path)
    return path


def test_a_signed_export_generates_the_same_tokens_as_the_model(exported, keys):
    (private, public), _ = keys
    expected = InferenceEngine(tiny_model()).generate(PROMPTS, 8)
    sign_artifact(exported, private)
    assert InferenceEngine.from_checkpoint(exported, trusted_key=public).generate(PROMPTS, 8) == expected
    assert InferenceEngine.from_checkpoint(exported).generate(PROMPTS, 8) == expected


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned-with-manifest", "signed"])
def test_twenty_seeded_byte_flips_of_an_export_are_each_refused_by_the_engine(exported, keys, signed):
    (private, public), _ = keys
    if signed:
        sign_artifact(exported, private)
    for file, offset, mask in seeded_flips([exported], 20, seed=6):
        with flipped(file, offset, mask), pytest.raises(ArtifactError, match="is corrupt or altered") as refused:
            InferenceEngine.from_checkpoint(exported, trusted_key=public if signed else None)
        assert refused.value.path == exported and str(exported) in str(refused.value), offset


def test_the_engine_refuses_unsigned_and_other_keys_exports_with_a_trusted_key(exported, keys, monkeypatch):
    (private, public), (other_private, _) = keys
    with pytest.raises(ArtifactError, match="is not signed"):
        InferenceEngine.from_checkpoint(exported, trusted_key=public)
    sign_artifact(exported, other_private)
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(public))
    with pytest.raises(ArtifactError, match="is signed by key .*, not by the trusted key"):
        InferenceEngine.from_checkpoint(exported)


def test_a_trusted_key_refuses_a_lightning_checkpoint(lightning_checkpoint, keys):
    (_, public), _ = keys
    InferenceEngine.from_checkpoint(lightning_checkpoint)
    with pytest.raises(ArtifactError, match="cannot be signed .*`moe-lightning export "):
        InferenceEngine.from_checkpoint(lightning_checkpoint, trusted_key=public)


def run_cli(argv, capsys):
    """The exit status and the stderr of one ``moe-lightning`` command that is expected to fail."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


CLI_ENTRY_POINTS = {
    "generate": lambda path, tmp: ["generate", str(path), "--prompt-ids", "1,2"],
    "serve": lambda path, tmp: ["serve", "--checkpoint", str(path), "--insecure-no-auth"],
    "export": lambda path, tmp: ["export", str(path), str(tmp / "out.safetensors")],
    "export-hf": lambda path, tmp: ["export-hf", str(path), str(tmp / "hf"), "--family", "mixtral"],
}


@pytest.mark.parametrize("kind, entry", [
    ("safetensors", "engine"), ("safetensors", "generate"), ("safetensors", "serve"), ("safetensors", "export-hf"),
    ("ckpt", "engine"), ("ckpt", "generate"), ("ckpt", "serve"), ("ckpt", "export"),
])
def test_a_truncated_file_is_named_by_every_entry_point(kind, entry, exported, lightning_checkpoint, tmp_path, capsys):
    path = exported if kind == "safetensors" else lightning_checkpoint
    manifest_path(path).unlink(missing_ok=True)  # a file from elsewhere: only its reader can tell
    truncate(path)
    if entry == "engine":
        with pytest.raises(ArtifactError, match="is truncated or corrupt .*: write it again") as refused:
            InferenceEngine.from_checkpoint(path)
        assert refused.value.path == path and str(refused.value).startswith(str(path))
        return
    status, err = run_cli(CLI_ENTRY_POINTS[entry](path, tmp_path), capsys)
    assert status == 1 and err.count("\n") == 1, err
    assert f"error: {path} is truncated or corrupt" in err and "write it again" in err


def test_a_truncated_export_with_its_manifest_is_named_before_it_is_read(exported, capsys):
    truncate(exported)
    status, err = run_cli(["generate", str(exported), "--prompt-ids", "1,2"], capsys)
    assert status == 1 and f"error: {exported} is " in err and "but its manifest" in err and "truncated" in err
