"""Peak RSS of a fresh process building a small model whose experts dominate it: the ordinary build holds all of it,
build_on_meta + materialize for one rank of 4 no more than that rank's share (plus one chunk of replayed draws)."""

from benchmarks.meta_init_memory import expected_share_bytes, measure
from moe_lightning.models import MoETransformerConfig
from moe_lightning.models.materialize import CHUNK_ELEMENTS

# 2 blocks of 64 experts, 256 x 512 SwiGLU: 201 MB of experts in fp32, 2 MB of dense tensors.
CONFIG = MoETransformerConfig(vocab_size=256, dim=256, num_layers=2, num_heads=4, num_experts=64, expert_hidden_dim=512,
                              max_seq_len=64)
MiB = 1024**2


def test_one_rank_of_four_allocates_its_share_and_the_ordinary_build_all_of_it():
    whole, share = expected_share_bytes(CONFIG, 1, "fp32"), expected_share_bytes(CONFIG, 4, "fp32")
    full = measure(CONFIG, "full", dtype="fp32")
    rank = measure(CONFIG, "meta", ep_rank=3, ep_size=4, dtype="fp32")
    assert full["held_bytes"] == whole and rank["held_bytes"] == share
    assert full["peak_bytes"] > 0.95 * whole
    # The share, the buffer of replayed draws (one chunk of 4-byte numbers) and 32 MiB of runtime slack (about 10
    # measured): the other ranks' 151 MB of experts are never held.
    assert rank["peak_bytes"] < share + 4 * CHUNK_ELEMENTS + 32 * MiB
