"""Rank inspection: the structured path (QR of the thin factors + a k x k SVD) against a
dense SVD of the same updates, at dimension 4096, as a ratio; both must agree.

    python benchmarks/ranks.py [--dim 4096] [--layers 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.model.inject import adapted_layers, inject_adapter
from tnlora_cli.tensor.spectrum import spectrum_dense, spectrum_from_factors, summarise

SETTINGS = {
    "lora": {"r": 16},
    "vera": {"r": 256},
    "loretta": {"r": 16, "tt_rank": 8},
    "trac": {"r": 16},
    "tensorguide": {"hidden": 8},
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"dense SVDs on {device}, ΔW of {args.dim} x {args.dim}, {args.layers} layers per adapter")
    print(f"{'adapter':<12} {'structured s':>12} {'dense s':>9} {'dense / structured':>19} {'ranks agree':>12}")
    for kind, settings in SETTINGS.items():
        model = torch.nn.Module()
        for i in range(args.layers):
            model.add_module(f"l{i}", torch.nn.Linear(args.dim, args.dim, bias=False, device="meta"))
        inject_adapter(model, REGISTRY[kind].config_class(target_modules=r"l\d+", **settings))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.02)
        layers = [layer.adapter for _, layer in adapted_layers(model)]
        shape = (args.dim, args.dim)
        start = time.perf_counter()
        fast = [summarise(spectrum_from_factors(*a.low_rank_factors()), shape, None) for a in layers]
        t_fast = time.perf_counter() - start
        start = time.perf_counter()
        slow = [summarise(spectrum_dense(a.delta_weight()), shape, None) for a in layers]
        t_slow = time.perf_counter() - start
        agree = all(f["rank"] == s["rank"] for f, s in zip(fast, slow))
        print(f"{kind:<12} {t_fast:>12.3f} {t_slow:>9.2f} {t_slow / t_fast:>19.0f} {str(agree):>12}")


if __name__ == "__main__":
    main()
