"""Sparse upcycling: the upcycled MoE reproduces the dense model's logits at step 0 wherever the method is exact,
the refused settings really are inexact, noise stays close, bad inputs are named, and the YAML recipe trains."""

import functools
from pathlib import Path

import pytest
import torch
import yaml

from moe_lightning.cli import MoELightningCLI
from moe_lightning.experts import FeedForward
from moe_lightning.inference.export import export_safetensors, load_safetensors
from moe_lightning.layer import MoELayer
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.models.upcycle import UpcycledTransformer, upcycle
from moe_lightning.routing import HashRouter, TopKRouter
from tests.parity.hf_tiny import save, tiny_hf_model

ROOT = Path(__file__).resolve().parents[3]
DENSE = dict(vocab_size=64, dim=32, num_layers=3, num_heads=4, dense_hidden_dim=96, first_k_dense=3, max_seq_len=32)


def dense_model(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoETransformerConfig(**{**DENSE, **overrides})).eval()


def topk(k: int, **kwargs) -> functools.partial:
    return functools.partial(TopKRouter, num_experts_per_token=k, **kwargs)


def logits(model: MoETransformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def assert_same_logits(moe: MoETransformer, dense: MoETransformer) -> None:
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = logits(dense, ids)
    torch.testing.assert_close(logits(moe, ids), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(
    "num_experts, router",
    [
        (4, topk(1)),  # Komatsuzaki et al.: top-1, the one weight renormalised to 1
        (8, topk(2)),  # top-2 over identical copies, weights renormalised
        (4, topk(4, normalize_weights=False)),  # every expert chosen: the softmax weights sum to 1 unnormalised
        (8, topk(2, score_func="sigmoid", routed_scaling_factor=2.5)),  # DeepSeek-style: down projections / 2.5
        (8, topk(2, capacity_factor=4.0)),  # capacity of every token per expert: nothing can drop
    ],
    ids=["top1", "top2", "all-unnormalised", "sigmoid-scaled", "capacity-ample"],
)
def test_plain_copies_equal_the_dense_model(num_experts, router):
    dense = dense_model()
    assert_same_logits(upcycle(dense, num_experts, router), dense)


@pytest.mark.parametrize(
    "num_experts, granularity, router, activation",
    [
        (8, 2, topk(2), "swiglu"),
        (8, 4, topk(4), "swiglu"),
        (6, 3, topk(6), "gelu"),
        (8, 2, topk(4, num_expert_groups=2, num_groups_per_token=1), "swiglu"),
    ],
    ids=["g2-top2", "g4-top4", "g3-all-gelu", "g2-expert-groups"],
)
def test_granular_slices_equal_the_dense_model(num_experts, granularity, router, activation):
    dense = dense_model(activation=activation)
    moe = upcycle(dense, num_experts, router, granularity=granularity)
    assert moe.moe_layers[0].experts.hidden_dim == 96 // granularity
    assert_same_logits(moe, dense)


@pytest.mark.parametrize(
    "attention", [dict(num_kv_heads=2, qkv_bias=True, qk_norm="head", tie_embeddings=True), dict(qk_norm="projection")],
    ids=["gqa-bias-head-norm-tied", "projection-norm"],
)
def test_attention_variants_and_tied_embeddings_are_copied(attention):
    dense = dense_model(**attention)
    with torch.no_grad():  # biases start at zero: make them matter
        for block in dense.blocks:
            for param in block.attn.parameters():
                param.add_(0.1 * torch.randn_like(param))
    moe = upcycle(dense, 4, topk(2))
    if dense.config.tie_embeddings:
        assert moe.head.weight is moe.embed.weight
    assert_same_logits(moe, dense)


def test_only_the_chosen_blocks_become_moe_and_the_rest_is_copied():
    dense = dense_model()
    before = {key: value.clone() for key, value in dense.state_dict().items()}
    moe = upcycle(dense, 4, topk(1), layers=[1])
    assert [type(block.ffn) for block in moe.blocks] == [FeedForward, MoELayer, FeedForward]
    assert moe.config.moe_layers == [1]
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # the dense model is left as it was
        if not key.startswith("blocks.1.ffn."):
            torch.testing.assert_close(moe.state_dict()[key], value, rtol=0, atol=0)
    assert_same_logits(moe, dense)


def test_noise_makes_the_copies_differ_by_about_noise_std_and_stays_close():
    dense = dense_model()
    exact = upcycle(dense, 4, topk(1))
    noisy = upcycle(dense, 4, topk(1), noise_std=0.05, seed=3)
    for name in ("w_in_EDH", "w_down_EFD"):
        copies, perturbed = getattr(exact.moe_layers[0].experts, name), getattr(noisy.moe_layers[0].experts, name)
        relative_E = (perturbed - copies).flatten(1).norm(dim=1) / copies.flatten(1).norm(dim=1)
        # Thousands of independent draws per expert: the norm ratio sits within a few percent of noise_std.
        torch.testing.assert_close(relative_E, torch.full_like(relative_E, 0.05), rtol=0.1, atol=0)
        assert not torch.equal(perturbed[0], perturbed[1])
    again = upcycle(dense, 4, topk(1), noise_std=0.05, seed=3)
    for layer, layer_again in zip(noisy.moe_layers, again.moe_layers):  # the seed alone fixes the noise
        torch.testing.assert_close(layer_again.experts.state_dict(), layer.experts.state_dict(), rtol=0, atol=0)
    ids = torch.randint(0, 64, (2, 24))
    expected, got = logits(dense, ids), logits(noisy, ids)
    assert 0 < (got - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize(
    "num_experts, router, granularity",
    [
        (8, topk(1), 2),  # top-1 picks one slice of a copy
        (8, topk(2, normalize_weights=False), 1),  # two softmax weights sum to less than 1
        (8, topk(2, capacity_factor=1.0), 1),  # an expert fills up at T/4 rows and drops tokens
        (8, HashRouter, 2),  # hashing scatters a copy's slices
    ],
    ids=["top1-g2", "unnormalised", "capacity", "hash-g2"],
)
def test_refused_settings_are_really_inexact_and_run_with_exact_false(num_experts, router, granularity):
    dense = dense_model()
    with pytest.raises(ValueError, match="exact=False"):
        upcycle(dense, num_experts, router, granularity=granularity)
    moe = upcycle(dense, num_experts, router, granularity=granularity, exact=False)
    with pytest.raises(AssertionError):
        assert_same_logits(moe, dense)


@pytest.mark.parametrize(
    "model_kwargs, upcycle_kwargs, error, message",
    [
        ({}, dict(num_experts=6, granularity=4), ValueError, "num_experts=6 is not a multiple of granularity=4"),
        ({}, dict(num_experts=10, granularity=5), ValueError, "hidden width 96 is not divisible by granularity=5"),
        ({}, dict(num_experts=8, router=topk(9)), ValueError, "top_k=9 and num_experts=8"),
        ({}, dict(num_experts=0), ValueError, "num_experts=0"),
        ({}, dict(num_experts=4, layers=[0, 3]), ValueError, r"in \[0, 3\).*layers=\[0, 3\]"),
        ({}, dict(num_experts=4, layers=[1, 1]), ValueError, r"layers=\[1, 1\]"),
        ({}, dict(num_experts=4, layers=[]), ValueError, r"layers=\[\]"),
        ({}, dict(num_experts=4, noise_std=-0.1), ValueError, "noise_std=-0.1"),
        ({}, dict(num_experts=8, router=topk(2), granularity=4), ValueError,
         "top_k=2 is not a multiple of granularity=4"),
        ({}, dict(num_experts=8, router=topk(2, routed_scaling_factor=0.0)), ValueError, "routed_scaling_factor=0"),
        ({}, dict(num_experts=8, router=topk(4, eval_capacity_factor=1.5)), ValueError, "eval_capacity_factor=1.5"),
        ({"first_k_dense": 1}, dict(num_experts=4), ValueError, r"blocks \[1, 2\] are already MoE"),
    ],
    ids=["experts-vs-g", "hidden-vs-g", "top-k", "no-experts", "layer-range", "layer-twice", "no-layers", "noise",
         "top-k-vs-g", "zero-scaling", "eval-capacity", "already-moe"],
)
def test_bad_inputs_are_named(model_kwargs, upcycle_kwargs, error, message):
    dense = dense_model(**model_kwargs)
    with pytest.raises(error, match=message):
        upcycle(dense, **upcycle_kwargs)


def test_not_a_transformer_is_a_type_error():
    with pytest.raises(TypeError, match="got FeedForward"):
        upcycle(FeedForward(8, 16), 4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_transformers_dense_checkpoint_upcycles_to_its_own_logits(model_type, tmp_path):
    pytest.importorskip("transformers")
    hf_model = tiny_hf_model(model_type)  # Qwen2: attention biases; Llama: tied embeddings, head_dim 16 != 48 / 4
    moe = UpcycledTransformer(8, dense_checkpoint=str(save(hf_model, tmp_path / model_type)), granularity=2)
    assert moe.moe_layers[0].experts.hidden_dim == 28
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
    torch.testing.assert_close(logits(moe, ids), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_upcycled_transformer_loads_a_dense_export_and_exports_a_plain_moe_transformer(tmp_path):
    dense = dense_model()
    export_safetensors(dense, tmp_path / "dense.safetensors")
    moe = UpcycledTransformer(8, dense_checkpoint=str(tmp_path / "dense.safetensors"), router=topk(2), granularity=2)
    assert_same_logits(moe, dense)
    export_safetensors(moe, tmp_path / "moe.safetensors")
    reloaded = load_safetensors(tmp_path / "moe.safetensors")
    assert type(reloaded) is MoETransformer and len(reloaded.moe_layers) == 3
    assert_same_logits(reloaded, dense)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of dense_config and dense_checkpoint"),
        (dict(dense_config=MoETransformerConfig(**DENSE), dense_checkpoint="x.safetensors"), "exactly one"),
        (dict(dense_checkpoint="no/such.safetensors"), "dense_checkpoint='no/such.safetensors' is neither"),
    ],
)
def test_upcycled_transformer_needs_one_dense_source(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UpcycledTransformer(4, **kwargs)


def test_yaml_recipe_upcycles_a_dense_export_and_trains(tmp_path):
    torch.manual_seed(0)
    dense = MoETransformer(MoETransformerConfig(**{**DENSE, "vocab_size": 256, "max_seq_len": 128})).eval()
    export_safetensors(dense, tmp_path / "dense.safetensors")
    # The recipe as a user points it at a checkpoint: dense_checkpoint in place of dense_config.
    recipe = yaml.safe_load((ROOT / "configs" / "upcycle-tiny.yaml").read_text())
    upcycling = recipe["model"]["init_args"]["model"]["init_args"]
    del upcycling["dense_config"]
    upcycling.update(dense_checkpoint=str(tmp_path / "dense.safetensors"), granularity=2)
    (tmp_path / "upcycle.yaml").write_text(yaml.safe_dump(recipe))
    cli = MoELightningCLI(
        run=False,
        args=[
            "--config", str(tmp_path / "upcycle.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1", "--data.init_args.max_bytes=100000", "--data.init_args.seq_len=32",
            "--data.init_args.batch_size=4",
        ],
        save_config_kwargs={"overwrite": True},
    )
    model = cli.model.model
    assert isinstance(model, UpcycledTransformer) and model.moe_layers[0].experts.hidden_dim == 48
    assert_same_logits(model, dense)
    model.train()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
