"""Tensor-train (TT) algebra shared by the TT adapters.

Conventions (tensorly's): a TT of a tensor with modes (n_1, ..., n_d) is a list of cores
`cores[k]: (r_k, n_k, r_{k+1})`; boundary ranks r_0 and r_d are usually 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def tt_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores left to right into the full tensor.

    Returns shape (r_0, n_1, ..., n_d, r_d); callers with unit boundary ranks reshape.
    Cost is dominated by the last contraction: prod(n) * r_{d-1} * r_d.
    """
    result = cores[0]
    for core in cores[1:]:
        # Under autocast the previous contraction may have come out in bf16/fp16 while the
        # next core is fp32, and tensordot refuses mixed inputs: contract in the common type.
        dtype = torch.promote_types(result.dtype, core.dtype)
        # (r_0, N, r_k) x (r_k, n_k, r_{k+1}) -> (r_0, N, n_k, r_{k+1})
        result = torch.tensordot(result.to(dtype), core.to(dtype), dims=([result.dim() - 1], [0]))
    return result


def tt_n_params(mode_sizes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of entries of TT cores with these modes and ranks (len(ranks) == len(modes) + 1)."""
    if len(ranks) != len(mode_sizes) + 1:
        raise ValueError(f"{len(mode_sizes)} modes need {len(mode_sizes) + 1} ranks, got {len(ranks)}")
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(mode_sizes))


def factorize_dim(n: int, n_modes: int) -> list[int]:
    """Split n into `n_modes` integer factors as equal as possible (smallest first, as the
    papers' tables: 768 -> [8, 8, 12]).

    Greedy on the prime factors: each prime, largest first, goes to the currently smallest
    mode. Modes of size 1 appear only when n has fewer prime factors than `n_modes`.
    """
    if n < 1 or n_modes < 1:
        raise ValueError("n and n_modes must be positive")
    primes: list[int] = []
    rest, p = n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    modes = [1] * n_modes
    for prime in sorted(primes, reverse=True):
        modes[modes.index(min(modes))] *= prime
    modes.sort()
    assert math.prod(modes) == n
    return modes


def tt_to_matrix(cores: Sequence[torch.Tensor], n_rows: int) -> torch.Tensor:
    """Contract cores into a matrix with `n_rows` rows (row-major over the leading modes).

    Two forms of a (dim, r) factor matrix share this: r as the open last rank
    (cores over dim's modes ending in rank r, the TRAC form) or r as a last mode with
    boundary rank 1 (the LoRETTA form).
    """
    return tt_to_tensor(cores).reshape(n_rows, -1)


def tt_normal(
    shapes: Sequence[tuple[int, int, int]], fan_sum: int, generator: torch.Generator, order: int | None = None
) -> list[torch.Tensor]:
    """TT-normal initialisation: core k ~ N(0, 1) / sqrt(r_{k+1}) * sigma^(1/order),
    sigma = sqrt(1 / fan_sum), so the contracted matrix has entries of std about sigma.

    `fan_sum` is rows + columns of the matrix the train represents; `order` defaults to the
    number of cores (TRAC's shared cores use the order of the full train, methods.md §2).
    """
    return tt_random(shapes, math.sqrt(1.0 / fan_sum), generator, order)


def tt_random(
    shapes: Sequence[tuple[int, int, int]], sigma: float, generator: torch.Generator, order: int | None = None, uniform: bool = False
) -> list[torch.Tensor]:
    """Cores of std sigma^(1/order) / sqrt(r_{k+1}) each, Gaussian or uniform (U(-b, b) with
    b = sqrt(3) * std, the same std), so the contracted train has entries of std about sigma."""
    order = order or len(shapes)
    out = []
    for shape in shapes:
        unit = (torch.rand(shape, generator=generator) * 2.0 - 1.0) * math.sqrt(3.0) if uniform else torch.randn(shape, generator=generator)
        out.append(unit / math.sqrt(shape[2]) * sigma ** (1.0 / order))
    return out


def fold_dim(dim: int, mode_size: int) -> list[int]:
    """Fold `dim` into modes of `mode_size` (TeRA's indim/outdim), the remaining factor as a
    last mode: 4096 by 8 -> [8, 8, 8, 8], 384 by 8 -> [8, 8, 6]. A mode size of at least
    `dim` leaves it unfolded. Raises ValueError when `dim` is not divisible by it."""
    if mode_size >= dim:
        return [dim]
    if mode_size < 2 or dim % mode_size:
        raise ValueError(f"{dim} is not divisible by {mode_size}")
    modes, rest = [], dim
    while rest % mode_size == 0 and rest > 1:
        modes.append(mode_size)
        rest //= mode_size
    if rest > 1:
        modes.append(rest)
    return modes


def factor_core_shapes(dim_modes: Sequence[int], r: int, ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """Core shapes of a TT for a (dim, r) factor matrix.

    - `len(ranks) == len(dim_modes) + 1` and `ranks[-1] == r`: r is the open last rank
      (TRAC; ranks [1, r1, r2] + [r]).
    - `len(ranks) == len(dim_modes) + 2` and `ranks[-1] == 1`: r is one more mode
      (LoRETTA; ranks [1, t, ..., t, 1] over dim_modes + [r]).
    """
    if ranks[0] != 1:
        raise ValueError(f"the first TT rank must be 1, got {list(ranks)}")
    if len(ranks) == len(dim_modes) + 1 and ranks[-1] == r:
        modes = list(dim_modes)
    elif len(ranks) == len(dim_modes) + 2 and ranks[-1] == 1:
        modes = list(dim_modes) + [r]
    else:
        raise ValueError(
            f"ranks {list(ranks)} do not fit modes {list(dim_modes)} with r={r}: give {len(dim_modes) + 1} ranks ending in r, "
            f"or {len(dim_modes) + 2} ranks ending in 1"
        )
    return [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(modes)]


def tt_matrix_apply(z: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract a vector z (prod n_k) with TT-matrix cores (r_k, n_k, m_k, r_{k+1}).

    Returns the flat vector over (m_1, ..., m_d), row-major. Boundary ranks r_0 = r_d = R > 1
    close the train into a ring: the result is the trace over the boundary rank,
    sum_a G_1[a, ...] ... G_d[..., a]. Mode by mode, so the cost is R times
    sum_k r_k n_k m_k r_{k+1} times what is left of z and produced of the output.
    """
    in_modes = [core.shape[1] for core in cores]
    ring = cores[0].shape[0]
    if cores[-1].shape[-1] != ring:
        raise ValueError(f"boundary ranks {ring} and {cores[-1].shape[-1]} differ: a trace needs them equal")
    # state: (P produced outputs, with the open boundary index outermost, r_k, n_k, rest of the inputs)
    if ring == 1:  # an open train (the usual case): no identity to build on every call
        state = z.reshape(1, 1, in_modes[0], -1)
    else:
        eye = torch.eye(ring, dtype=z.dtype, device=z.device)
        state = (eye[:, :, None] * z.reshape(1, 1, -1)).reshape(ring, ring, in_modes[0], -1)
    for k, core in enumerate(cores):
        p, _, _, q = state.shape
        state = torch.einsum("prnq,rnms->pmsq", state, core).reshape(p * core.shape[2], core.shape[3], q)
        if k + 1 < len(cores):
            state = state.reshape(state.shape[0], state.shape[1], in_modes[k + 1], -1)
    # (R, prod m, R) -> trace over the boundary rank
    return state.reshape(ring, -1, ring).diagonal(dim1=0, dim2=2).sum(-1)
