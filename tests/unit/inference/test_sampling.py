"""next_tokens(): greedy, and which tokens top-k and top-p leave to sample from."""

import pytest
import torch

from moe_lightning.inference import next_tokens

# Row probabilities 0.5, 0.3, 0.15, 0.05 (token ids in a shuffled order).
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log()[None].repeat(2000, 1)


def drawn(**kwargs) -> set[int]:
    return set(next_tokens(LOGITS, generator=torch.Generator().manual_seed(0), **kwargs).tolist())


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 11)
    assert torch.equal(next_tokens(logits), logits.argmax(-1))


def test_unfiltered_sampling_draws_every_token_at_its_probability():
    tokens = next_tokens(LOGITS, temperature=1.0, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(frequency, PROBS, atol=0.04, rtol=0)


@pytest.mark.parametrize("top_k, expected", [(1, {1}), (2, {1, 3}), (3, {0, 1, 3}), (99, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_best(top_k, expected):
    assert drawn(temperature=1.0, top_k=top_k) == expected


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.4, {1}), (0.49, {1}), (0.51, {1, 3}), (0.7, {1, 3}), (0.9, {0, 1, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_of_best_tokens_reaching_p(top_p, expected):
    assert drawn(temperature=1.0, top_p=top_p) == expected


def test_low_temperature_concentrates_on_the_best_token():
    tokens = next_tokens(LOGITS, temperature=0.05, generator=torch.Generator().manual_seed(0))
    # p(best) = 1 / (1 + sum (p_i / p_best) ** 20), over 99.99 % here.
    assert (tokens == 1).float().mean() > 0.999


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-40), dict(temperature=1.0, top_p=1e-50)])
def test_extreme_settings_still_draw_the_best_token(kwargs):
    # 1e-40 overflows logits / temperature; top_p=1e-50 rounds to 0 in float32. Both must stay greedy.
    assert drawn(**kwargs) == {1}
