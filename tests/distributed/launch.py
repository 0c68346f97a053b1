"""Run a function in W freshly spawned processes that see the usual torchrun environment variables."""

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, env: dict[str, str]) -> None:
    # Lightning's environment detection reads these, so a Trainer in the worker joins the group instead of launching.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", **env,
    )
    fn(rank, world_size, *args)


def run_workers(fn, world_size: int, *args, env: dict[str, str] | None = None) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; raises if any of them fails.

    ``env``: extra environment variables of the workers, set before ``fn`` runs (e.g. NCCL settings).
    """
    mp.start_processes(
        _entry, args=(world_size, free_port(), fn, args, env or {}), nprocs=world_size, start_method="spawn"
    )
