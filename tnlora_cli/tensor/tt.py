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
        # (r_0, N, r_k) x (r_k, n_k, r_{k+1}) -> (r_0, N, n_k, r_{k+1})
        result = torch.tensordot(result, core, dims=([result.dim() - 1], [0]))
    return result


def tt_n_params(mode_sizes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of entries of TT cores with these modes and ranks (len(ranks) == len(modes) + 1)."""
    if len(ranks) != len(mode_sizes) + 1:
        raise ValueError(f"{len(mode_sizes)} modes need {len(mode_sizes) + 1} ranks, got {len(ranks)}")
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(mode_sizes))


def factorize_dim(n: int, n_modes: int) -> list[int]:
    """Split n into `n_modes` integer factors as equal as possible (largest first).

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
    modes.sort(reverse=True)
    assert math.prod(modes) == n
    return modes
