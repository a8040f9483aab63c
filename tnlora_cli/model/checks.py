"""Check a local model directory before anything loads it: one message per problem.

A corrupt `config.json`, an unknown `model_type`, custom code without `trust_remote_code`,
truncated or garbage safetensors and pickled weights would otherwise end deep inside
transformers with a traceback. Pickled weights (`pytorch_model.bin`, `.pt`, `.pth`) can run
code when loaded: they are refused unless the recipe sets `allow_pickle: true`, and even
then transformers reads them with torch's restricted (weights-only) loader. Once a model is
loaded, `check_cpu_4bit_layers` refuses 4-bit layers that bitsandbytes' CPU kernels mishandle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: bitsandbytes' CPU 4-bit kernels: absmax blocks of 64 weights must not cross a row (its
#: dequantization is wrong otherwise) and its AVX512-BF16 repacking works on blocks of 32 rows.
CPU_4BIT_IN_MULTIPLE, CPU_4BIT_OUT_MULTIPLE = 64, 32


def check_max_length(model_path: str, max_length: int) -> None:
    """data.max_length must fit the model's learned positions (an index error otherwise)."""
    config_path = Path(model_path) / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("max_position_embeddings", "n_positions"):
        limit = config.get(key)
        if isinstance(limit, int) and limit > 0:
            if max_length > limit:
                raise ModelError(
                    f"data.max_length: {max_length} tokens exceed the {limit} positions the model has ({key} in config.json)",
                    hint=f"set data.max_length to at most {limit}",
                )
            return


def check_task_fits(task: str, config_name: str, is_vision: bool) -> None:
    """A vision model (an AutoModelForImageClassification architecture without a text
    classifier) needs task image-classification, and that task needs a vision model."""
    if is_vision and task != "image-classification":
        raise ModelError(
            f"task: {task} is for language models, and the model is a vision model ({config_name})",
            hint="set task: image-classification (data: an image folder, or a JSONL/CSV/Parquet file with an image column)",
        )
    if task == "image-classification" and not is_vision:
        raise ModelError(
            f"task: image-classification needs a vision model (an AutoModelForImageClassification architecture), and the model is {config_name}",
            hint="use task: classification for a text model, or point model at a vision model (ViT, DeiT, ResNet, ConvNeXt, Swin, ...)",
        )


def check_model_dir(path: Path, trust_remote_code: bool = False, allow_pickle: bool = False, weights: bool = True) -> None:
    """Refuse a directory that would fail to load; `weights=False` checks the config alone."""
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"model: {config_path} is not valid JSON ({str(exc).splitlines()[0][:80]})", hint="restore config.json from the model's source") from None
    if not isinstance(config, dict):
        raise ModelError(f"model: {config_path} is not a JSON object", hint="restore config.json from the model's source")
    if "auto_map" in config and not trust_remote_code:
        raise ModelError(
            f"model: {path} needs its own Python code (config.json has auto_map), which tnlora does not run by default",
            hint="set trust_remote_code: true in the recipe only if you trust this model's code",
        )
    if "auto_map" not in config:
        from transformers import CONFIG_MAPPING

        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ModelError(
                f"model: {config_path} has model_type {model_type!r}, which this transformers version does not know",
                hint="upgrade transformers, or check the model directory",
            )
    if not weights:
        return
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not safetensors and pickles and not allow_pickle:
        raise ModelError(
            f"model: {path} holds only pickled weights ({', '.join(p.name for p in pickles[:3])}); pickles can run code when loaded",
            hint="convert the model to safetensors, or set allow_pickle: true in the recipe (loaded with torch's weights-only loader)",
        )
    from safetensors import safe_open

    for file in safetensors:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike
            raise ModelError(
                f"model: {file} is damaged or not a safetensors file ({str(exc).splitlines()[0][:100]})",
                hint="download or copy the model again",
            ) from None


def check_cpu_4bit_layers(model: nn.Module) -> None:
    """Refuse 4-bit layers on the CPU whose shapes bitsandbytes' CPU kernels mishandle: an
    in_features not a multiple of 64 dequantizes wrongly on some CPUs, and an out_features not
    a multiple of 32 fails on CPUs with AVX512-BF16 once the layer runs for evaluation. Real
    models' widths are multiples of both; checked on every CPU so no run depends on which one."""
    from bitsandbytes.nn import Linear4bit

    bad = [
        f"{name} ({module.in_features} -> {module.out_features})"
        for name, module in model.named_modules()
        if isinstance(module, Linear4bit) and module.weight.device.type == "cpu"
        and (module.in_features % CPU_4BIT_IN_MULTIPLE or module.out_features % CPU_4BIT_OUT_MULTIPLE)
    ]
    if bad:
        raise ModelError(
            f"quantization.bits: 4 on the CPU needs every quantized layer's in_features to be a multiple of "
            f"{CPU_4BIT_IN_MULTIPLE} and its out_features of {CPU_4BIT_OUT_MULTIPLE} (bitsandbytes' CPU kernels); "
            f"{len(bad)} layers are not: {', '.join(bad[:4])}" + (", ..." if len(bad) > 4 else ""),
            hint="use quantization.bits: 8, train on a GPU, or remove the quantization section",
        )
