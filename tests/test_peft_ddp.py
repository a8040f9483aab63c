"""TRAC through peft under DDP (`accelerate launch`, two CPU processes, HF Trainer with gradient
checkpointing): its shared trained core serves every layer of a role, and DDP must neither see
it "marked ready twice" nor complain of unused parameters; both ranks end with the same adapter."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
import torch
from conftest import ACCELERATE

pytest.importorskip("peft")

SCRIPT = textwrap.dedent("""
    import sys, torch
    import tnlora_cli.peft
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from tnlora_cli.peft import TracConfig

    model_dir, out = sys.argv[1], sys.argv[2]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), TracConfig(target_modules=["q_proj", "v_proj"], r=4, task_type="CAUSAL_LM"))
    ids = [[2, 11 + i % 7, 12, 13, 14, 15, 16, 3] for i in range(32)]
    args = TrainingArguments(
        output_dir=out, max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2, report_to=[], save_strategy="no",
        gradient_checkpointing=True, ddp_find_unused_parameters=False, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2
    torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, f"{out}/rank{rank}.pt")
""")


def test_trac_shared_cores_under_ddp(tiny_models, tmp_path):
    if ACCELERATE is None:
        pytest.skip("accelerate's launcher is not installed")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    args = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "29631", str(script), str(tiny_models["llama"]), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    out = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    # Strict DDP (find_unused_parameters off): an unused or twice-ready parameter would be an error.
    assert "mark a variable ready only once" not in out.stderr and "did not receive grad" not in out.stderr
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    shared = [n for n in first if "tn_shared" in n]
    assert shared and first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    start = {n: v for n, v in first.items() if "tn_shared" in n and "_b_" in n and n.endswith("_core3")}
    assert start and all(v.abs().max() > 0 for v in start.values())  # the shared B core (zero at start) trained
