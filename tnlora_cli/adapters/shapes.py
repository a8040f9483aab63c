"""Recipe-facing shape resolution for the tensor-train adapters (LoRETTA, TRAC)."""

from __future__ import annotations

from ..errors import RecipeError
from ..tensor.tt import factor_core_shapes, factorize_dim


def dim_modes(dim: int, modes: dict[int, list[int]] | None, n_modes: int, defaults: dict[int, list[int]] | None = None) -> list[int]:
    """Modes of a layer dimension: the recipe's, the paper's table, or a balanced factorisation."""
    if modes and dim in modes:
        given = modes[dim]
        product = 1
        for m in given:
            product *= m
        if product != dim:
            raise RecipeError(
                f"adapter.modes.{dim}: {given} multiply to {product}, not {dim}",
                hint=f"give modes whose product is {dim}, e.g. {factorize_dim(dim, len(given) or 3)}",
            )
        return list(given)
    if defaults and dim in defaults:
        return list(defaults[dim])
    return factorize_dim(dim, n_modes)


def check_ranks(ranks: list[int], modes: list[int], r: int, key: str) -> list[tuple[int, int, int]]:
    try:
        return factor_core_shapes(modes, r, ranks)
    except ValueError as exc:
        raise RecipeError(f"adapter.{key}: {exc}", hint="see the TT forms in docs/adapters.md") from None
