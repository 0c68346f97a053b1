"""generate(): KV-cache decoding equals full-sequence argmax; sampling controls, stop tokens, validation."""

import functools

import pytest
import torch

from moe_lightning.inference import generate, stream_generate
from moe_lightning.routing import ExpertChoiceRouter, HashRouter, SinkhornRouter, TopKRouter
from tests.unit.inference.conftest import reference_greedy, tiny_model

PROMPTS = [[5, 17, 3, 42, 8, 1, 9], [33], [2, 60, 12, 7]]


def test_greedy_batch_of_different_lengths_equals_full_forward_argmax_per_prompt(model):
    got = generate(model, PROMPTS, max_new_tokens=10, pad_token_id=33)
    assert got == [reference_greedy(model, prompt, 10) for prompt in PROMPTS]


def test_one_prompt_alone_equals_the_same_prompt_in_a_batch(model):
    batched = generate(model, PROMPTS, max_new_tokens=6)
    assert [generate(model, [prompt], max_new_tokens=6)[0] for prompt in PROMPTS] == batched


def test_tensor_prompts_are_rows_of_equal_length(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert generate(model, ids, max_new_tokens=4) == generate(model, ids.tolist(), max_new_tokens=4)


@pytest.mark.parametrize(
    "router",
    [functools.partial(HashRouter, num_experts_per_token=2),
     functools.partial(SinkhornRouter, num_experts_per_token=2)],
    ids=["hash", "sinkhorn"],
)
def test_other_per_token_routers_decode_like_the_full_forward(router):
    model = tiny_model(router=router)
    got = generate(model, PROMPTS, max_new_tokens=6)
    assert got == [reference_greedy(model, prompt, 6) for prompt in PROMPTS]


def test_runs_in_eval_mode_and_restores_training_flags():
    # A Sinkhorn router balances over the batch in training mode only: generate must route in eval mode.
    model = tiny_model(router=functools.partial(SinkhornRouter, num_experts_per_token=1)).train()
    model.blocks[0].eval()
    got = generate(model, PROMPTS, max_new_tokens=5)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert got == [reference_greedy(model.eval(), prompt, 5) for prompt in PROMPTS]


def test_sampling_reproduces_with_a_seed_and_changes_with_another(model):
    sample = functools.partial(generate, model, PROMPTS, max_new_tokens=12, temperature=1.5)
    first = sample(seed=1)
    assert sample(seed=1) == first
    assert sample(seed=2) != first


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)])
def test_sampling_filtered_to_the_best_token_is_greedy(model, filters):
    greedy = generate(model, PROMPTS, max_new_tokens=8)
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3, **filters) == greedy


def test_a_stop_token_ends_its_row_and_no_other(model):
    greedy = generate(model, PROMPTS, max_new_tokens=10)
    stop = greedy[0][3]
    got = generate(model, PROMPTS, max_new_tokens=10, stop_tokens=[stop])
    for row, full in zip(got, greedy):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert row == expected
    assert got[0][-1] == stop and len(got[0]) < 10
    assert any(len(row) == 10 for row in got)


def test_all_rows_stopped_ends_early(model):
    first_tokens = {row[0] for row in generate(model, PROMPTS, max_new_tokens=1)}
    assert all(len(row) == 1 for row in generate(model, PROMPTS, max_new_tokens=10, stop_tokens=first_tokens))


def test_streaming_yields_each_step_and_none_after_a_row_stops(model):
    greedy = generate(model, PROMPTS, max_new_tokens=10)
    stop = greedy[0][3]
    steps = list(stream_generate(model, PROMPTS, max_new_tokens=10, stop_tokens=[stop]))
    first_row = [step[0] for step in steps]
    assert first_row[:4] == greedy[0][:4] and all(token is None for token in first_row[4:])
    columns = [[token for token in row if token is not None] for row in zip(*steps)]
    assert columns == generate(model, PROMPTS, max_new_tokens=10, stop_tokens=[stop])


def test_closing_a_stream_early_restores_training_flags():
    model = tiny_model().train()
    stream = stream_generate(model, PROMPTS, max_new_tokens=10)
    next(stream)
    assert not model.training
    stream.close()
    assert model.training


@pytest.mark.parametrize(
    "router, match",
    [
        (functools.partial(ExpertChoiceRouter, capacity_factor=2.0), "expert choice"),
        (functools.partial(TopKRouter, capacity_factor=1.25), "eval_capacity_factor=1.25"),
    ],
)
def test_batch_dependent_routers_are_refused(router, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(router=router), PROMPTS, max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompts=[]), ValueError, "prompts is empty"),
        (dict(prompts=[[1, 2], []]), ValueError, "prompt 1 is empty"),
        (dict(prompts=[1, 2, 3]), TypeError, r"prompt 0 must be a list of token ids, got int; wrap one prompt"),
        (dict(prompts=[[1, 2.5]]), TypeError, "prompt 0 must hold integer token ids"),
        (dict(prompts=torch.tensor([1, 2])), ValueError, r"got shape \(2,\)"),
        (dict(prompts=[[1, 64, -1]]), ValueError, r"prompt 0 has token ids outside \[0, vocab_size=64\): \[64, -1\]"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1, got max_new_tokens=0"),
        (dict(temperature=-0.5), ValueError, "temperature must be >= 0 .*got temperature=-0.5"),
        (dict(top_k=0), ValueError, "top_k must be >= 1 or None, got top_k=0"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\] or None, got top_p=0.0"),
        (dict(top_p=1.5), ValueError, r"got top_p=1.5"),
        (dict(max_new_tokens=45), ValueError, "prompt 0 has 4 tokens \\+ max_new_tokens=45 > max_seq_len=48"),
        (dict(stop_tokens=[3, 99]), ValueError, r"stop_tokens outside \[0, vocab_size=64\): \[99\]"),
        (dict(pad_token_id=64), ValueError, "got pad_token_id=64"),
    ],
)
def test_bad_arguments_are_named(model, kwargs, error, match):
    arguments = dict(prompts=[[1, 2, 3, 4]], max_new_tokens=2) | kwargs
    with pytest.raises(error, match=match):
        generate(model, **arguments)
