"""Image runs exported for peft (`export --as-lora` and `--as-peft`) load with
`PeftModel.from_pretrained` onto the vision model as a peft user builds it (the checkpoint with
`num_labels` and `ignore_mismatched_sizes`) and give the run's logits: the new classification
head, a trained stem convolution (modules_to_save) and the BatchNorm running statistics
included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_images import CLASSES, image_recipe, images, vision_models  # noqa: F401 - fixtures

from tnlora_cli.evaluate import evaluate_run
from tnlora_cli.export import export_as_lora, export_as_peft
from tnlora_cli.model.build import load_run
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

#: The ResNet's stem convolution, trained in full as TensorGuide trains its re-made first convolution.
STEM = "resnet.embedder.embedder.convolution"

CASES = {
    # model, adapter, its targets, modules_to_save (None: the default, the head), export
    "vit-lora-as-peft": ("vit", "lora", ["q_proj", "v_proj"], None, "peft"),
    "vit-trac-as-peft": ("vit", "trac", ["q_proj", "v_proj"], None, "peft"),
    "vit-loretta-as-lora": ("vit", "loretta", ["q_proj", "v_proj"], None, "lora"),
    "resnet-lora-head-as-lora": ("resnet", "lora", ["classifier.1"], [STEM], "lora"),
    "resnet-tensorguide-head-as-peft": ("resnet", "tensorguide", ["classifier.1"], [STEM], "peft"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_image_run_exported_for_peft_gives_the_runs_logits(image_recipe, tmp_path, case):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    import tnlora_cli.peft  # noqa: F401 - registers tnlora's peft types

    model, kind, targets, modules_to_save, form = CASES[case]
    raw = image_recipe(kind, model=model)
    raw["adapter"]["target_modules"] = targets
    if kind == "tensorguide":
        raw["adapter"].update(in_modes=[2, 2, 2])
    if modules_to_save is not None:
        raw["adapter"]["modules_to_save"] = modules_to_save
    raw["training"]["max_steps"] = 10
    train(validate_recipe(raw))
    if form == "lora":
        export_as_lora(raw["output_dir"], tmp_path / "exported", rank=64)
    else:
        export_as_peft(raw["output_dir"], tmp_path / "exported")
    config = json.loads((tmp_path / "exported/adapter_config.json").read_text())
    assert config["modules_to_save"] == (modules_to_save or ["classifier"])

    base = AutoModelForImageClassification.from_pretrained(Path(raw["model"]), num_labels=len(CLASSES), ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "exported").eval()
    run = load_run(raw["output_dir"])
    run.load_weights()
    pixels = torch.stack([e["pixel_values"] for e in run.prepared.data.eval])
    labels = np.asarray([e["labels"] for e in run.prepared.data.eval])
    with torch.no_grad():
        ours = run.prepared.model.eval()(pixel_values=pixels).logits
        theirs = peft_model(pixel_values=pixels).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    tuned = evaluate_run(raw["output_dir"])["metrics"]["tuned"]["accuracy"]
    assert float((theirs.argmax(-1).numpy() == labels).mean()) == pytest.approx(tuned)
