"""Router losses against numbers worked out by hand from their formulas, and plain-Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lightning.routing import TopKRouter
from moe_lightning.routing.base import Routing
from moe_lightning.routing.losses import expert_bias_step, load_balancing_loss, router_z_loss, sequence_aux_loss


def _routing(probs: list[list[float]], experts: list[list[int]]) -> Routing:
    """A routing with the given per-token probabilities and chosen experts (token-major rows)."""
    probs_TE = torch.tensor(probs)
    token_idx_N = torch.tensor([t for t, chosen in enumerate(experts) for _ in chosen])
    expert_idx_N = torch.tensor([e for chosen in experts for e in chosen])
    return Routing(
        token_idx_N=token_idx_N,
        expert_idx_N=expert_idx_N,
        weight_N=torch.ones(len(expert_idx_N)),
        tokens_per_expert_E=torch.bincount(expert_idx_N, minlength=probs_TE.shape[1]),
        logits_TE=probs_TE.log(),
        probs_TE=probs_TE,
        num_dropped=torch.tensor(0),
        num_requested=len(expert_idx_N),
    )


# 4 tokens, 2 experts, top-1: experts 0, 0, 1, 0.
PROBS = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]
CHOICE = [[0], [0], [1], [0]]


def _loop_balance(probs, experts, k, valid=None):
    """E * sum_e f_e P_e over the valid tokens, with explicit loops."""
    valid = [True] * len(probs) if valid is None else valid
    tokens = [t for t in range(len(probs)) if valid[t]]
    num_experts = len(probs[0])
    total = 0.0
    for e in range(num_experts):
        f = sum(experts[t].count(e) for t in tokens) / (len(tokens) * k)
        p = sum(probs[t][e] / sum(probs[t]) for t in tokens) / len(tokens)
        total += f * p
    return num_experts * total


def test_load_balancing_hand_case():
    # f = (3/4, 1/4); P = ((.9+.6+.3+.8)/4, (.1+.4+.7+.2)/4) = (.65, .35); 2 * (.75*.65 + .25*.35) = 1.15
    assert load_balancing_loss(_routing(PROBS, CHOICE), 1).item() == pytest.approx(1.15, abs=1e-6)


def test_z_loss_hand_case():
    # logsumexp(0, 0) = ln 2; logsumexp(ln 3, 0) = ln 4 = 2 ln 2; mean of squares = (1 + 4) / 2 * (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)


def test_sequence_aux_hand_case():
    # Sequence 0 (tokens 0, 1): f = (1, 0), P = (.75, .25) -> 2 * .75 = 1.5.
    # Sequence 1 (tokens 2, 3): f = (.5, .5), P = (.55, .45) -> 2 * (.275 + .225) = 1.0.  Mean: 1.25.
    assert sequence_aux_loss(_routing(PROBS, CHOICE), 1, 2).item() == pytest.approx(1.25, abs=1e-6)
    # One sequence of four tokens is the batch-level loss.
    assert sequence_aux_loss(_routing(PROBS, CHOICE), 1, 4).item() == pytest.approx(1.15, abs=1e-6)


@pytest.mark.parametrize(
    ("num_experts", "experts"),
    [(2, [[0], [1], [0], [1]]), (4, [[0, 1], [2, 3], [1, 2], [3, 0]]), (3, [[0, 1, 2]] * 4)],
)
def test_balanced_uniform_scores_exactly_one(num_experts, experts):
    probs = [[1.0 / num_experts] * num_experts] * 4
    k = len(experts[0])
    routing = _routing(probs, experts)
    assert load_balancing_loss(routing, k).item() == pytest.approx(1.0, abs=1e-6)
    assert sequence_aux_loss(routing, k, 4).item() == pytest.approx(1.0, abs=1e-6)


def test_collapse_scores_higher():
    balanced = _routing([[0.5, 0.5]] * 4, [[0], [1], [0], [1]])
    collapsed = _routing([[0.99, 0.01]] * 4, [[0]] * 4)
    assert load_balancing_loss(collapsed, 1).item() == pytest.approx(2 * 0.99, abs=1e-6)
    assert load_balancing_loss(collapsed, 1) > load_balancing_loss(balanced, 1)
    assert sequence_aux_loss(collapsed, 1, 2) > sequence_aux_loss(balanced, 1, 2)


def test_sigmoid_scores_are_normalised_per_token():
    scaled = [[2 * p for p in row] for row in PROBS]  # per-token scale does not change the distribution
    assert load_balancing_loss(_routing(scaled, CHOICE), 1).item() == pytest.approx(1.15, abs=1e-6)


def test_padding_is_excluded():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 3), dim=-1).tolist()
    experts = [[0, 1], [1, 2], [0, 2], [2, 1], [0, 1], [1, 0]]
    valid = [True, True, False, True, True, False]
    mask = torch.tensor(valid)
    routing = _routing(probs, experts)
    kept = _routing([p for p, v in zip(probs, valid) if v], [e for e, v in zip(experts, valid) if v])

    masked = load_balancing_loss(routing, 2, mask).item()
    assert masked == pytest.approx(load_balancing_loss(kept, 2).item(), rel=1e-6)
    assert masked == pytest.approx(_loop_balance(probs, experts, 2, valid), rel=1e-6)
    z_masked = router_z_loss(routing.logits_TE, mask).item()
    assert z_masked == pytest.approx(router_z_loss(kept.logits_TE).item(), rel=1e-6)
    # Per sequence of 3 the valid tokens are (0, 1) and (3, 4).
    want = (_loop_balance(probs[0:2], experts[0:2], 2) + _loop_balance(probs[3:5], experts[3:5], 2)) / 2
    assert sequence_aux_loss(routing, 2, 3, mask).item() == pytest.approx(want, rel=1e-6)


def test_fully_masked_z_loss_is_zero():
    assert router_z_loss(torch.randn(3, 2), torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_sequence_length_must_divide_tokens():
    with pytest.raises(ValueError, match="4 tokens do not split into sequences of length 3"):
        sequence_aux_loss(_routing(PROBS, CHOICE), 1, 3)


def test_expert_bias_step_hand_case():
    bias = torch.zeros(4)
    expert_bias_step(bias, torch.tensor([3, 1, 2, 2]), 0.1)  # mean load 2
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def test_router_applies_coefficients_in_training_only():
    torch.manual_seed(1)
    router = TopKRouter(8, 4, num_experts_per_token=2, load_balance_coef=0.5, z_loss_coef=0.25, seq_aux_coef=2.0)
    x = torch.randn(12, 8)
    routing = router(x, sequence_length=6)
    assert routing.aux_losses["load_balance"].item() == pytest.approx(0.5 * load_balancing_loss(routing, 2).item())
    assert routing.aux_losses["z_loss"].item() == pytest.approx(0.25 * router_z_loss(routing.logits_TE).item())
    assert routing.aux_losses["seq_aux"].item() == pytest.approx(2.0 * sequence_aux_loss(routing, 2, 6).item())
    assert router.eval()(x, sequence_length=6).aux_losses == {}


def test_seq_aux_needs_sequence_length():
    with pytest.raises(ValueError, match="sequence length"):
        TopKRouter(8, 4, seq_aux_coef=1.0)(torch.randn(4, 8))


@pytest.mark.parametrize("name", ["load_balance_coef", "z_loss_coef", "seq_aux_coef"])
def test_negative_coefficient_raises(name):
    with pytest.raises(ValueError, match=f"{name}=-1.0"):
        TopKRouter(8, 4, **{name: -1.0})
