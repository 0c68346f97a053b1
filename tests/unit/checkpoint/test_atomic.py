"""Atomic writes: a failed write leaves the old file; links and directories switch in one rename."""

import os

import pytest
import torch

from moe_lightning.checkpoint.atomic import (
    atomic_torch_save, atomic_write, partial_path, publish_directory, remove_atomically, replace_symlink,
)
from moe_lightning.checkpoint.atomic_io import AtomicCheckpointIO
from moe_lightning.checkpoint.sharded import load_sharded


def test_a_write_that_fails_part_way_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.ckpt"
    atomic_torch_save({"step": 1}, target)

    def half_then_fail(path):
        path.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert torch.load(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_checkpoint_io_writes_beside_the_target(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / "sub" / "a.ckpt")
    assert torch.load(tmp_path / "sub" / "a.ckpt")["global_step"] == 3
    assert not partial_path(tmp_path / "sub" / "a.ckpt").exists()


def test_a_link_switches_target_and_replaces_an_older_full_copy(tmp_path):
    (tmp_path / "step=1.ckpt").write_text("1")
    (tmp_path / "step=2.ckpt").write_text("2")
    (tmp_path / "last.ckpt").write_text("a full copy")
    replace_symlink(tmp_path / "last.ckpt", "step=1.ckpt")
    assert os.readlink(tmp_path / "last.ckpt") == "step=1.ckpt"
    replace_symlink(tmp_path / "last.ckpt", "step=2.ckpt")
    assert (tmp_path / "last.ckpt").read_text() == "2"


def test_a_directory_replaces_an_older_one_of_the_same_name(tmp_path):
    target = tmp_path / "step=4.ckpt"
    target.mkdir()
    (target / "old").write_text("old")
    partial = partial_path(target)
    partial.mkdir()
    (partial / "new").write_text("new")
    publish_directory(partial, target)
    assert [p.name for p in target.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_sharded_directory_without_its_manifest_is_refused_as_incomplete(tmp_path):
    (tmp_path / "meta.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="incomplete: it has no manifest.json"):
        load_sharded(tmp_path, ep_rank=0, ep_size=1)


def test_a_directory_is_removed_under_a_hidden_name(tmp_path, monkeypatch):
    target = tmp_path / "step=2.ckpt"
    target.mkdir()
    (target / "meta.pt").write_text("x")
    seen = []
    monkeypatch.setattr("shutil.rmtree", lambda path: seen.append(sorted(p.name for p in tmp_path.iterdir())))
    remove_atomically(target)
    assert seen == [[".step=2.ckpt.removed"]]  # the name was gone before any file was deleted
