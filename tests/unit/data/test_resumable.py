"""ResumableDataLoader: a position restored into a fresh loader continues the interrupted pass exactly."""

import pytest
import torch

from moe_lightning.data.resumable import ResumableDataLoader, ResumableSampler


def _loader(seed=0, num_workers=0):
    dataset = torch.arange(40)
    sampler = ResumableSampler(dataset, seed=seed)
    return ResumableDataLoader(dataset, batch_size=4, sampler=sampler, drop_last=True, num_workers=num_workers,
                               generator=torch.Generator().manual_seed(seed))


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_position_continues_the_pass_where_it_stopped(num_workers):
    full = _epoch(_loader(), epoch=1)
    interrupted = _loader(num_workers=num_workers)
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    consumed = [next(iterator).tolist() for _ in range(3)]  # workers have prefetched more than these
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 3} and consumed == full[:3]
    resumed = _loader(num_workers=num_workers)
    resumed.load_state_dict(state)
    assert _epoch(resumed, epoch=1) == full[3:]
    assert _epoch(resumed, epoch=2) == _epoch(_loader(), epoch=2)  # the skip applied to one pass only


def test_a_position_at_the_end_of_an_epoch_resumes_at_the_next_one():
    loader = _loader()
    _epoch(loader, epoch=0)
    resumed = _loader()
    resumed.load_state_dict(loader.state_dict())
    assert _epoch(resumed, epoch=1) == _epoch(_loader(), epoch=1)


def test_each_epoch_has_its_own_order_and_ranks_share_none():
    assert _epoch(_loader(), 0) != _epoch(_loader(), 1)
    dataset = torch.arange(40)
    shares = [list(ResumableSampler(dataset, num_replicas=2, rank=rank, seed=0)) for rank in range(2)]
    assert not set(shares[0]) & set(shares[1]) and len(shares[0]) == len(shares[1]) == 20


def test_a_loader_needs_the_resumable_sampler():
    with pytest.raises(TypeError, match="ResumableSampler"):
        ResumableDataLoader(torch.arange(8), batch_size=2)
