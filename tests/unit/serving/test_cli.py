"""``serve_main``: arguments to settings and engine, then uvicorn (stubbed here)."""

import pytest
import uvicorn

from moe_lightning.inference import export_safetensors
from moe_lightning.serving.cli import serve_main
from tests.unit.serving.conftest import tiny_model


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    export_safetensors(tiny_model(), path)
    return path


def test_serving_without_a_key_is_refused_unless_insecure_is_explicit(checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("MOE_LIGHTNING_API_KEYS", raising=False)
    with pytest.raises(SystemExit):
        serve_main(["--checkpoint", str(checkpoint)])
    assert "no API key configured" in capsys.readouterr().err
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append((app, kwargs)))
    serve_main(["--checkpoint", str(checkpoint), "--insecure-no-auth", "--port", "8123"])
    assert served[0][1]["port"] == 8123 and "WITHOUT authentication" in capsys.readouterr().out


def test_keys_limits_and_the_model_reach_the_app(checkpoint, tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("file-key\n")
    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "env-key")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    serve_main(["--checkpoint", str(checkpoint), "--api-key-file", str(key_file), "--max-new-tokens", "7",
                "--batch-window-ms", "1.5", "--model-name", "tiny"])
    service = served[0].state.service
    assert service.settings.api_keys == ("env-key", "file-key")
    assert (service.settings.max_new_tokens, service.settings.batch_window_ms) == (7, 1.5)
    assert service.settings.model_name == "tiny" and service.vocab_size == 256


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--port", "0"], "--port must be in 1..65535"), (["--max-batch-size", "0"], "max_batch_size must be >= 1"),
     (["--checkpoint", "missing.bin"], "must be a .safetensors export or a Lightning .ckpt")],
)
def test_bad_arguments_are_named(checkpoint, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "k")
    with pytest.raises(SystemExit):
        serve_main(["--checkpoint", str(checkpoint), *argv])
    assert message in capsys.readouterr().err
