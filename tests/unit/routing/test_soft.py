"""SoftMoERouter: the dispatch and combine weights against their definitions, the per-token rows, bad input."""

from __future__ import annotations

import pytest
import torch

from moe_lightning.routing import RouterNumerics
from moe_lightning.routing.soft import SoftMoERouter

D, E, S = 16, 4, 3
B, L = 5, 7


def _router(**kwargs) -> SoftMoERouter:
    torch.manual_seed(0)
    router = SoftMoERouter(D, E, slots_per_expert=S, **kwargs)
    with torch.no_grad():
        router.scale.fill_(4.0)  # sharper than the initial 1, so the softmaxes are far from uniform
    return router


def _cosine_logits(router: SoftMoERouter, x_BLD: torch.Tensor) -> torch.Tensor:
    """``[B, L, X]`` from the definition: scale times the cosine of each token and each slot vector (fp64)."""
    x = torch.nn.functional.normalize(x_BLD.double(), dim=-1)
    phi_XD = torch.nn.functional.normalize(router.phi_ESD.detach().double().reshape(E * S, D), dim=-1)
    return router.scale.item() * x @ phi_XD.t()


def test_per_token_rows_keep_the_routing_contract(check_routing):
    routing = _router().mix(torch.randn(B, L, D))
    check_routing(routing, B * L, E)
    assert routing.rows_per_token == E and routing.num_requested == B * L * E
    assert routing.tokens_per_expert_E.tolist() == [B * L] * E
    assert int(routing.num_dropped) == 0 and routing.aux_losses == {}


def test_weights_match_their_definitions():
    router = _router()
    x_BLD = torch.randn(B, L, D)
    routing = router.mix(x_BLD)
    logits_BLX = _cosine_logits(router, x_BLD)
    torch.testing.assert_close(routing.dispatch_LBX.double(), logits_BLX.softmax(dim=0).transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(routing.combine_LBX.double(), logits_BLX.softmax(dim=-1).transpose(0, 1), atol=1e-6, rtol=0)
    # The per-token share of each expert: its slots' combine weights, summed; the softmax of the logits gives it too.
    share_TE = logits_BLX.softmax(dim=-1).reshape(B * L, E, S).sum(dim=-1)
    torch.testing.assert_close(routing.probs_TE.double(), share_TE, atol=1e-6, rtol=0)
    torch.testing.assert_close(routing.logits_TE.softmax(dim=-1), routing.probs_TE, atol=1e-6, rtol=0)
    torch.testing.assert_close(routing.weight_N.view(B * L, E), routing.probs_TE)


def test_logits_are_normalised_so_input_size_does_not_matter():
    router = _router()
    x_BLD = torch.randn(B, L, D)
    small, large = router.mix(x_BLD), router.mix(1000.0 * x_BLD)
    torch.testing.assert_close(small.combine_LBX, large.combine_LBX)
    torch.testing.assert_close(small.dispatch_LBX, large.dispatch_LBX)
    with torch.no_grad():
        logits_LBX = router.logits(1000.0 * x_BLD.transpose(0, 1))
    assert logits_LBX.abs().max().item() <= router.scale.item() * (1 + 1e-6)


def test_padding_feeds_no_slot_and_a_padded_position_gives_zeros():
    valid_BL = torch.rand(B, L) > 0.4
    valid_BL[:, 0] = False  # every sequence padded at position 0
    valid_BL[0, 1:] = True
    routing = _router().mix(torch.randn(B, L, D), valid_BL)
    dispatch_LBX = routing.dispatch_LBX
    assert bool(torch.isfinite(dispatch_LBX).all())
    assert bool((dispatch_LBX[~valid_BL.t()] == 0).all())
    sums_LX = dispatch_LBX.sum(dim=1)
    torch.testing.assert_close(sums_LX[1:], torch.ones_like(sums_LX[1:]))
    assert bool((sums_LX[0] == 0).all())


def test_float64_numerics_and_bf16_inputs():
    x_BLD = torch.randn(B, L, D)
    exact = _router(numerics=RouterNumerics(dtype="float64")).mix(x_BLD.double())
    assert exact.dispatch_LBX.dtype == exact.combine_LBX.dtype == exact.probs_TE.dtype == torch.float64
    half = _router().mix(x_BLD.bfloat16())
    assert half.dispatch_LBX.dtype == torch.float32
    torch.testing.assert_close(half.combine_LBX.double(), exact.combine_LBX, atol=0.02, rtol=0)


@pytest.mark.parametrize("slots", [0, -2, 1.5, True, "2"])
def test_bad_slot_counts_are_named(slots):
    with pytest.raises(ValueError, match=f"slots_per_expert={slots!r}"):
        SoftMoERouter(D, E, slots_per_expert=slots)


def test_wrong_inputs_are_named():
    router = _router()
    with pytest.raises(ValueError, match=r"\[batch, length, 16\] input, got shape \(35, 16\)"):
        router.mix(torch.randn(B * L, D))
    with pytest.raises(ValueError, match=r"\[batch, length, 16\] input, got shape \(5, 7, 8\)"):
        router.mix(torch.randn(B, L, 8))
    with pytest.raises(ValueError, match=r"valid_BL must have shape \(5, 7\), got \(7, 5\)"):
        router.mix(torch.randn(B, L, D), torch.ones(L, B, dtype=torch.bool))


def test_calling_it_as_a_token_choice_router_points_to_the_soft_layer():
    with pytest.raises(TypeError, match="SoftMoELayer"):
        _router()(torch.randn(B * L, D))
