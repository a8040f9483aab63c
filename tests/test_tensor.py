"""Shared tensor algebra: a hand-computed case and random round trips."""

from __future__ import annotations

import math

import pytest
import torch

from tnlora_cli.tensor.init import kaiming_uniform, make_generator
from tnlora_cli.tensor.tt import factorize_dim, tt_n_params, tt_to_tensor


def test_tt_to_tensor_hand_computed():
    # Rank-1 TT = outer product.
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    full = tt_to_tensor([a.view(1, 2, 1), b.view(1, 3, 1)]).reshape(2, 3)
    torch.testing.assert_close(full, torch.outer(a, b))


def test_tt_to_tensor_matches_einsum():
    g = torch.Generator().manual_seed(0)
    cores = [torch.randn(1, 3, 2, generator=g), torch.randn(2, 4, 5, generator=g), torch.randn(5, 2, 1, generator=g)]
    expected = torch.einsum("aib,bjc,ckd->aijkd", *cores)
    torch.testing.assert_close(tt_to_tensor(cores), expected)


def test_tt_n_params_is_the_sum_of_core_sizes():
    # TensorGuide's QD setup (methods.md): in-modes [1,2,2,1], out [16,8,257,16], ranks [1,2,2,1,1] -> 1,140.
    modes = [1 * 16, 2 * 8, 2 * 257, 1 * 16]
    assert tt_n_params(modes, [1, 2, 2, 1, 1]) == 1140
    with pytest.raises(ValueError):
        tt_n_params([2, 2], [1, 1])


@pytest.mark.parametrize("n, k", [(768, 3), (4096, 3), (1024, 5), (50257, 2), (7, 3), (5120, 3)])
def test_factorize_dim(n, k):
    modes = factorize_dim(n, k)
    assert len(modes) == k and math.prod(modes) == n and modes == sorted(modes)


def test_factorize_dim_is_balanced():
    assert factorize_dim(4096, 3) == [16, 16, 16]
    assert factorize_dim(768, 3) == [8, 8, 12]
    assert factorize_dim(1024, 3) == [8, 8, 16] and factorize_dim(5120, 3) == [16, 16, 20]


def test_kaiming_uniform_bound_and_seed():
    t = kaiming_uniform((64, 100), fan_in=100, generator=make_generator(3))
    assert t.abs().max() <= 1 / math.sqrt(100) + 1e-7 and t.abs().max() > 0.09
    torch.testing.assert_close(t, kaiming_uniform((64, 100), fan_in=100, generator=make_generator(3)))
