"""Row norms of a matrix plus a low-rank update, from the update's thin factors."""

from __future__ import annotations

import torch


def updated_row_norms(base: torch.Tensor, base_sq: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖W0_o + (B Aᵀ)_o‖ per row o of W0 (out, in), without forming B Aᵀ or W0 + B Aᵀ.

    `base_sq` holds ‖W0_o‖² (out,), `a` is (in, k), `b` is (out, k); all in the precision the
    caller wants (at least fp32: the terms below cancel). With P = W0 A (out, k) and G = AᵀA (k, k):

        ‖W0_o + B_o Aᵀ‖² = ‖W0_o‖² + B_o · (2 P_o + B_o G)

    Cost out·in·k + (in + out)·k² against out·in·k plus three passes over (out, in) for the dense
    sum. Rounding: the absolute error of the square is about eps · (‖W0_o‖ + ‖ΔW_o‖)², the same
    as summing the dense row, so the norm is exact to the working precision unless the update
    cancels most of a row (‖W0_o + ΔW_o‖ ≪ ‖W0_o‖, where the error grows as the square of the ratio).
    """
    p = base @ a  # (out, k)
    quad = b @ (a.T @ a)  # (out, k)
    return (base_sq + (b * (2 * p + quad)).sum(dim=1)).clamp_min(0).sqrt()
