"""The README's "From Python: peft, Trainer, TRL" examples run as written, on the tiny Llama
(the SmolLM2 hub ids replaced by its directory: the hub is not reachable in tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("trl")

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    section = README.read_text().split("## From Python: peft, Trainer, TRL\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_section_has_the_three_examples():
    blocks = _examples()
    assert len(blocks) == 3
    assert "get_peft_model" in blocks[0] and "Trainer(" in blocks[1] and "SFTTrainer(" in blocks[2]
    assert all(block.startswith("import tnlora_cli.peft") for block in blocks)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["peft", "trainer", "trl"])
def test_readme_example_runs(tiny_models, tmp_path, monkeypatch, index):
    code = _examples()[index]
    tiny = str(tiny_models["llama"])
    code = code.replace("HuggingFaceTB/SmolLM2-135M-Instruct", tiny).replace("HuggingFaceTB/SmolLM2-135M", tiny)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README example {index + 1}", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
    written = {0: "trac-adapter", 1: "tera-adapter", 2: "sft-tera-adapter"}[index]
    assert (tmp_path / written / "adapter_model.safetensors").is_file()
    assert "import tnlora_cli.peft" in (tmp_path / written / "README.md").read_text()
