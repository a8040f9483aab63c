"""Tucker algebra (mode products) shared by TeRA-style adapters.

`mode_dot(tensor, matrix, mode)` multiplies mode `mode` of `tensor` (size I) by
`matrix` (J, I), giving a tensor whose mode `mode` has size J (tensorly's convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mode_dot(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """tensor ×_mode matrix, matrix: (J, I_mode)."""
    moved = tensor.movedim(mode, -1)  # (..., I)
    # One (rows, I) @ (I, J) product: matmul on the N-d view would fall back to a batch of
    # small products (bmm) when the view is not contiguous and only the tensor needs a gradient.
    out = moved.reshape(-1, moved.shape[-1]) @ matrix.T
    return out.reshape(*moved.shape[:-1], matrix.shape[0]).movedim(-1, mode)


def multi_mode_dot(tensor: torch.Tensor, matrices: Sequence[torch.Tensor], modes: Sequence[int]) -> torch.Tensor:
    """Apply several mode products; order them so the tensor shrinks as early as possible."""
    order = sorted(range(len(modes)), key=lambda k: matrices[k].shape[0] / matrices[k].shape[1])
    for k in order:
        tensor = mode_dot(tensor, matrices[k], modes[k])
    return tensor


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """core ×_1 U_1 ... ×_N U_N with U_i: (I_i, R_i)."""
    return multi_mode_dot(core, factors, list(range(core.dim())))


def outer_vectors(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """v_1 ⊗ ... ⊗ v_N flattened row-major: (prod len(v_i),). Scaling a tensor's modes by
    these vectors is one elementwise product with this (reshaped), not N passes."""
    out = vectors[0]
    for v in vectors[1:]:
        out = (out[:, None] * v[None, :]).reshape(-1)
    return out


def mode_dot_cost(shape: Sequence[int], matrices: Sequence[tuple[int, int]], modes: Sequence[int]) -> int:
    """Multiply-adds of `multi_mode_dot` on a tensor of `shape` (same ordering)."""
    shape = list(shape)
    order = sorted(range(len(modes)), key=lambda k: matrices[k][0] / matrices[k][1])
    cost = 0
    for k in order:
        rows, cols = matrices[k]
        cost += math.prod(shape) * rows  # every entry of the tensor meets a row of the matrix
        shape[modes[k]] = rows
    return cost
