"""The expert-parallel layer parity of tests/distributed under NCCL, one spawned process per GPU.

Same cases (top-k dropless and with capacity, expert choice, hash; an expert idle on some rank), same checks
(outputs, loss, every reduced gradient, parameters after AdamW steps, equal data-parallel replicas) at EP=2
on 2 GPUs and EP=4 and EP=2 x DP=2 on 4 GPUs, against one process on cuda:0. Parameters and data are fp32 and
PyTorch's default keeps TF32 off for fp32 matmuls, so the CPU tolerances hold.
"""

import pytest
import torch

from tests.distributed.launch import run_workers
from tests.distributed.layer_cases import ROUTERS, check_parity, parity_worker

pytestmark = pytest.mark.gpu

# NVLink multicast (NVLS) can take a shared host's GPUs out of service; the device machines require it off.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.fixture(scope="module", params=[(2, (2,)), (4, (4, 2))], ids=["gpus2", "gpus4"])
def nccl_run(request, tmp_path_factory):
    world_size, ep_sizes = request.param
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    out_dir = tmp_path_factory.mktemp(f"nccl{world_size}")
    run_workers(parity_worker, world_size, ep_sizes, str(out_dir), "nccl", env=NCCL_ENV)
    return world_size, ep_sizes, [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.parametrize("case", list(ROUTERS))
def test_expert_parallel_layer_matches_one_gpu_under_nccl(nccl_run, case):
    world_size, ep_sizes, results = nccl_run
    check_parity(results, world_size, ep_sizes, case, device="cuda:0")
