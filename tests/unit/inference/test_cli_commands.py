"""``moe-lightning export`` and ``generate`` on a real (tiny) training run's checkpoint."""

from pathlib import Path

import pytest

from moe_lightning.cli import MoELightningCLI, main
from moe_lightning.inference import InferenceEngine

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cli = MoELightningCLI(
        run=False,
        args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
              "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={root}",
              "--data.init_args.max_bytes=200000"],
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def test_export_then_generate_match_the_checkpoint(trained_checkpoint, tmp_path, capsys):
    exported = tmp_path / "model.safetensors"
    main(["export", str(trained_checkpoint), str(exported)])
    capsys.readouterr()
    main(["generate", str(exported), "--prompt", "def ", "--max-new-tokens", "6"])
    printed = capsys.readouterr().out.rstrip("\n")

    expected = InferenceEngine.from_checkpoint(trained_checkpoint).generate([list(b"def ")], 6)[0]
    assert printed == "def " + bytes(expected).decode(errors="replace")


def test_generate_names_a_bad_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "model.bin"), "--prompt-ids", "1,2"])
    assert "model.bin" in capsys.readouterr().err
