"""Train-serve routing parity on the CPU: the same tokens through the training forward and through each serving path
(the inference engine on an exported file, the static-shape decoder, offloaded experts, int8 and nf4 experts), under
each router numerics setting. The CUDA-graph decoder has its own test in tests/gpu.

Two checks per path:
- same input, exact: each MoE layer of the serving model, fed the training forward's input to that layer, chooses
  exactly the training forward's experts, in order;
- end to end: decoding with its own KV cache and experts, every token whose experts differ from the training
  forward's is a bf16 near-tie there. Quantised experts change the hidden states after the first MoE layer, so for
  them this holds for the first MoE layer and the other layers are reported only.

Each test prints its per-layer table (``pytest -s`` shows it): tokens, near-ties, mismatches, unexplained.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from moe_lightning.inference import CompiledDecoder, InferenceEngine, export_safetensors, generate, offload_experts
from moe_lightning.inference.quantization import quantize_model
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.routing import RouterNumerics, TopKRouter
from tests.parity.routing_parity import (
    RoutingRecorder,
    compare,
    decoded_choices,
    report,
    same_input_choices,
    training_forward,
)

CONFIG = MoETransformerConfig(
    vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=8, expert_hidden_dim=32,
    max_seq_len=48, init_std=0.2,
)
K = 2
PROMPTS = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0)).tolist()
NEW_TOKENS = 12
NUMERICS = ["float32", "float64", "bfloat16"]


def base_model(dtype: str) -> MoETransformer:
    torch.manual_seed(0)
    router = functools.partial(TopKRouter, num_experts_per_token=K, numerics=RouterNumerics(dtype))
    return MoETransformer(CONFIG, router)


def serve(model: MoETransformer, decode=None):
    """Greedy decoding of PROMPTS by ``decode()`` (default: :func:`generate` on ``model``), recorded layer by layer:
    the tokens the calls saw ``[B, L]`` and, per MoE layer, the experts chosen for them ``[B, L, K]``."""
    with RoutingRecorder(model) as recorder:
        new = decode() if decode else generate(model, PROMPTS, NEW_TOKENS)
    ids = torch.tensor([prompt + row[:-1] for prompt, row in zip(PROMPTS, new)])  # the last token is never fed
    return ids, [decoded_choices(calls, len(PROMPTS), len(PROMPTS[0])) for calls in recorder.calls]


def check(path: str, base: MoETransformer, served: MoETransformer, ids, choices, explained_layers=None):
    reference = training_forward(base, ids)
    for layer, got in enumerate(same_input_choices(served, reference)):
        assert torch.equal(got, reference.experts_BLK[layer]), f"{path}: MoE layer {layer} given the same input"
    parities = [compare(reference, layer, experts_BLK) for layer, experts_BLK in enumerate(choices)]
    print("\n" + report(path, parities))
    for layer, parity in enumerate(parities[:explained_layers]):
        assert parity.unexplained == 0, f"{path}: MoE layer {layer}: {parity}"
    return parities


@pytest.mark.parametrize("dtype", NUMERICS)
def test_inference_engine_on_an_exported_model(dtype, tmp_path):
    base = base_model(dtype)
    export_safetensors(base, tmp_path / "model.safetensors")
    engine = InferenceEngine.from_checkpoint(tmp_path / "model.safetensors")
    assert all(layer.router.numerics == RouterNumerics(dtype=dtype) for layer in engine.model.moe_layers)
    ids, choices = serve(engine.model, lambda: engine.generate(PROMPTS, NEW_TOKENS))
    check(f"engine/{dtype}", base, engine.model, ids, choices)


@pytest.mark.parametrize("dtype", NUMERICS)
def test_static_shape_decoder(dtype):
    base = base_model(dtype)
    decoder = CompiledDecoder(base, batch_buckets=(8,))  # 4 padding rows too
    ids, choices = serve(base, lambda: generate(base, PROMPTS, NEW_TOKENS, decoder=decoder))
    check(f"compiled-decoder-cpu/{dtype}", base, base, ids, choices)


@pytest.mark.parametrize("dtype", NUMERICS)
def test_offloaded_experts_route_as_the_eager_model_bit_for_bit(dtype):
    base = base_model(dtype)
    eager_ids, eager_choices = serve(base)
    offloaded = copy.deepcopy(base)
    offload_experts(offloaded, capacity=3, prefetch=True)
    ids, choices = serve(offloaded)
    assert torch.equal(ids, eager_ids)
    assert all(torch.equal(a, b) for a, b in zip(choices, eager_choices, strict=True))
    check(f"offload/{dtype}", base, offloaded, ids, choices)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantised_experts(mode):
    # One numerics setting: the router is the model's own either way (the same-input check shows it), and
    # bitsandbytes on the CPU is slow.
    pytest.importorskip("bitsandbytes")
    dtype = "float32"
    base = base_model(dtype)
    quantised = quantize_model(copy.deepcopy(base), mode)
    ids, choices = serve(quantised)
    parities = check(f"{mode}/{dtype}", base, quantised, ids, choices, explained_layers=1)
    # The later layers see the quantised experts' outputs: reported above, and still mostly the same experts.
    assert all(parity.mismatches < parity.tokens // 2 for parity in parities)
