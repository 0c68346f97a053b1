"""generate(): batched autoregressive decoding of a :class:`MoETransformer` with a KV cache.

Prompts of different lengths are left-padded into one batch; the padding is masked out of attention and out of
the rotary positions, so every row decodes what its prompt decodes alone. The model runs in eval mode (its
training flags are restored afterwards): routers then decide per token, except the batch-dependent ones, which
are refused (see :func:`check_per_token_routing`).

Shape legend: B prompts, P longest prompt, V vocab, S stop tokens.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from moe_lightning.inference.decoding import Decoder, EagerDecoder
from moe_lightning.inference.sampling import next_tokens
from moe_lightning.models import MoETransformer
from moe_lightning.routing import ExpertChoiceRouter, TopKRouter
from moe_lightning.routing.soft import SoftMoERouter

Prompts = Tensor | Sequence[Sequence[int]]


def generate(
    model: MoETransformer,
    prompts: Prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    pad_token_id: int = 0,
    decoder: Decoder | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt, in prompt order.

    Args:
        model: the language model.
        prompts: a ``[B, L]`` tensor of token ids, or a sequence of B token-id lists of any non-zero lengths.
        max_new_tokens: the most tokens to generate per prompt.
        temperature: 0 is greedy; above 0 samples from ``softmax(logits / temperature)``.
        top_k: sample only among the k best tokens (None: all).
        top_p: sample only among the best tokens whose probability reaches ``top_p`` (nucleus; None: all).
        stop_tokens: a row ends after generating any of these; the stop token is the row's last token.
        seed: seeds the sampling generator, so the same call draws the same tokens; None uses torch's global RNG.
        pad_token_id: the id filling the left padding (it never reaches attention).
        decoder: how to run the model (:class:`EagerDecoder` by default; :class:`CompiledDecoder` for static
            shapes, ``torch.compile`` and CUDA graphs); it must be built for ``model``.
    """
    rows: list[list[int]] = []
    for step_tokens in stream_generate(
        model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, pad_token_id, decoder
    ):
        rows = rows or [[] for _ in step_tokens]
        for row, token in zip(rows, step_tokens):
            if token is not None:
                row.append(token)
    return rows


def stream_generate(
    model: MoETransformer,
    prompts: Prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    pad_token_id: int = 0,
    decoder: Decoder | None = None,
) -> Iterator[list[int | None]]:
    """:func:`generate` one step at a time: per step, each prompt's new token, or None once the prompt has stopped.

    Takes :func:`generate`'s arguments. The iteration ends when every row has stopped or after
    ``max_new_tokens`` steps; a consumer that stops iterating early stops the decoding.
    """
    rows = _prompt_rows(prompts)
    _check_arguments(model, rows, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_token_id)
    check_per_token_routing(model)
    if decoder is None:
        decoder = EagerDecoder(model)
    elif decoder.model is not model:
        raise ValueError("the decoder was built for another model than the one passed to generate()")
    return _decode(model, rows, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, pad_token_id, decoder)


@torch.no_grad()
def _decode(
    model: MoETransformer, rows: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None,
    top_p: float | None, stop_tokens: Sequence[int], seed: int | None, pad_token_id: int, decoder: Decoder,
) -> Iterator[list[int | None]]:
    device = model.embed.weight.device
    longest = max(len(row) for row in rows)
    ids_BP = torch.tensor([[pad_token_id] * (longest - len(row)) + row for row in rows], device=device)
    mask_BP = torch.tensor([[False] * (longest - len(row)) + [True] * len(row) for row in rows], device=device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stop_S = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    done_B = torch.zeros(len(rows), dtype=torch.bool, device=device)
    with eval_mode(model):
        session = decoder.start(len(rows), longest + max_new_tokens)
        logits_BV = session.prefill(ids_BP, mask_BP)
        for step in range(max_new_tokens):
            token_B = next_tokens(logits_BV, temperature, top_k, top_p, generator)
            yield [None if done else token for token, done in zip(token_B.tolist(), done_B.tolist())]
            done_B = done_B | torch.isin(token_B, stop_S)
            if step == max_new_tokens - 1 or bool(done_B.all()):
                return
            # Finished rows keep stepping with a pad token marked as padding; their output is never used.
            token_B = token_B.masked_fill(done_B, pad_token_id)
            logits_BV = session.step(token_B, ~done_B)


def check_per_token_routing(model: nn.Module) -> None:
    """Refuse routers whose eval-mode decision for a token depends on the other tokens of the batch.

    Expert choice picks tokens per expert over the whole batch (future tokens included); a capacity-limited top-k
    router (``eval_capacity_factor`` set) drops rows by batch-wide rank; soft MoE mixes the tokens at each position
    across the batch. Each would make a token's experts, and so the generated text, depend on how it was batched
    and cached.
    """
    batch_dependent = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertChoiceRouter):
            batch_dependent.append(f"{name} (expert choice)")
        elif isinstance(module, TopKRouter) and module.eval_capacity_factor is not None:
            batch_dependent.append(f"{name} (eval_capacity_factor={module.eval_capacity_factor})")
        elif isinstance(module, SoftMoERouter):
            batch_dependent.append(f"{name} (soft MoE mixes the batch's tokens at each position)")
    if batch_dependent:
        raise ValueError(
            "generation needs per-token routing, but these routers decide over the whole batch: "
            f"{batch_dependent}; set eval_capacity_factor=None on top-k routers (dropless inference)"
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every submodule's training flag as it was."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _prompt_rows(prompts: Prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.is_floating_point():
            raise ValueError(
                f"prompts as a tensor must be [batch, length] integer ids, got shape {tuple(prompts.shape)} "
                f"and dtype {prompts.dtype}"
            )
        return prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a [batch, length] tensor or a list of token-id lists, got {type(prompts).__name__}"
        )
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence) or isinstance(prompt, (str, bytes)):
            raise TypeError(
                f"prompt {i} must be a list of token ids, got {type(prompt).__name__}; wrap one prompt as [prompt]"
            )
        if not all(isinstance(token, numbers.Integral) for token in prompt):
            raise TypeError(f"prompt {i} must hold integer token ids, got {list(prompt)[:8]}")
        rows.append([int(token) for token in prompt])
    return rows


def _check_arguments(
    model: MoETransformer, rows: list[list[int]], max_new_tokens: int, temperature: float,
    top_k: int | None, top_p: float | None, stop_tokens: Sequence[int], pad_token_id: int,
) -> None:
    if not isinstance(model, MoETransformer):
        raise TypeError(f"generate() needs a MoETransformer, got {type(model).__name__}")
    vocab_size, max_seq_len = model.config.vocab_size, model.config.max_seq_len
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got max_new_tokens={max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got temperature={temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got top_k={top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got top_p={top_p}")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(row) + max_new_tokens > max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(row)} tokens + max_new_tokens={max_new_tokens} > max_seq_len={max_seq_len}"
            )
        bad = [token for token in row if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size}): {bad[:8]}")
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id must be in [0, vocab_size={vocab_size}), got pad_token_id={pad_token_id}")
    bad = [token for token in stop_tokens if not 0 <= token < vocab_size]
    if bad:
        raise ValueError(f"stop_tokens outside [0, vocab_size={vocab_size}): {bad}")
