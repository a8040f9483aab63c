"""inspect-rank: structured and dense spectra agree; expected ranks per method; CLI outputs."""

from __future__ import annotations

import json

import pytest
import torch
from test_adapters import SMALL, _build, _layer, _randomise, _recipe
from typer.testing import CliRunner

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.cli import app
from tnlora_cli.ranks import inspect_run
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.tensor.spectrum import spectrum_dense, spectrum_from_factors, summarise
from tnlora_cli.train import train

#: Adapters whose update is not a product of thin factors: ranked by a dense SVD only.
DENSE_ONLY = {"tera"}


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_structured_and_dense_paths_agree(kind):
    model = _build(kind, dtype=torch.float64)
    _randomise(model)
    adapter = _layer(model)
    factors = adapter.low_rank_factors()
    if kind in DENSE_ONLY:
        assert factors is None
        return
    assert factors is not None
    fast, slow = spectrum_from_factors(*factors), spectrum_dense(adapter.delta_weight())
    shape = (adapter.out_features, adapter.in_features)
    a, b = summarise(fast, shape, None), summarise(slow, shape, None)
    assert a["rank"] == b["rank"]
    torch.testing.assert_close(torch.tensor(a["top_singular_values"]), torch.tensor(b["top_singular_values"][: len(a["top_singular_values"])]), rtol=1e-8, atol=1e-10)


def test_lora_rank_is_exactly_r_for_generic_factors():
    model = _build("lora", dtype=torch.float64)
    _randomise(model)
    summary = summarise(spectrum_from_factors(*_layer(model).low_rank_factors()), (24, 16), None)
    assert summary["rank"] == SMALL["lora"]["r"] == 4
    assert 1 <= summary["effective_rank"] <= 4 and summary["rank_90"] <= summary["rank_99"] <= 4


def test_tera_full_rank_has_no_factors_and_reaches_min_dim():
    model = _build("tera", dtype=torch.float64)
    _randomise(model)
    adapter = _layer(model)
    assert adapter.low_rank_factors() is None
    assert summarise(spectrum_dense(adapter.delta_weight()), (24, 16), None)["rank"] == 16


def test_summary_of_a_known_spectrum():
    s = summarise(torch.tensor([4.0, 2.0, 1.0, 0.0]), (4, 4), None)
    assert s["rank"] == 3 and s["rank_90"] == 2 and s["rank_99"] == 3  # energies 16/21, 20/21, 1
    p = torch.tensor([4.0, 2.0, 1.0]) / 7
    assert s["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_inspect_runs_cli_plot_json_and_nonlinear(make_recipe, tmp_path):
    runs = []
    for kind, extra in [("lora", {}), ("tera", {}), ("tensorguide", {"activation": "relu"})]:
        raw = _recipe(make_recipe, kind, **extra)
        raw["output_dir"] = str(tmp_path / kind)
        raw["training"]["max_steps"] = 10
        train(validate_recipe(raw))
        runs.append(raw["output_dir"])
    report = inspect_run(runs[0])
    assert [layer["rank"] for layer in report["layers"]] == [4, 4, 4, 4]
    assert all(layer["method"] == "factors" for layer in report["layers"])
    tera = inspect_run(runs[1])
    # High rank after a few steps (the zero-started d_i has only partly grown): far above LoRA's r.
    assert all(layer["max_rank"] == 32 and layer["rank"] >= 16 and layer["method"] == "dense" for layer in tera["layers"])
    result = CliRunner().invoke(app, ["inspect-rank", *runs, "--plot", str(tmp_path / "r.png"), "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "r.json").read_text())
    assert [d["adapter"] for d in data] == ["lora", "tera", "tensorguide"]
    assert all(layer["method"] == "nonlinear" and layer["rank"] is None for layer in data[2]["layers"])
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + 3 * 4
