"""`benchmarks/quality.py rerun`: a cell repeats when its counted metrics are equal and its losses
agree within the stated tolerance (float32 sums in another order move the last digits)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality import RERUN_RTOL, compare_rerun


def test_a_loss_a_millionth_apart_with_equal_accuracy_repeats():
    lines, same = compare_rerun([("accuracy", 0.8125, 0.8125), ("loss", 0.512345, 0.512346), ("final_train_loss", 1.25, 1.25)])
    assert same
    assert lines[0].endswith("same") and "within tolerance (+1.00e-06, rtol 0.0001)" in lines[1]


def test_a_changed_prediction_or_a_loss_beyond_the_tolerance_does_not():
    _, same = compare_rerun([("accuracy", 0.8125, 0.8130), ("loss", 0.5, 0.5)])
    assert not same  # counted metrics must be equal
    lines, same = compare_rerun([("loss", 0.5, 0.5 + 2 * RERUN_RTOL)])
    assert not same and "beyond rtol" in lines[0]
    _, same = compare_rerun([("loss", 0.5, 0.5 + 2 * RERUN_RTOL)], rtol=1e-3)
    assert same
