import pytest
import torch

from moe_lightning.callbacks import ExpertCollapseGuard
from moe_lightning.callbacks.expert_reinit import reinit_dead_experts
from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.layer import MoELayer
from moe_lightning.routing import TopKRouter
from tests.unit.callbacks.fixtures import loader, tiny_module, trainer

# Every load short of perfect balance has an expert at or under the mean: a collapse at every check.
ALWAYS = dict(check_every_n_steps=1, dead_threshold=1.0)


def test_warns_after_patience_failed_checks(tmp_path):
    guard = ExpertCollapseGuard(**ALWAYS, patience=2)
    with pytest.warns(UserWarning, match="routing alarm at step 2, MoE layer 0: dead_experts="):
        trainer(tmp_path, [guard], max_steps=2).fit(tiny_module(), loader())
    assert guard.strikes[0] == [0, 0] and guard.num_reinits == 0  # the dead-experts rule fired and counts again


def test_stop_ends_training(tmp_path):
    fit = trainer(tmp_path, [ExpertCollapseGuard(**ALWAYS, patience=2, action="stop")], max_steps=10)
    with pytest.warns(UserWarning, match="action='stop'"):
        fit.fit(tiny_module(), loader())
    assert fit.global_step == 2


def test_reinit_rewrites_dead_experts_during_training(tmp_path):
    module = tiny_module()
    before = module.model.moe_layers[0].experts.w_in_EDH.detach().clone()
    guard = ExpertCollapseGuard(**ALWAYS, patience=1, action="reinit")
    with pytest.warns(UserWarning, match="action='reinit'"):
        trainer(tmp_path, [guard], max_steps=1).fit(module, loader())
    assert guard.num_reinits == 2  # both layers, once
    assert not torch.allclose(module.model.moe_layers[0].experts.w_in_EDH, before, atol=1e-3)


def test_reinit_copies_the_donor_into_dead_experts_and_forgets_their_moments():
    # Unnormalised top-1 weights, so the router gets a gradient and optimizer state too.
    layer = MoELayer(TopKRouter(8, 3, 1, normalize_weights=False), GroupedExperts(3, 8, 8))
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.randn(6, 8))[0].sum().backward()
    optimizer.step()
    originals = {name: p.detach().clone() for name, p in layer.named_parameters()}
    dead = reinit_dead_experts(layer, torch.tensor([True, False, False]), donor=2, noise=0.0,
                               generator=torch.Generator(), optimizers=[optimizer])
    assert dead == [0]
    for name, param in layer.named_parameters():
        assert torch.equal(param[0], originals[name][2]), name
        assert torch.equal(param[1:], originals[name][1:]), name
        assert optimizer.state[param]["exp_avg"][0].abs().sum() == 0
        assert optimizer.state[param]["exp_avg"][1:].abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(action="panic"), "unknown action 'panic'"), (dict(patience=0), "patience=0"),
     (dict(min_load_entropy=2), r"'load_entropy': threshold must be in \[0, 1\], got threshold=2"),
     (dict(check_every_n_steps=0), "check_every_n_steps=0")],
)
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertCollapseGuard(**kwargs)
