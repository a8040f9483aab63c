"""Rank and spectrum of a weight update: singular values from thin factors (ΔW = B Aᵀ costs
two QRs and a k × k SVD) or from the dense matrix, and their summary (rank at a tolerance,
effective rank, ranks holding 90 % and 99 % of the energy)."""

from __future__ import annotations

import math
from typing import Any

import torch

N_TOP = 8


def default_rtol(shape: tuple[int, int]) -> float:
    """torch.linalg.matrix_rank's default for fp32 data: eps · max(m, n)."""
    return torch.finfo(torch.float32).eps * max(shape)


def spectrum_from_factors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of B Aᵀ from A (in, k), B (out, k) in O((in + out) k² + k³)."""
    a, b = a.double(), b.double()
    _, r_a = torch.linalg.qr(a)
    _, r_b = torch.linalg.qr(b)
    return torch.linalg.svdvals(r_b @ r_a.T)


def spectrum_dense(delta: torch.Tensor) -> torch.Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.linalg.svdvals(delta.to(device=device, dtype=torch.float64)).cpu()


def summarise(sv: torch.Tensor, shape: tuple[int, int], rtol: float | None) -> dict[str, Any]:
    """Numerical rank, effective rank (entropy of the normalised spectrum), 90%/99% energy ranks."""
    sv = sv.detach().double().sort(descending=True).values
    top = float(sv[0]) if sv.numel() else 0.0
    if top == 0.0:
        return {"rank": 0, "effective_rank": 0.0, "rank_90": 0, "rank_99": 0, "top_singular_values": [0.0] * min(N_TOP, sv.numel())}
    tol = (rtol if rtol is not None else default_rtol(shape)) * top
    rank = int((sv > tol).sum())
    p = sv / sv.sum()
    p = p[p > 0]
    effective = math.exp(float(-(p * p.log()).sum()))
    energy = (sv**2).cumsum(0) / (sv**2).sum()
    rank_at = lambda share: int((energy < share - 1e-12).sum()) + 1  # noqa: E731
    return {
        "rank": rank,
        "effective_rank": effective,
        "rank_90": rank_at(0.90),
        "rank_99": rank_at(0.99),
        "top_singular_values": [float(v) for v in sv[:N_TOP]],
    }
