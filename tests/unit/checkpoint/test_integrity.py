"""Hash manifests and Ed25519 signatures of a multi-shard artifact: every corruption is refused, naming the file."""

import json
import os

import pytest
import torch

from moe_lightning.checkpoint.errors import ArtifactError
from moe_lightning.checkpoint.integrity import (
    TRUSTED_KEY_ENV,
    check_artifact,
    manifest_path,
    signature_path,
    verify_manifest,
    write_manifest,
)
from moe_lightning.checkpoint.resharding import consolidate
from moe_lightning.checkpoint.sharded import local_slice, save_sharded
from moe_lightning.checkpoint.signing import generate_key_pair, key_id, load_public_key, sign_artifact, verify_signed
from tests.unit.checkpoint.artifacts import flipped, seeded_flips, truncate

EP_SIZE = 4
EXPERT_KEY = "model/layers.1.experts.w_up_EDF"


@pytest.fixture
def sharded(tmp_path):
    """A sharded checkpoint directory as four expert-parallel ranks write it (meta.pt + 4 shards), manifest last."""
    torch.manual_seed(0)
    path = tmp_path / "step=10.ckpt"
    path.mkdir()
    full = torch.randn(8, 16, 24)
    checkpoint = {"state_dict": {"embed.weight": torch.randn(32, 16)}, "global_step": 10}
    info = {"expert_names": [EXPERT_KEY.removeprefix("model/")], "optimizer_param_names": []}
    for rank in range(EP_SIZE):
        save_sharded(path, checkpoint, {EXPERT_KEY: local_slice(full, rank, EP_SIZE)}, info, rank, EP_SIZE,
                     write_meta=rank == 0, write_experts=True)
    write_manifest(path)
    return path, full


@pytest.fixture
def keys(tmp_path):
    return generate_key_pair(tmp_path / "signer"), generate_key_pair(tmp_path / "other")


def test_the_manifest_lists_every_file_and_the_checkpoint_still_loads(sharded):
    path, full = sharded
    manifest = json.loads(manifest_path(path).read_text())
    shards = sorted(f.name for f in path.glob("experts-*.safetensors"))
    assert sorted(manifest["files"]) == sorted(["meta.pt", *shards]) and len(shards) == EP_SIZE
    assert manifest["files"][shards[2]]["metadata"] == {"ep_rank": "2", "ep_size": "4"}
    assert verify_manifest(path, required=True)
    assert torch.equal(consolidate(path)["state_dict"][EXPERT_KEY.removeprefix("model/")], full)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned-with-manifest", "signed"])
def test_twenty_seeded_byte_flips_across_the_shards_are_each_refused_naming_the_file(sharded, keys, signed):
    path, _ = sharded
    (private, public), _ = keys
    if signed:
        sign_artifact(path, private)
    check = (lambda: verify_signed(path, public)) if signed else (lambda: verify_manifest(path))
    shards = sorted(path.glob("experts-*.safetensors"))
    flips = seeded_flips(shards, 20, seed=18)
    assert {file for file, _, _ in flips} == set(shards)  # header and data flips in every shard
    for file, offset, mask in flips:
        with flipped(file, offset, mask), pytest.raises(ArtifactError, match="corrupt or altered") as refused:
            check()
        assert refused.value.path == file and str(file) in str(refused.value), (file.name, offset)
    check()  # every flip was undone: the check itself passes on the intact artifact


def test_missing_unlisted_and_truncated_files_are_named(sharded):
    path, _ = sharded
    shard = next(path.glob("experts-00001-*.safetensors"))
    extra = path / "experts-00009-of-00004.safetensors"
    extra.write_bytes(shard.read_bytes())
    with pytest.raises(ArtifactError, match="is not in the manifest") as refused:
        verify_manifest(path)
    assert refused.value.path == extra
    extra.unlink()
    truncate(shard)
    with pytest.raises(ArtifactError, match="bytes but its manifest .* it is truncated") as refused:
        verify_manifest(path)
    assert refused.value.path == shard and str(shard) in str(refused.value)
    shard.unlink()
    with pytest.raises(ArtifactError, match=f"lacks \\['{shard.name}'\\] listed in its manifest"):
        verify_manifest(path)


def test_a_corrupt_manifest_is_named(sharded):
    path, _ = sharded
    manifest = manifest_path(path)
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(ArtifactError, match="is corrupt") as refused:
        verify_manifest(path)
    assert refused.value.path == manifest


def test_another_keys_signature_is_refused_naming_both_keys(sharded, keys):
    path, _ = sharded
    (private, public), (other_private, other_public) = keys
    sign_artifact(path, other_private)
    signer, trusted = key_id(load_public_key(other_public)), key_id(load_public_key(public))
    with pytest.raises(ArtifactError, match=f"signed by key {signer}, not by the trusted key {trusted}") as refused:
        verify_signed(path, public)
    assert refused.value.path == signature_path(path)
    assert verify_signed(path, other_public) == signer


def test_a_manifest_rewritten_after_signing_is_refused(sharded, keys):
    """An attacker who replaces a shard and rewrites the manifest to match still lacks the key."""
    path, _ = sharded
    (private, public), _ = keys
    sign_artifact(path, private)
    shard = next(path.glob("experts-00000-*.safetensors"))
    shard.write_bytes(next(path.glob("experts-00003-*.safetensors")).read_bytes())
    signature = signature_path(path).read_bytes()
    write_manifest(path)  # removes the stale signature ...
    assert not signature_path(path).exists()
    signature_path(path).write_bytes(signature)  # ... which the attacker puts back
    with pytest.raises(ArtifactError, match="altered after it was signed") as refused:
        verify_signed(path, public)
    assert refused.value.path == manifest_path(path)


def test_a_trusted_key_refuses_an_unsigned_artifact_and_comes_from_the_environment(sharded, keys, monkeypatch):
    path, _ = sharded
    (private, public), _ = keys
    check_artifact(path)  # no key configured: the manifest suffices
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(public))
    with pytest.raises(ArtifactError, match="is not signed") as refused:
        check_artifact(path)
    assert f"`moe-lightning sign {path} --key PRIVATE_KEY`" in str(refused.value)
    sign_artifact(path, private)
    check_artifact(path)


def test_signing_refuses_an_artifact_that_no_longer_matches_its_manifest(sharded, keys):
    path, _ = sharded
    (private, _), _ = keys
    file, offset, mask = seeded_flips(sorted(path.glob("experts-*.safetensors")), 1, seed=3)[0]
    with flipped(file, offset, mask), pytest.raises(ArtifactError) as refused:
        sign_artifact(path, private)
    assert refused.value.path == file
    assert not signature_path(path).exists()


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public = generate_key_pair(tmp_path / "k")
    assert public.name == "k.pub" and oct(os.stat(private).st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="already exist"):
        generate_key_pair(tmp_path / "k")
    with pytest.raises(ValueError, match=f"{private} holds a Ed25519PrivateKey, not an Ed25519 public key|"
                                         f"{private} is not a PEM public key"):
        load_public_key(private)
