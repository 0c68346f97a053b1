"""RoutingCounts summed by an all-reduce over 2 gloo processes equal the counts of one process that saw both batches."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lightning.analytics import RoutingCounts
from moe_lightning.routing import TopKRouter

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


def worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))

    def all_reduce_sum(flat):
        dist.all_reduce(flat)
        return flat

    reduced = counts_of([rank]).reduced(all_reduce_sum)
    if rank == 0:
        torch.save(reduced.flatten(), out)
    dist.destroy_process_group()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_all_reduce_equals_one_process(tmp_path):
    out = tmp_path / "reduced.pt"
    # spawn, not fork: a fork taken after other tests started torch's thread pools can deadlock.
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    assert torch.equal(torch.load(out), counts_of([0, 1]).flatten())
