"""Run a function in W freshly spawned processes that see the usual torchrun environment variables.

The rendezvous store is served by the launching process on a port the operating system picks and it holds from
bind to the end, as torchrun's agent does: the workers all connect to it as clients
(``TORCHELASTIC_USE_AGENT_STORE``). Picking a free port, releasing it and letting rank 0 bind it seconds later (after
it has imported torch) left the port to whichever process took it meanwhile: another job's store, whose rendezvous
this one's ranks then joined, or one of the many ephemeral ports gloo connections use on a busy machine.
"""

import faulthandler
import os
from datetime import timedelta

import torch.multiprocessing as mp
from torch.distributed import TCPStore

from moe_lightning.strategies.process_groups import release_process_groups

HOST = "127.0.0.1"
STORE_TIMEOUT = timedelta(minutes=30)  # the process group's own default: a loaded machine may start ranks slowly


def _entry(rank: int, world_size: int, port: int, fn, args, env: dict[str, str]) -> None:
    # A worker killed by a signal (SIGABRT from C++, SIGSEGV) prints every thread's Python stack on its stderr.
    faulthandler.enable(all_threads=True)
    # Lightning's environment detection reads these, so a Trainer in the worker joins the group instead of launching.
    os.environ.update(
        MASTER_ADDR=HOST, MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
        TORCHELASTIC_USE_AGENT_STORE="True", **env,
    )
    fn(rank, world_size, *args)
    release_process_groups()


def run_workers(fn, world_size: int, *args, env: dict[str, str] | None = None) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; raises if any of them fails.

    ``env``: extra environment variables of the workers, set before ``fn`` runs (e.g. NCCL settings).
    """
    store = TCPStore(HOST, 0, world_size, is_master=True, timeout=STORE_TIMEOUT, wait_for_workers=False)
    mp.start_processes(
        _entry, args=(world_size, store.port, fn, args, env or {}), nprocs=world_size, start_method="spawn"
    )
