import functools

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from moe_lightning.callbacks.capacity_tuner import (
    CapacityAutoTuner,
    capacity_factor_for_drop_rate,
    imputed_requested_load,
)
from moe_lightning.data import SyntheticTasksDataModule
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.module import MoELightningModule
from moe_lightning.routing import ExpertChoiceRouter, TopKRouter
from tests.unit.callbacks.fixtures import CONFIG, RecordingLogger, StepRecorder, loader, trainer


@pytest.mark.parametrize(
    "loads, drop_rate, factor",
    [
        # 8 rows over 4 experts (mean 2): capacity 3 x 2 = 6 keeps everything; 2 x 2 = 4 drops 2 of the 6 rows: 25%.
        ([[6, 2, 0, 0]], 0.0, 3.0),
        ([[6, 2, 0, 0]], 0.25, 2.0),
        ([[4, 4, 0, 0]], 0.0, 2.0),
        # Means 2 and 4: f = 1 caps them at 2 and 4 rows, dropping 1 of the first sample's 3: 1 of all 12 rows.
        ([[3, 1], [4, 4]], 1 / 12, 1.0),
        # Between kinks: f = 1.25 caps at 2.5 and 5 rows, dropping 0.5 of the 12.
        ([[3, 1], [4, 4]], 0.5 / 12, 1.25),
    ],
)
def test_factor_solves_hand_computed_loads(loads, drop_rate, factor):
    assert capacity_factor_for_drop_rate(torch.tensor(loads), drop_rate) == pytest.approx(factor)


def test_factor_of_no_rows_is_none():
    assert capacity_factor_for_drop_rate(torch.zeros(2, 4), 0.1) is None


def test_imputation_gives_the_dropped_rows_to_one_full_expert():
    kept = torch.tensor([[4, 4, 1, 0], [1, 3, 0, 0]])
    imputed = imputed_requested_load(kept, torch.tensor([3, 0]))
    assert imputed.tolist() == [[7, 4, 1, 0], [1, 3, 0, 0]]


def skewed_router_window(num_batches=5, tokens=128, seed=0):
    """A top-2 router over 8 experts with sharpened scores, and the fixed batches of one window."""
    torch.manual_seed(seed)
    router = TopKRouter(16, 8, 2).train()
    with torch.no_grad():
        router.gate.weight.mul_(3)
    batches = [torch.randn(tokens, 16) for _ in range(num_batches)]

    def route(capacity_factor):
        router.capacity_factor = capacity_factor
        with torch.no_grad():
            routings = [router(x) for x in batches]
        kept = torch.stack([r.tokens_per_expert_E for r in routings])
        dropped = torch.stack([r.num_dropped for r in routings])
        return kept, dropped, float(dropped.sum()) / sum(r.num_requested for r in routings)

    return route


@pytest.mark.parametrize("target", [0.0, 0.02, 0.1])
def test_the_router_drops_the_target_share_at_the_factor_solved_from_dropless_loads(target):
    route = skewed_router_window()
    kept, _, _ = route(None)
    _, _, dropped = route(capacity_factor_for_drop_rate(kept, target))
    # The router rounds each capacity up to whole rows: at most one row per expert and batch fewer dropped.
    assert target - 8 * 5 / (5 * 128 * 2) <= dropped <= target + 1e-12


def test_from_a_capped_window_a_raise_drops_at_most_the_target_and_the_next_update_is_exact():
    route = skewed_router_window()
    exact = capacity_factor_for_drop_rate(route(None)[0], 0.02)
    factor, factors, drops = 1.0, [], []
    for _ in range(3):
        kept, dropped, share = route(factor)
        factors.append(factor)
        drops.append(share)
        factor = capacity_factor_for_drop_rate(imputed_requested_load(kept, dropped), 0.02)
    assert drops[0] > 0.05  # a factor of 1 drops 9% here
    assert factors[1] >= exact and drops[1] <= 0.02
    assert factors[2] == pytest.approx(exact) and factor == pytest.approx(exact)
    assert abs(drops[2] - 0.02) <= 0.005


def synthetic_run(tmp_path, tuner, capacity_factor, max_steps, callbacks=(), ckpt_path=None, lr=3e-3, **kwargs):
    """Train a 2-layer top-2 MoE on the synthetic tasks (8 x 64 tokens a step) with ``tuner``; return its logger
    and module."""
    torch.manual_seed(0)
    data = SyntheticTasksDataModule(seq_len=64, batch_size=8, num_train_samples=1024, num_val_samples=8)
    config = MoETransformerConfig(vocab_size=data.vocab_size, dim=32, num_layers=2, num_heads=2, num_experts=8,
                                  expert_hidden_dim=32, max_seq_len=64)
    router = functools.partial(TopKRouter, num_experts_per_token=2, capacity_factor=capacity_factor)
    module = MoELightningModule(MoETransformer(config, router=router), lr=lr, warmup_steps=5, log_layer_stats=False)
    logger = RecordingLogger()
    fit = trainer(tmp_path, [tuner, *callbacks], logger=logger, max_steps=max_steps, limit_val_batches=0, **kwargs)
    fit.fit(module, data, ckpt_path=ckpt_path)
    return logger, module


def window_drops(logger, layer):
    return [m[f"capacity/layer{layer}/dropped_fraction"] for _, m in sorted(logger.metrics.items())
            if f"capacity/layer{layer}/dropped_fraction" in m]


def test_on_the_synthetic_tasks_the_drop_is_in_the_band_after_two_updates_and_stays(tmp_path):
    # A small learning rate keeps the loads nearly still, so the windows differ by their batches only: the control
    # rule alone is under test. (At 3e-3 the loads move within a window; the README has that case.)
    target, tolerance = 0.05, 0.025
    tuner = CapacityAutoTuner(target_drop_rate=target, tolerance=tolerance, check_every_n_steps=10)
    logger, module = synthetic_run(tmp_path, tuner, capacity_factor=1.0, max_steps=40, lr=1e-5)
    for layer, moe in enumerate(module.model.moe_layers):
        drops = window_drops(logger, layer)
        assert len(drops) == 4 and drops[0] > 0.1, drops  # a factor of 1 drops over 10% at first
        assert drops[1] <= target, drops  # a raise drops at most the target
        assert moe.router.capacity_factor == tuner.capacity_factors[layer] > 1.0
        assert logger.metrics[40][f"capacity/layer{layer}/capacity_factor"] == tuner.capacity_factors[layer]
    # The lowering after the raise is exact. Only for the first MoE layer, though: a later one's inputs, and so its
    # loads, change when the factors before it do, which can take it another update.
    assert all(abs(d - target) <= tolerance for d in window_drops(logger, 0)[2:]), window_drops(logger, 0)


def test_a_dropless_router_is_tuned_at_the_first_check_from_its_exact_loads(tmp_path):
    recorder = StepRecorder()
    tuner = CapacityAutoTuner(target_drop_rate=0.05, check_every_n_steps=3, window_steps=2)
    synthetic_run(tmp_path, tuner, capacity_factor=None, max_steps=3, callbacks=[recorder])
    for layer in (0, 1):
        loads = torch.stack([recorder.steps[step][0][layer].tokens_per_expert_E for step in (2, 3)])
        assert tuner.capacity_factors[layer] == pytest.approx(capacity_factor_for_drop_rate(loads, 0.05))


@pytest.mark.parametrize(
    "target, start, bound",
    [(0.0, 1.0, dict(max_capacity_factor=1.1)),  # dropping nothing needs more than 1.1 here
     (0.5, None, dict(min_capacity_factor=1.5))],  # dropping half needs less than 1
)
def test_the_factor_stays_inside_the_bounds(tmp_path, target, start, bound):
    tuner = CapacityAutoTuner(target_drop_rate=target, check_every_n_steps=2, **bound)
    synthetic_run(tmp_path, tuner, capacity_factor=start, max_steps=2)
    (value,) = bound.values()
    assert tuner.capacity_factors == {0: value, 1: value}


def test_within_the_dead_band_nothing_changes(tmp_path):
    tuner = CapacityAutoTuner(target_drop_rate=0.5, tolerance=0.5, check_every_n_steps=2)
    synthetic_run(tmp_path, tuner, capacity_factor=1.0, max_steps=4)
    assert tuner.capacity_factors == {0: 1.0, 1: 1.0} and tuner.strikes == {0: 0, 1: 0}


def test_patience_waits_for_consecutive_checks_outside_the_band(tmp_path):
    tuner = CapacityAutoTuner(target_drop_rate=0.0, check_every_n_steps=1, patience=3)
    synthetic_run(tmp_path, tuner, capacity_factor=1.0, max_steps=2)
    assert tuner.capacity_factors == {0: 1.0, 1: 1.0} and tuner.strikes == {0: 2, 1: 2}


def test_a_resumed_run_sets_the_tuned_factors_which_the_model_checkpoint_lacks(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=5)
    kwargs = dict(target_drop_rate=0.05, check_every_n_steps=3, window_steps=2)  # checks at 3 and 6
    first = CapacityAutoTuner(**kwargs)
    synthetic_run(tmp_path, first, 1.0, max_steps=5, callbacks=[checkpoint], enable_checkpointing=True)
    tuned = dict(first.capacity_factors)
    assert tuned != {0: 1.0, 1: 1.0}
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert not any("capacity" in key for key in saved["state_dict"])  # a plain router attribute, not a buffer
    assert len(saved["callbacks"]["CapacityAutoTuner"]["window"]) == 1  # step 5 of the window checked at 6

    seen = {}

    class FactorsAtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({i: m.router.capacity_factor for i, m in enumerate(pl_module.model.moe_layers)})

    resumed = CapacityAutoTuner(**kwargs)
    synthetic_run(tmp_path, resumed, 1.0, max_steps=6, callbacks=[FactorsAtStart()],
                  ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert seen == tuned


def test_a_model_without_top_k_routers_is_refused(tmp_path):
    model = MoETransformer(CONFIG, router=ExpertChoiceRouter)
    message = r"tunes TopKRouter layers; the model has none \(routers: \['ExpertChoiceRouter'\]\)"
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, [CapacityAutoTuner()], max_steps=1).fit(MoELightningModule(model, warmup_steps=1), loader())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(target_drop_rate=1.0), ValueError, r"target_drop_rate must be in \[0, 1\), got target_drop_rate=1.0"),
        (dict(target_drop_rate=-0.1), ValueError, "got target_drop_rate=-0.1"),
        (dict(target_drop_rate="0.1"), TypeError, "target_drop_rate must be a number, got target_drop_rate='0.1'"),
        (dict(tolerance=-1), ValueError, "tolerance=-1"),
        (dict(min_capacity_factor=0), ValueError, "min_capacity_factor must be > 0, got min_capacity_factor=0"),
        (dict(min_capacity_factor=2.0, max_capacity_factor=1.5), ValueError,
         "got min_capacity_factor=2.0 and max_capacity_factor=1.5"),
        (dict(max_capacity_factor=None), TypeError, "max_capacity_factor=None"),
        (dict(patience=0), ValueError, "patience=0"),
        (dict(check_every_n_steps=4, window_steps=5), ValueError, "window=5"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        CapacityAutoTuner(**kwargs)
