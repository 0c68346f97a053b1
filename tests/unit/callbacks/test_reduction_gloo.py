"""RoutingCounts summed by an all-reduce over 2 gloo processes equal the counts of one process that saw both batches."""

from datetime import timedelta

import torch
import torch.distributed as dist

from moe_lightning.analytics import RoutingCounts
from moe_lightning.routing import TopKRouter
from tests.distributed.launch import run_workers

NUM_EXPERTS, NUM_LABELS = 4, 3


def rank_step(rank):
    """The routings and labels rank ``rank`` sees: two layers over its own 10 tokens."""
    generator = torch.Generator().manual_seed(rank)
    routers = [TopKRouter(8, NUM_EXPERTS, 2) for _ in range(2)]
    x = torch.randn(10, 8, generator=generator)
    labels = torch.randint(NUM_LABELS, (10,), generator=generator)
    with torch.no_grad():
        return [router(x).detach() for router in routers], labels


def counts_of(ranks):
    counts = RoutingCounts.zeros(2, NUM_EXPERTS, NUM_LABELS)
    for rank in ranks:
        torch.manual_seed(0)  # the same router weights on every rank
        counts.add_routings(*rank_step(rank))
    return counts


def worker(rank, world_size, out):
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))

    def all_reduce_sum(flat):
        dist.all_reduce(flat)
        return flat

    reduced = counts_of([rank]).reduced(all_reduce_sum)
    if rank == 0:
        torch.save(reduced.flatten(), out)
    dist.destroy_process_group()


def test_two_rank_all_reduce_equals_one_process(tmp_path):
    out = tmp_path / "reduced.pt"
    run_workers(worker, 2, str(out))  # spawned, with the rendezvous store on a port the launcher holds
    assert torch.equal(torch.load(out), counts_of([0, 1]).flatten())
