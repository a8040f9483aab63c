"""`bash benchmarks/gpu.sh` on a machine without a GPU: one line saying so, exit 0, nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("bash") is None, reason="needs a machine without a GPU, and bash")
def test_gpu_script_exits_cleanly_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
    assert not out.exists()
