"""TRL's SFTTrainer trains a tnlora adapter given as its peft_config (`import tnlora_cli.peft`)."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")


def test_sft_trainer_trains_a_tera_adapter_on_chat_data(tiny_models, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tnlora_cli.peft import TeraConfig

    rows = [
        {"messages": [{"role": "user", "content": f"what is {w}"}, {"role": "assistant", "content": f"the {w} is {w}"}]}
        for w in ("good", "bad", "code", "python", "java", "happy", "sad", "great")
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", max_length=32, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tokenizer, peft_config=TeraConfig(target_modules=["q_proj", "v_proj"], outdim=4, task_type="CAUSAL_LM"),
    )
    assert isinstance(trainer.model, peft.PeftModel)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".tnlora_adapter." in n for n in trainable)
    trainer.train()
    assert trainer.state.global_step == 3
    assert any(not torch.equal(p, trainable[n]) for n, p in trainer.model.named_parameters() if n in trainable)
    trainer.model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == "TNLORA_TERA" and saved["outdim"] == 4
    # The adapter TRL trained is a tnlora adapter to tnlora's verbs: generate reads it.
    from tnlora_cli.generate import generate_rows
    from tnlora_cli.generation.generator import SamplingSettings, load_generator
    from tnlora_cli.generation.prompts import PromptRow

    gen = load_generator(tmp_path / "adapter")
    assert gen.mode == "merged in memory"
    result = generate_rows(gen, [PromptRow("what is good")], SamplingSettings(max_new_tokens=4))
    assert len(result.rows) == 1 and isinstance(result.rows[0]["completion"], str)
