"""Initialisers that draw from an explicit `torch.Generator`.

Adapters never touch the global RNG: the same recipe seed gives the same adapter on any
process, independently of what the model or data loader consumed before.
"""

from __future__ import annotations

import math

import torch


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded for one adapter build (CPU so that results do not depend on
    the device the model sits on)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator, a: float = math.sqrt(5)) -> torch.Tensor:
    """U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)).

    With the default a = sqrt(5) this is `nn.Linear`'s (and LoRA's) initialisation of A.
    """
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in)
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound
