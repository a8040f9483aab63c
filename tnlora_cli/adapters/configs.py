"""Every adapter's recipe section: strict pydantic classes, one per method, and the keys they share.

They import neither torch nor transformers, so a recipe is checked (and a mistake in it refused)
before any of the heavy libraries load. Each method's module (`lora.py`, ...) builds its tensors
from the class here, named by its `config_class`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import RecipeError


class StrictModel(BaseModel):
    """Recipe section: unknown keys are errors (a typo must never be ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdapterConfig(StrictModel):
    """Keys every adapter shares. Each method extends this with its own fields."""

    type: str
    target_modules: list[str] | str = Field(
        description="Exact module names or name suffixes (a list), a regex matched against the "
        "full module name (a string), or 'all-linear' (every linear layer but the output head). Slices of fused "
        "layers are targets too: c_attn.q|k|v (GPT-2), qkv_proj.q|k|v, gate_up_proj.gate|up, or those of adapter.fused_splits. "
        "Layers inside modules_to_save are never adapted."
    )
    exclude_modules: list[str] | str | None = Field(None, description="Same forms as target_modules; matches are skipped.")
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved with the adapter. Default: the task head "
        "(classifier/score) for classification, nothing otherwise.",
    )
    seed: int = Field(0, description="Seed of the generator that initialises the adapter tensors.")
    save_frozen: bool = Field(
        True,
        description="Store frozen random tensors (VeRA, TRAC, TeRA, TensorGuide) in the adapter file; false stores only "
        "their seed and checksum and regenerates them on load (refused if the checksum differs).",
    )
    fused_splits: dict[str, dict[str, int]] | None = Field(
        None,
        description="Slices of fused layers as output sizes in order, e.g. {query_key_value: {q: 4096, k: 4096, v: 4096}}; "
        "targets then name them like layers (query_key_value.q). GPT-2's c_attn (q, k, v), qkv_proj (q, k, v) and "
        "gate_up_proj (gate, up) are known without this.",
    )
    use_dora: bool = Field(
        False,
        description="Weight-decomposed update (DoRA): W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ per output row, with a trained magnitude m "
        "(out_features per layer, per slice of a fused layer) starting at ‖W0‖; ΔW is this adapter's update.",
    )


class ScaledLowRankConfig(AdapterConfig):
    """Keys of the adapters whose update is a rank-r product scaled by alpha / r (lora, loretta, trac)."""

    r: int = Field(8, gt=0, description="Rank of the update.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).")
    use_rslora: bool = Field(
        False,
        description="Rank-stabilised scaling (rsLoRA): multiply the update by alpha / sqrt(r) instead of alpha / r, "
        "so raising r does not shrink the update. Parameter counts are unchanged.",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the branch input.")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


RankSpec = list[int] | dict[int, list[int]] | None
CoreKind = Literal["trained", "frozen", "shared_trained", "shared_frozen"]
#: The official code's default parameter structure: core 1 per layer, trained; core 2 shared,
#: frozen random; core 3 shared, trained (gated per layer by the controllers).
DEFAULT_STRUCTURE: list[str] = ["trained", "shared_frozen", "shared_trained"]


class LoraConfig(ScaledLowRankConfig):
    type: Literal["lora"] = "lora"


class VeraConfig(AdapterConfig):
    type: Literal["vera"] = "vera"
    r: int = Field(256, gt=0, description="Rank of the shared random projections.")
    d_initial: float = Field(0.1, description="Initial value of every λ_d.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the branch input.")


class LorettaConfig(ScaledLowRankConfig):
    type: Literal["loretta"] = "loretta"
    r: int = Field(8, gt=0, description="LoRA rank.")
    tt_rank: int = Field(5, gt=0, description="TT rank t: ranks [1, t, ..., t, 1] over the dimension's modes and r.")
    n_modes: int = Field(3, ge=1, le=8, description="Modes a layer dimension is factorised into when `modes` does not list it.")
    modes: dict[int, list[int]] | None = Field(None, description="Modes per dimension, e.g. {768: [8, 8, 12]}.")
    ranks_a: list[int] | None = Field(None, description="Explicit TT ranks of A (overrides tt_rank).")
    ranks_b: list[int] | None = Field(None, description="Explicit TT ranks of B (overrides tt_rank).")
    fold_rank: bool = Field(
        False,
        description="The official code's form: r folded into the modes of each factor's train (its shape tables), "
        "A = reshape(in, r), B = reshape(r, out)ᵀ, TT ranks [1, t, ..., t, 1].",
    )
    folded_modes: dict[int, list[int]] | None = Field(None, description="fold_rank: modes per dimension, product dim·r (default: the official table).")

    @model_validator(mode="after")
    def _one_form(self) -> LorettaConfig:
        # Settings of the other TT form would be silently ignored: refuse them.
        if self.fold_rank and (self.ranks_a or self.ranks_b or self.modes):
            raise RecipeError("adapter.fold_rank: the folded form takes folded_modes and tt_rank, not modes/ranks_a/ranks_b", hint="remove modes, ranks_a and ranks_b, or fold_rank")
        if self.folded_modes and not self.fold_rank:
            raise RecipeError("adapter.folded_modes: only used with fold_rank: true", hint="set fold_rank: true, or use modes")
        return self


class TensorGuideConfig(AdapterConfig):
    type: Literal["tensorguide"] = "tensorguide"
    hidden: int = Field(8, gt=0, description="Hidden width M of the generated pair W1 (in, M), W2 (M, out).")
    in_modes: list[int] = Field([2, 2, 2, 2, 2], min_length=1, description="Modes of the latent z (its size is their product).")
    out_modes: list[int] | None = Field(None, description="Output modes; product M·(in+out). Default: factorised per layer.")
    ranks: list[int] | int = Field(2, description="TT ranks, [1, r, ..., r, 1] from one number, or the full list.")
    scale: float = Field(1.0, gt=0, description="s in y = W0x + s·σ(xW1)W2.")
    activation: Literal["none", "relu", "gelu", "tanh", "sigmoid"] = Field(
        "none", description="σ on the hidden layer; none keeps the update linear (mergeable), the paper uses relu."
    )
    start: Literal["zero", "paper"] = Field(
        "zero", description="zero: the branch at the initial cores is subtracted, so training starts at the base model; "
        "paper: the official code's start, cores ~ N(0, 0.1²) and no subtraction (pair it with scale: 0.01 as that code does)."
    )
    init: Literal["default", "xavier_uniform"] = Field(
        "default", description="default: as `start` says; xavier_uniform: the paper's Algorithm 1 (fan-in r_k n_k, fan-out m_k r_k+1 per core)."
    )
    latent: Literal["fixed", "resampled"] = Field(
        "fixed",
        description="fixed: z drawn once and saved (the official code); resampled: a fresh z ~ N(0, I) at every training "
        "forward (the paper's Algorithm 1), the saved z at evaluation, merge and export.",
    )

    @model_validator(mode="after")
    def _ranks_fit(self) -> TensorGuideConfig:
        if self.use_dora and self.activation != "none":
            raise RecipeError(
                f"adapter.use_dora: DoRA rescales a weight update, but TensorGuide with activation: {self.activation} is a "
                "nonlinear branch, not a weight update",
                hint="set activation: none (a linear, mergeable update), or use_dora: false",
            )
        # Checked here, not when building a layer: count-params must never count a train
        # that cannot be contracted.
        d = len(self.in_modes)
        if isinstance(self.ranks, int):
            if self.ranks < 1:
                raise RecipeError(f"adapter.ranks: {self.ranks} must be at least 1")
            return self
        if len(self.ranks) != d + 1 or min(self.ranks) < 1:
            raise RecipeError(f"adapter.ranks: {self.ranks} needs {d + 1} positive entries for {d} modes", hint="give one rank per core boundary, or a single number")
        if self.ranks[0] != self.ranks[-1]:
            raise RecipeError(
                f"adapter.ranks: boundary ranks {self.ranks[0]} and {self.ranks[-1]} differ",
                hint="use boundary ranks of 1, or equal ones (a ring, contracted as a trace over the boundary rank)",
            )
        return self


class TracConfig(ScaledLowRankConfig):
    type: Literal["trac"] = "trac"
    r: int = Field(8, gt=0, description="LoRA rank (the open last TT rank).")
    modes: dict[int, list[int]] | None = Field(None, description="3 modes per dimension, e.g. {768: [8, 8, 12]}; default: paper table, else factorised.")
    ranks_a: RankSpec = Field(None, description="[1, r1, r2] for A (one list, or per dimension); default: paper table.")
    ranks_b: RankSpec = Field(None, description="[1, s1, s2] for B; default: paper table.")
    activation: Literal["none", "softmax"] = Field("none", description="Controller activation (softmax = length x softmax).")
    controller_init: Literal["ones", "zeros"] = Field(
        "ones", description="Initial controller vectors: ones (the paper's identity gate); zeros needs activation softmax."
    )
    controller_learning_rate: float | None = Field(None, gt=0, description="Learning rate of the controllers (default: training.learning_rate).")
    controllers: bool = Field(True, description="Gate each shared trained core per layer; false is the paper's 'Shared TT' ablation.")
    cores_a: list[CoreKind] = Field(
        DEFAULT_STRUCTURE, min_length=3, max_length=3,
        description="Per core of A: trained | frozen (per layer) or shared_trained | shared_frozen (once per role): the official code's parameter structure.",
    )
    cores_b: list[CoreKind] = Field(DEFAULT_STRUCTURE, min_length=3, max_length=3, description="Per core of B, as cores_a; its last core starts at zero, so it must be trained.")
    init: Literal["tt_normal", "tt_uniform", "kaiming_normal", "kaiming_uniform"] = Field(
        "tt_normal",
        description="tt_*: factor entries of std sqrt(1/(in+out)) (official TTNorm/TTUnif); kaiming_*: std sqrt(2/fan_in), fan_in = in for A, r for B.",
    )

    @model_validator(mode="after")
    def _controllers_can_train(self) -> TracConfig:
        # Zero gates with the identity activation zero every shared core: the update and all
        # of its gradients are exactly zero, forever. (softmax maps zeros to ones.)
        if self.controller_init == "zeros" and self.activation == "none":
            raise RecipeError(
                "adapter.controller_init: zeros with activation none makes every controller gate zero, so the update and every gradient stay exactly zero",
                hint="use controller_init: ones (the paper's identity start), or activation: softmax",
            )
        if not self.controllers and self.controller_learning_rate is not None:
            raise RecipeError("adapter.controller_learning_rate: set, but controllers: false leaves no controllers to train", hint="remove one of the two")
        if not self.cores_b[-1].endswith("trained"):
            raise RecipeError(
                f"adapter.cores_b: the last core of B starts at zero (so the update starts at zero) and must be trained, got {self.cores_b[-1]}",
                hint="make it trained or shared_trained",
            )
        return self


class TeraConfig(AdapterConfig):
    type: Literal["tera"] = "tera"
    indim: int | None = Field(None, gt=1, description="Mode size folding the input dimension (null: unfolded).")
    outdim: int | None = Field(8, gt=1, description="Mode size folding the output dimension (null: unfolded).")
    path: Literal["auto", "input", "dense"] = Field(
        "auto", description="auto: per call, contract the input through the network or build ΔW, whichever costs less."
    )
    variant: Literal["shared", "iden", "unique"] = Field(
        "shared",
        description="shared: TeRA (frozen core and factors shared per folding); iden: TeRA_iden (factors are identities, "
        "only the core is random); unique: TeRA_unique (each layer its own frozen core and factors).",
    )


#: recipe `adapter.type` -> its config class (the adapter classes are in `REGISTRY`)
CONFIGS: dict[str, type[AdapterConfig]] = {
    "lora": LoraConfig,
    "vera": VeraConfig,
    "loretta": LorettaConfig,
    "tensorguide": TensorGuideConfig,
    "trac": TracConfig,
    "tera": TeraConfig,
}
