"""Deterministic batches: sample k of the stream is `permutation(seed, epoch = k // n)[k % n]`,
and each rank takes its slice of every global batch, so a batch is a pure function of
(seed, step) and resuming needs only the step counter."""

from __future__ import annotations

from typing import Any

import torch


class BatchStream:
    """Deterministic example indices for every (step, micro-batch, rank)."""

    def __init__(self, n_examples: int, seed: int, lengths: Any = None, group: int = 0) -> None:
        self.n = n_examples
        self.seed = seed
        #: With lengths: each run of `group` examples of the epoch's permutation is sorted by
        #: length (longest first), so a global batch holds similar lengths; still a pure
        #: function of (seed, epoch).
        self.lengths = lengths
        self.group = group
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None and self.group > 1:
                perm = [i for s in range(0, self.n, self.group) for i in sorted(perm[s : s + self.group], key=lambda j: -int(self.lengths[j]))]
            self._perms[epoch] = perm
        return self._perms[epoch]

    def indices(self, micro_index: int, batch_size: int, world: int, rank: int) -> list[int]:
        start = (micro_index * world + rank) * batch_size
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + batch_size)]
