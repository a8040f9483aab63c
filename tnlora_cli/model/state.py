"""Adapter state in and out of a model: which state-dict keys are adapter tensors, the
adapter file's tensors, the frozen-tensor record, loading with key checks, and parameter
counts of a live model."""

from __future__ import annotations

import torch
from torch import nn

from . import frozen

SHARED_ATTR = "tnlora_shared"
#: Running statistics of normalisation layers (BatchNorm): buffers of the frozen base that
#: training changes (in train mode every forward updates them), so they are saved with the
#: adapter and restored by eval and merge. Models without BatchNorm have none.
NORM_STATISTICS = (".running_mean", ".running_var", ".num_batches_tracked")


def is_adapter_tensor(key: str) -> bool:
    """A state-dict key of an adapter tensor (per layer, or shared in the store)."""
    return ".adapter." in key or key.startswith(SHARED_ATTR + ".")


def _is_adapter_key(key: str, modules_to_save: list[str]) -> bool:
    return is_adapter_tensor(key) or key.endswith(NORM_STATISTICS) or any(key.startswith(m + ".") for m in modules_to_save)


def adapter_state_dict(model: nn.Module, modules_to_save: list[str], include_frozen: bool | None = None) -> dict[str, torch.Tensor]:
    """Everything that is not the frozen base: adapter tensors (trainable and frozen),
    shared tensors once, the modules trained in full, and normalisation statistics. Frozen random adapter tensors are
    left out when `include_frozen` is false (default: the recipe's `adapter.save_frozen`)."""
    if include_frozen is None:
        include_frozen = frozen_record(model).get("saved", True)
    skip = set() if include_frozen else set(frozen.frozen_keys(model, is_adapter_tensor))
    return {k: v.detach() for k, v in model.state_dict().items() if _is_adapter_key(k, modules_to_save) and k not in skip}


def frozen_record(model: nn.Module) -> dict:
    """{"saved", "seed", "checksum", "tensors"} of the model's frozen random adapter tensors,
    as drawn at injection (written to adapter_config.json as `frozen`)."""
    shared = getattr(model, SHARED_ATTR, None)
    return dict(getattr(shared, "frozen_record", None) or {})


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], modules_to_save: list[str], frozen_saved: dict | None = None
) -> None:
    """Load an adapter file's tensors. `frozen_saved` is the file's `frozen` record: when its
    frozen tensors were not stored, the ones injection regenerated must match its checksum."""
    include = True if frozen_saved is None else frozen_saved.get("saved", True)
    if not include:
        drawn = frozen_record(model)
        frozen.verify(frozen_saved, drawn.get("seed"), drawn.get("checksum"), "adapter")
    expected = set(adapter_state_dict(model, modules_to_save, include_frozen=include))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        from ..errors import CheckpointError

        raise CheckpointError(
            f"adapter weights do not fit the model: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})",
            hint="load the adapter into the base model and recipe it was trained with",
        )
    model.load_state_dict(state, strict=False)


def logical_numel(t: torch.Tensor) -> int:
    """Elements of the weight a tensor stands for: a bitsandbytes 4-bit parameter packs two
    values per byte (its numel is half), so count its original shape; a parameter
    partitioned by DeepSpeed ZeRO-3 is an empty placeholder that knows its full size."""
    if getattr(t, "ds_numel", None) is not None:
        return int(t.ds_numel)
    quant_state = getattr(t, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        n = 1
        for s in shape:
            n *= s
        return n
    return t.numel()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters counted once: trainable, and all (base + adapter + head)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += logical_numel(p)
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total}
