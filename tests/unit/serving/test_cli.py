"""``serve_main``: arguments to settings and engine, then uvicorn (stubbed here)."""

import json

import pytest
import uvicorn
from fastapi.testclient import TestClient

from moe_lightning.inference import CachedExperts, export_safetensors, generate
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


def test_keys_limits_and_the_model_reach_the_app(checkpoint, tmp_path, monkeypatch, capsys):
    key_file = tmp_path / "keys.json"
    serve_main(["add-key", "--key-file", str(key_file), "--name", "alice", "--role", "user"])
    alice_key = capsys.readouterr().out.strip()
    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "env-key-0123456789")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    serve_main(["--checkpoint", str(checkpoint), "--api-key-file", str(key_file), "--max-new-tokens", "7",
                "--batch-window-ms", "1.5", "--model-name", "tiny"])
    service = served[0].state.service
    assert [(key.name, sorted(key.roles)) for key in service.settings.api_keys] == [("env-0", ["admin"]),
                                                                                     ("alice", ["user"])]
    with TestClient(served[0]) as client:
        for key, metrics_status in ((alice_key, 403), ("env-key-0123456789", 200)):
            auth = {"Authorization": f"Bearer {key}"}
            assert client.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 1}, headers=auth).is_success
            assert client.get("/metrics", headers=auth).status_code == metrics_status
    assert (service.settings.max_new_tokens, service.settings.batch_window_ms) == (7, 1.5)
    assert service.settings.model_name == "tiny" and service.vocab_size == 256


def test_offloaded_experts_with_hot_experts_pinned_serve_and_report_their_hit_rate(checkpoint, tmp_path, monkeypatch):
    # A training run's statistics, by hand: per MoE layer, expert 3 then expert 1 took the most rows.
    model = tiny_model()
    stats = tmp_path / "router_stats.jsonl"
    loads = [[1.0, 5.0, 0.0, 9.0] + [0.0] * (layer.num_experts - 4) for layer in model.moe_layers]
    stats.write_text(json.dumps({"step": 10, "layers": [{"layer": i, "load": load} for i, load in enumerate(loads)]}))
    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "k")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    serve_main(["--checkpoint", str(checkpoint), "--offload-capacity", "3", "--pin-hot-from", str(stats),
                "--pin-hot", "2"])
    app = served[0]
    experts = [layer.experts for layer in app.state.service.batcher.model.moe_layers]
    assert all(isinstance(e, CachedExperts) and set(e.cache.pinned) == {3, 1} for e in experts)
    with TestClient(app) as client:
        response = client.post("/v1/generate", json={"prompts": [[1, 2, 3]], "max_new_tokens": 3},
                               headers={"Authorization": "Bearer k"})
        assert response.json()["outputs"][0]["tokens"] == generate(model, [[1, 2, 3]], 3)[0]
        metrics = client.get("/metrics", headers={"Authorization": "Bearer k"}).text
    assert "moe_lightning_expert_cache_hit_rate NaN" not in metrics


@pytest.fixture
def plan(tmp_path):
    """A plan for the tiny model from statistics where expert 2 took most rows, then expert 0; expert 2 pinned."""
    pytest.importorskip("bitsandbytes")
    from moe_lightning.inference.plan_allocation import propose_plan

    stats = tmp_path / "router_stats.jsonl"
    stats.write_text(json.dumps({"step": 10, "layers": [{"layer": 0, "load": [20.0, 1.0, 70.0, 9.0]}]}))
    path = tmp_path / "plan.json"
    propose_plan(tiny_model(), stats, "int8", formats=["bf16", "int8", "nf4"], pin=1).save(path)
    return path


def test_a_plan_quantises_the_experts_as_they_load(checkpoint, plan, monkeypatch):
    from moe_lightning.inference.plan import ServingPlan
    from moe_lightning.inference.quantization import MixedPrecisionExperts

    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "k")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    serve_main(["--checkpoint", str(checkpoint), "--plan", str(plan)])
    (layer,) = served[0].state.service.batcher.model.moe_layers
    assert isinstance(layer.experts, MixedPrecisionExperts)
    assert layer.experts.expert_formats == ServingPlan.load(plan).expert_formats[0]
    assert layer.experts.expert_formats[2] == "bf16"
    with TestClient(served[0]) as client:
        response = client.post("/v1/generate", json={"prompts": [[1, 2, 3]], "max_new_tokens": 3},
                               headers={"Authorization": "Bearer k"})
    assert len(response.json()["outputs"][0]["tokens"]) == 3


def test_a_plan_pins_its_experts_in_the_expert_cache(checkpoint, plan, monkeypatch, capsys):
    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "k")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    serve_main(["--checkpoint", str(checkpoint), "--plan", str(plan), "--offload-capacity", "2"])
    (layer,) = served[0].state.service.batcher.model.moe_layers
    assert isinstance(layer.experts, CachedExperts) and layer.experts.cache.pinned == (2,)
    assert "the plan's formats are not applied" in capsys.readouterr().out


def test_a_bad_plan_is_named(checkpoint, plan, tmp_path, monkeypatch, capsys):
    from moe_lightning.inference.quantization import quantize_model, save_quantized

    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "k")
    other = tmp_path / "other.safetensors"
    export_safetensors(tiny_model(num_experts=8), other)
    for argv, message in (
        (["--plan", str(plan), "--offload-capacity", "2", "--pin-hot-from", "stats.jsonl"],
         "--plan and --pin-hot-from both choose the pinned experts"),
        (["--plan", str(tmp_path / "missing.json")], "no serving plan at"),
        (["--plan", str(plan), "--offload-capacity", "1"], "1 pinned experts [2] leave no slot"),
    ):
        with pytest.raises(SystemExit):
            serve_main(["--checkpoint", str(checkpoint), *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_main(["--checkpoint", str(other), "--plan", str(plan)])
    assert "(plan, model) {'num_experts': (4, 8)}" in capsys.readouterr().err
    quantized = tmp_path / "nf4.safetensors"
    save_quantized(quantize_model(tiny_model(), "nf4"), quantized)
    with pytest.raises(SystemExit):
        serve_main(["--checkpoint", str(quantized), "--plan", str(plan)])
    assert "blocks.1.ffn.experts is already quantised (QuantizedExperts)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--port", "0"], "--port must be in 1..65535"), (["--max-batch-size", "0"], "max_batch_size must be >= 1"),
     (["--checkpoint", "missing.bin"], "must be a .safetensors export or a Lightning .ckpt"),
     (["--cuda-graphs", "--offload-capacity", "2"], "--cuda-graphs and --offload-capacity exclude each other"),
     (["--pin-hot-from", "stats.jsonl"], "--pin-hot-from pins experts in the expert cache"),
     (["--cuda-graphs"], "cuda_graphs=True needs the model on a CUDA device")],
)
def test_bad_arguments_are_named(checkpoint, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("MOE_LIGHTNING_API_KEYS", "k")
    with pytest.raises(SystemExit):
        serve_main(["--checkpoint", str(checkpoint), *argv])
    assert message in capsys.readouterr().err
