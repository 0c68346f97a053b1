"""RouterNumerics: the precision of router logits and scores, and the tie rule, against plain-Python references."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from moe_lightning.models.router_spec import router_factory_from_spec, router_spec
from moe_lightning.routing import (
    AttentionRouter,
    ExpertChoiceRouter,
    RouterNumerics,
    SinkhornRouter,
    TopKRouter,
    topk_indices,
)

T, D, E = 24, 16, 8


def _best_first(row: list[float], k: int) -> list[int]:
    """The rule: higher score first, equal scores by lower index."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v - max(row)) for v in row]
    return [v / math.fsum(exps) for v in exps]


@pytest.mark.parametrize(("rows", "width", "k"), [(50, 8, 2), (20, 64, 8), (7, 300, 5), (3, 1, 1)])
def test_topk_indices_puts_equal_scores_in_index_order(rows, width, k):
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (rows, width)).float()  # mostly ties
    got = topk_indices(scores, k).tolist()
    assert got == [_best_first(row, k) for row in scores.tolist()]
    # Along another dimension too (expert choice ranks tokens per expert).
    assert topk_indices(scores.t(), k, dim=0).t().tolist() == got


def test_topk_indices_where_torch_topk_breaks_ties_otherwise():
    # On this CPU build torch.topk returns [42, 43] for 64 equal scores: the rule must not depend on that.
    scores = torch.zeros(3, 64)
    assert topk_indices(scores, 2).tolist() == [[0, 1]] * 3


def _tied_router(**kwargs) -> TopKRouter:
    router = TopKRouter(D, E, num_experts_per_token=2, **kwargs)
    with torch.no_grad():
        router.gate.weight[5] = router.gate.weight[2] = 0.5 * router.gate.weight[0].abs() + 1  # exact ties, best
    return router


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_equal_logits_go_to_the_lower_expert(dtype):
    router = _tied_router(numerics=RouterNumerics(dtype=dtype))
    x = torch.rand(T, D)  # positive, so experts 2 and 5 are every token's two best
    routing = router(x)
    assert routing.expert_idx_N.view(T, 2).tolist() == [[2, 5]] * T
    with torch.no_grad():
        router.gate.weight[7] = router.gate.weight[2]
    assert router(x).expert_idx_N.view(T, 2).tolist() == [[2, 5]] * T  # 7 ties too and loses


def test_float64_logits_scores_and_choice():
    torch.manual_seed(1)
    router = TopKRouter(D, E, num_experts_per_token=3, numerics=RouterNumerics(dtype="float64"))
    x = torch.randn(T, D)
    routing = router(x)
    assert routing.logits_TE.dtype == routing.probs_TE.dtype == routing.weight_N.dtype == torch.float64
    logits = [[math.fsum(a * b for a, b in zip(xt, we)) for we in router.gate.weight.tolist()] for xt in x.tolist()]
    torch.testing.assert_close(routing.logits_TE, torch.tensor(logits, dtype=torch.float64), rtol=1e-13, atol=1e-13)
    probs = [_softmax(row) for row in logits]
    torch.testing.assert_close(routing.probs_TE, torch.tensor(probs, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert routing.expert_idx_N.view(T, 3).tolist() == [_best_first(row, 3) for row in probs]


def test_bfloat16_rounds_logits_and_scores_and_chooses_among_the_rounded_scores():
    torch.manual_seed(2)
    router = TopKRouter(D, E, num_experts_per_token=2, numerics=RouterNumerics(dtype="bfloat16"))
    x = torch.randn(200, D)
    routing = router(x)
    assert routing.logits_TE.dtype == routing.probs_TE.dtype == torch.float32
    for values in (routing.logits_TE, routing.probs_TE):
        assert torch.equal(values, values.bfloat16().float())  # bf16 values held in fp32
    exact = x.double() @ router.gate.weight.double().t()
    # Within half a bf16 spacing (2^-8 relative) of the exact logits, plus the fp32 accumulation's error.
    assert ((routing.logits_TE.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    probs = routing.probs_TE.tolist()
    assert routing.expert_idx_N.view(-1, 2).tolist() == [_best_first(row, 2) for row in probs]
    ties = sum(sorted(row, reverse=True)[1] == sorted(row, reverse=True)[2] for row in probs)
    assert ties > 0, "bf16 scores of 200 tokens over 8 experts should hold some exact ties at the top-k boundary"
    weights = routing.weight_N.view(-1, 2)
    chosen = routing.probs_TE.gather(1, routing.expert_idx_N.view(-1, 2))
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


def test_float32_logits_ignore_autocast():
    torch.manual_seed(3)
    router = TopKRouter(D, E)
    x = torch.randn(T, D)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = router(x)
    assert cast.logits_TE.dtype == torch.float32
    assert torch.equal(cast.logits_TE, plain.logits_TE) and torch.equal(cast.expert_idx_N, plain.expert_idx_N)


@pytest.mark.parametrize("make", [
    lambda numerics: ExpertChoiceRouter(D, E, capacity_factor=2.0, numerics=numerics),
    lambda numerics: SinkhornRouter(D, E, num_experts_per_token=2, numerics=numerics),
    lambda numerics: AttentionRouter(D, E, num_experts_per_token=2, numerics=numerics),
])
@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_every_scoring_router_follows_its_numerics(make, dtype):
    torch.manual_seed(4)
    router = make(RouterNumerics(dtype=dtype))
    routing = router(torch.randn(T, D))
    if dtype == "float64":
        assert routing.logits_TE.dtype == routing.probs_TE.dtype == torch.float64
    else:
        assert torch.equal(routing.probs_TE, routing.probs_TE.bfloat16().float())
        assert torch.equal(routing.logits_TE, routing.logits_TE.bfloat16().float())


def test_expert_choice_takes_the_earlier_of_equal_tokens():
    torch.manual_seed(5)
    x = 0.01 * torch.randn(16, D)  # near-uniform scores...
    x[3] = x[9] = 3 * torch.randn(D)  # ...but for a token and its copy, whose scores tie exactly
    for capacity_factor in (2.0, 1.0, 0.5):  # 4, 2 and 1 tokens per expert
        routing = ExpertChoiceRouter(D, E, capacity_factor=capacity_factor)(x)
        for e in range(E):
            picked = set(routing.token_idx_N[routing.expert_idx_N == e].tolist())
            assert 9 not in picked or 3 in picked, f"expert {e} took the later copy only"
    # With one token per expert, the copies' favourite expert takes the first copy.
    favourite = int(routing.probs_TE[3].argmax())
    assert routing.token_idx_N[routing.expert_idx_N == favourite].tolist() == [3]


def test_a_spec_with_numerics_survives_json():
    factory = functools.partial(TopKRouter, num_experts_per_token=1, numerics=RouterNumerics(dtype="float64"))
    spec = json.loads(json.dumps(router_spec(factory)))
    assert spec["init_args"]["numerics"] == {"dtype": "float64", "half_input_gemm": True}
    assert router_factory_from_spec(spec)(D, E).numerics == RouterNumerics(dtype="float64")


def test_yaml_configures_the_numerics():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TopKRouter, "router")
    yaml = "router: {dim: 16, num_experts: 8, numerics: {dtype: bfloat16, half_input_gemm: false}}"
    config = parser.parse_string(yaml)
    router = parser.instantiate(config).router
    assert router.numerics == RouterNumerics(dtype="bfloat16", half_input_gemm=False)


@pytest.mark.parametrize(("numerics", "error", "match"), [
    ({"dtype": "fp32"}, ValueError, "dtype='fp32'"),
    ({"dtype": "float16"}, ValueError, "dtype='float16'"),
    ({"dtype": torch.float32}, ValueError, "dtype=torch.float32"),
    ({"half_input_gemm": "yes"}, TypeError, "half_input_gemm='yes'"),
    ({"precision": "float64"}, ValueError, r"\['precision'\]"),
    ("float64", TypeError, "'float64'"),
])
def test_bad_numerics_name_the_value(numerics, error, match):
    with pytest.raises(error, match=match):
        TopKRouter(D, E, numerics=numerics)
