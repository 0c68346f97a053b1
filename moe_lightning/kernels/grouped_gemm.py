"""Grouped GEMM over rows sorted by expert, in Triton with Hopper's bulk tensor copies, beside torch's ``grouped_mm``.

Shape legend: M rows (sorted by group), K inner dim, N output dim, G groups (experts).

``grouped_gemm(x_MK, w_GKN, row_ends_G)`` computes ``out[rows of g] = x[rows of g] @ w[g]``, where group ``g`` owns
rows ``[row_ends[g - 1], row_ends[g])``: the semantics of ``torch grouped_mm(x, w, offs=row_ends)``, which is the
reference and runs everywhere the kernels do not. The backward needs two more GEMMs, each one kernel:

- the input gradient ``grad_x[rows of g] = grad_out[rows of g] @ w[g].T``: the forward kernel reading ``w``
  transposed;
- the weight gradient ``grad_w[g] = x[rows of g].T @ grad_out[rows of g]``: one program per output tile, which
  walks its group's rows.

Why our own: torch's CUTLASS grouped kernels are a closed op with fixed tile shapes; a kernel we write can take an
epilogue or a prologue (the SwiGLU, the routing weights, the dispatch gather) and its tile choices. As it stands it
runs at 0.78 to 0.99x torch's kernels on an H200 (``benchmarks/grouped_gemm.py``; RESULTS.md), so
``GroupedExperts`` uses it only when asked (``implementation="triton"``). Its autotuner configs carry pre-hooks,
which ``torch.compile`` does not take: compiled models use torch's op.

Row tiles never straddle two groups: each group's rows are cut into tiles of ``_BLOCK_M``, the launch covers the
most tiles any split of M rows into G groups can need, and programs past the real count zero the rows after the
last group, so no step waits on the host. Each GEMM is autotuned per (N, K); bands of row tiles sweep the columns
together so that the weight tiles they share stay in L2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.kernels import HAS_TRITON

# torch >= 2.10 exposes the public name; older releases only the private op with the same semantics.
torch_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


def grouped_gemm_reference(x_MK: Tensor, w_GKN: Tensor, row_ends_G: Tensor) -> Tensor:
    """torch's ``grouped_mm`` with :func:`grouped_gemm`'s arguments: the reference, and the path wherever the
    kernels do not run."""
    return torch_grouped_mm(x_MK, w_GKN, offs=row_ends_G.to(torch.int32))

_BLOCK_M = 128
"""Rows per tile of the row kernel; each group's rows are cut into tiles of this many."""


def grouped_gemm_weights_supported(w_GKN: Tensor) -> bool:
    """Whether the kernels take these weights: bf16 on CUDA, contiguous, 16-byte aligned for the copy engine, K a
    multiple of 64 (a K tile must not run into the next group's weights), N a multiple of 8."""
    return (
        HAS_TRITON
        and w_GKN.is_cuda
        and w_GKN.dtype == torch.bfloat16
        and w_GKN.dim() == 3
        and w_GKN.shape[1] % 64 == 0
        and w_GKN.shape[2] % 8 == 0
        and w_GKN.is_contiguous()
        and w_GKN.data_ptr() % 16 == 0
    )


def grouped_gemm_supported(x_MK: Tensor, w_GKN: Tensor) -> bool:
    """Whether the kernels take ``x @ w[g]``: the weights as above, ``x`` a contiguous, aligned bf16 ``[M, K]`` on
    the same device."""
    return (
        grouped_gemm_weights_supported(w_GKN)
        and x_MK.device == w_GKN.device
        and x_MK.dtype == torch.bfloat16
        and x_MK.dim() == 2
        and x_MK.shape[1] == w_GKN.shape[1]
        and x_MK.is_contiguous()
        and x_MK.data_ptr() % 16 == 0
    )


if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    def _scratch(size: int, alignment: int, stream) -> Tensor:
        # Descriptors made on the device live in global scratch memory that Triton asks its allocator for; torch's
        # blocks are 512-byte aligned, more than the 128 Triton asks.
        return torch.empty(size, dtype=torch.int8, device="cuda")

    def _set_row_blocks(args: dict) -> None:
        block_n, block_k = args["BLOCK_N"], args["BLOCK_K"]
        args["x_desc"].block_shape = [args["BLOCK_M"], block_k]
        args["w_desc"].block_shape = [block_n, block_k] if args["TRANSPOSE_W"] else [block_k, block_n]

    def _fitting_k(configs: list, args: dict, **kwargs) -> list:
        # Untransposed, a K tile must not run into the next group's weight rows: keep tiles that divide K.
        args = {**args, **kwargs}  # constexpr arguments come as keywords
        if args["TRANSPOSE_W"]:
            return configs
        return [config for config in configs if args["K"] % config.kwargs["BLOCK_K"] == 0]

    def _row_configs() -> list:
        shapes = [  # BLOCK_N, BLOCK_K, stages, warps
            (128, 128, 3, 8),
            (128, 64, 4, 4),
            (128, 128, 3, 4),
            (256, 64, 3, 8),
            (256, 64, 4, 8),
        ]
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SUPER_ROWS": 8, "WARP_SPECIALIZE": ws}, num_stages=s,
                          num_warps=w, pre_hook=_set_row_blocks)
            for bn, bk, s, w in shapes
            for ws in (False, True)
        ]

    def _weight_grad_configs() -> list:
        shapes = [(128, 64, 4), (128, 128, 3), (256, 64, 4)]  # BLOCK_N, BLOCK_ROWS, stages
        return [
            triton.Config(
                {"BLOCK_K": 128, "BLOCK_N": bn, "BLOCK_ROWS": rows, "SUPER_ROWS": 8, "WARP_SPECIALIZE": ws},
                num_stages=s, num_warps=8,
            )
            for bn, rows, s in shapes
            for ws in (False, True)
        ]

    @triton.jit
    def _group_bounds(group, row_ends_ptr):
        row_end = tl.load(row_ends_ptr + group)
        row_start = tl.load(row_ends_ptr + group - 1, mask=group > 0, other=0)
        return row_start, row_end

    @triton.jit
    def _banded_tile(tile, row_tiles, col_tiles, SUPER_ROWS: tl.constexpr):
        # Bands of SUPER_ROWS row tiles sweep the columns together, so the column tiles they share stay in L2.
        per_band = SUPER_ROWS * col_tiles
        first_row_tile = (tile // per_band) * SUPER_ROWS
        band_rows = tl.minimum(row_tiles - first_row_tile, SUPER_ROWS)
        return first_row_tile + (tile % per_band) % band_rows, (tile % per_band) // band_rows

    @triton.autotune(
        configs=_row_configs(), key=["N", "K", "TRANSPOSE_W"], prune_configs_by={"early_config_prune": _fitting_k}
    )
    @triton.jit
    def _grouped_rows_kernel(
        x_desc, w_desc, out_ptr, row_ends_ptr, M, N, K,
        NUM_GROUPS: tl.constexpr, GROUPS_POW2: tl.constexpr, TRANSPOSE_W: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUPER_ROWS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    ):
        # out[rows of g] = x[rows of g] @ (w[g].T if TRANSPOSE_W else w[g]); w_desc views w as [G * N, K] or
        # [G * K, N]. A tile's extra rows and columns may read the next group's data; the masked store drops them.
        row_tile, col_tile = _banded_tile(
            tl.program_id(0), tl.cdiv(M, BLOCK_M) + NUM_GROUPS, tl.cdiv(N, BLOCK_N), SUPER_ROWS
        )
        n_start = col_tile * BLOCK_N
        # The group owning this row tile: group g holds cdiv(its rows, BLOCK_M) tiles, after those of groups < g.
        groups = tl.arange(0, GROUPS_POW2)
        ends = tl.load(row_ends_ptr + groups, mask=groups < NUM_GROUPS, other=0)
        starts = tl.load(row_ends_ptr + groups - 1, mask=(groups > 0) & (groups < NUM_GROUPS), other=0)
        tiles = tl.cdiv(ends - starts, BLOCK_M)
        group = tl.sum((tl.cumsum(tiles, 0) <= row_tile).to(tl.int32), 0)
        tiles_before = tl.sum(tl.where(groups < group, tiles, 0), 0)
        cols = n_start + tl.arange(0, BLOCK_N)
        total_tiles = tl.sum(tiles, 0)
        if row_tile < total_tiles:
            row_start, row_end = _group_bounds(group, row_ends_ptr)
            first_row = row_start + (row_tile - tiles_before) * BLOCK_M
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
                a = x_desc.load([first_row, k])
                if TRANSPOSE_W:
                    b = w_desc.load([group * N + n_start, k]).T
                else:
                    b = w_desc.load([group * K + k, n_start])
                acc = tl.dot(a, b, acc)
            rows = first_row + tl.arange(0, BLOCK_M)
            mask = ((rows < row_end) & (rows < M))[:, None] & (cols < N)[None, :]
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask)
        else:
            # The spare tiles zero the rows past the last group (always enough of them: see _grouped_rows).
            first_row = tl.load(row_ends_ptr + NUM_GROUPS - 1) + (row_tile - total_tiles) * BLOCK_M
            rows = first_row + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & (cols < N)[None, :]
            zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], zeros, mask)

    @triton.autotune(configs=_weight_grad_configs(), key=["K", "N"])
    @triton.jit
    def _grouped_weight_grad_kernel(
        x_ptr, grad_ptr, out_ptr, row_ends_ptr, K, N,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr, SUPER_ROWS: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
    ):
        # out[g] = x[rows of g].T @ grad[rows of g], [K, N] per group: one [BLOCK_K, BLOCK_N] tile a program, which
        # walks its group's rows BLOCK_ROWS at a time.
        k_tiles = tl.cdiv(K, BLOCK_K)
        n_tiles = tl.cdiv(N, BLOCK_N)
        group = tl.program_id(0) // (k_tiles * n_tiles)
        k_tile, n_tile = _banded_tile(tl.program_id(0) % (k_tiles * n_tiles), k_tiles, n_tiles, SUPER_ROWS)
        k_start, n_start = k_tile * BLOCK_K, n_tile * BLOCK_N
        row_start, row_end = _group_bounds(group, row_ends_ptr)
        # The reduction must not read past its group, so these descriptors are made here with the group's bounds
        # (the copy engine fills out-of-bounds rows with zeros). One needs at least a row: an empty group runs no
        # iteration and writes zeros.
        rows = tl.maximum(row_end - row_start, 1)
        x_desc = tl.make_tensor_descriptor(
            x_ptr + row_start.to(tl.int64) * K, shape=[rows, K], strides=[K, 1], block_shape=[BLOCK_ROWS, BLOCK_K]
        )
        grad_desc = tl.make_tensor_descriptor(
            grad_ptr + row_start.to(tl.int64) * N, shape=[rows, N], strides=[N, 1], block_shape=[BLOCK_ROWS, BLOCK_N]
        )
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for r in tl.range(0, row_end - row_start, BLOCK_ROWS, warp_specialize=WARP_SPECIALIZE):
            a = x_desc.load([r, k_start]).T
            b = grad_desc.load([r, n_start])
            acc = tl.dot(a, b, acc)
        out_desc = tl.make_tensor_descriptor(
            out_ptr + group.to(tl.int64) * K * N, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N]
        )
        out_desc.store([k_start, n_start], acc.to(out_ptr.dtype.element_ty))

    def _grouped_rows(x_MK: Tensor, w: Tensor, row_ends_G: Tensor, transpose_w: bool) -> Tensor:
        num_groups = w.shape[0]
        n, k = (w.shape[1], w.shape[2]) if transpose_w else (w.shape[2], w.shape[1])
        out = x_MK.new_empty(x_MK.shape[0], n)
        if out.numel() == 0:
            return out
        # Block shapes are placeholders: each config's pre-hook sets its own.
        x_desc = TensorDescriptor.from_tensor(x_MK, [_BLOCK_M, 64])
        w_desc = TensorDescriptor.from_tensor(w.view(-1, w.shape[2]), [64, 64])
        # Every group may end in a partial tile, so G extra tiles cover any split of the rows; the tiles left over
        # (at least cdiv(rows past the last group, BLOCK_M), as ceil(a - b) <= ceil(a) - ceil(b) + 1) zero those rows.
        row_tiles = triton.cdiv(x_MK.shape[0], _BLOCK_M) + num_groups
        grid = lambda meta: (row_tiles * triton.cdiv(n, meta["BLOCK_N"]),)
        _grouped_rows_kernel[grid](
            x_desc, w_desc, out, row_ends_G, x_MK.shape[0], n, k, NUM_GROUPS=num_groups,
            GROUPS_POW2=triton.next_power_of_2(num_groups), TRANSPOSE_W=transpose_w, BLOCK_M=_BLOCK_M,
        )
        return out

    def _grouped_weight_grad(x_MK: Tensor, grad_MN: Tensor, row_ends_G: Tensor) -> Tensor:
        num_groups, k, n = row_ends_G.shape[0], x_MK.shape[1], grad_MN.shape[1]
        if x_MK.shape[0] == 0:
            return x_MK.new_zeros(num_groups, k, n)
        out = x_MK.new_empty(num_groups, k, n)
        # Set on every call: another library may have installed its own allocator since the last one.
        triton.set_allocator(_scratch)
        grid = lambda meta: (num_groups * triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _grouped_weight_grad_kernel[grid](x_MK, grad_MN, out, row_ends_G, k, n)
        return out

    class _TritonGroupedGemm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x_MK: Tensor, w_GKN: Tensor, row_ends_G: Tensor) -> Tensor:
            ctx.save_for_backward(x_MK, w_GKN, row_ends_G)
            return _grouped_rows(x_MK, w_GKN, row_ends_G, transpose_w=False)

        @staticmethod
        def backward(ctx, grad_MN: Tensor):
            x_MK, w_GKN, row_ends_G = ctx.saved_tensors
            grad_MN = grad_MN.contiguous()
            if grad_MN.data_ptr() % 16:  # the copy engine needs an aligned base
                grad_MN = grad_MN.clone()
            grad_x = _grouped_rows(grad_MN, w_GKN, row_ends_G, transpose_w=True) if ctx.needs_input_grad[0] else None
            grad_w = _grouped_weight_grad(x_MK, grad_MN, row_ends_G) if ctx.needs_input_grad[1] else None
            return grad_x, grad_w, None


def grouped_gemm(x_MK: Tensor, w_GKN: Tensor, row_ends_G: Tensor) -> Tensor:
    """``x[rows of g] @ w[g]`` for every group g, rows ``[row_ends[g - 1], row_ends[g])`` (cumulative counts, the
    last at most M).

    The Triton kernels run where :func:`grouped_gemm_supported` holds, torch's ``grouped_mm`` everywhere else. Rows
    past ``row_ends[-1]`` come out zero from the Triton kernels, gradient included; torch's op leaves them unwritten.
    """
    if row_ends_G.shape != (w_GKN.shape[0],):
        raise ValueError(
            f"row_ends_G needs one entry per group: shape ({w_GKN.shape[0]},) for w_GKN {tuple(w_GKN.shape)}, "
            f"got {tuple(row_ends_G.shape)}"
        )
    if grouped_gemm_supported(x_MK, w_GKN):
        return _TritonGroupedGemm.apply(x_MK, w_GKN, row_ends_G.to(torch.int32))
    return grouped_gemm_reference(x_MK, w_GKN, row_ends_G)
