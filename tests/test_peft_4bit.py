"""tnlora's adapters through peft on a bitsandbytes 4-bit base (CPU kernels, the tiny Llama at
widths they accept): train, save, reload; merging into 4-bit weights is refused by name."""

from __future__ import annotations

import pytest
import torch
from test_peft import INPUT, KINDS, TARGETS, _logits, _perturb

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_4bit_base(tiny_models, tmp_path, kind):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def base4():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tiny_models["llama-wide"], quantization_config=quant).eval()

    cls, settings = KINDS[kind]
    settings = {**settings, "outdim": 8} if kind == "tera" else settings
    pm = peft.get_peft_model(base4(), cls(target_modules=TARGETS, task_type="CAUSAL_LM", **settings))
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    # Train before any inference forward: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit
    # layer for its inference kernel on the first no-grad call, and gradients stop there after.
    _perturb(pm)
    pm.train()
    pm(input_ids=INPUT, labels=INPUT).loss.backward()
    assert [n for n, p in pm.named_parameters() if p.requires_grad and p.grad is None] == []
    pm.eval()
    want = _logits(pm)
    assert not torch.allclose(want, _logits(base4()))
    pm.save_pretrained(tmp_path / "a")
    assert torch.equal(_logits(peft.PeftModel.from_pretrained(base4(), tmp_path / "a")), want)
    with pytest.raises(ValueError, match="quantized"):
        pm.merge_and_unload()
