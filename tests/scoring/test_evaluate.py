"""The evaluation report: charts and page from the registry row, the CLI command."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from services.cli import app
from services.scoring import cli_ops
from services.scoring.evaluate import CHARTS, ReportUnavailable, decile_lift, gain_curve, reach_at
from services.scoring.model import TrainedModel
from services.scoring.service import ModelNotFound

from .conftest import register, retrained

PNG = b"\x89PNG\r\n\x1a\n"


def test_gain_and_lift_on_hand_made_data() -> None:
    y = np.array([1] * 10 + [0] * 90)
    perfect = np.linspace(1, 0, 100)
    contacted, caught = gain_curve(y, perfect)
    assert contacted[0] == caught[0] == 0.0 and contacted[-1] == caught[-1] == 1.0
    assert reach_at(y, perfect, 0.10) == pytest.approx(1.0)
    assert reach_at(y, perfect[::-1], 0.10) == pytest.approx(0.0)
    lifts = decile_lift(y, perfect)
    assert lifts[0] == pytest.approx(10.0) and lifts[1:] == [0.0] * 9


def test_evaluate_draws_the_report_of_the_active_or_a_named_model(
    database_url: str, tmp_path: Path, trained_model: TrainedModel
) -> None:
    with pytest.raises(ModelNotFound, match="the model registry is empty"):
        cli_ops.evaluate(database_url, None, tmp_path)
    active = register(database_url, retrained(trained_model, "m-20260101000000-0001"), activate=True)
    other = register(database_url, retrained(trained_model, "m-20260102000000-0002"), activate=False)

    index = cli_ops.evaluate(database_url, None, tmp_path)  # the active one, although not the newest
    assert index == tmp_path / active.version / "index.html"
    for chart in CHARTS:
        assert (index.parent / chart).read_bytes().startswith(PNG), chart
    page = index.read_text()
    assert f"Churn model {active.version}" in page
    assert all(f'src="{chart}"' in page for chart in CHARTS)
    report = trained_model.report
    assert f"{report.roc_auc:.3f}" in page and f"{report.baseline_auc:.3f}" in page
    assert f"{report.lift_top_decile:.2f}×" in page and "logistic_regression" in page and "hist_gradient_boosting" in page
    assert "Contacting the riskiest <b>10 %</b>" in page

    named = cli_ops.evaluate(database_url, other.version, tmp_path)
    assert named == tmp_path / other.version / "index.html" and named.is_file()
    stored = {m["version"]: m["report_path"] for m in cli_ops.list_models(database_url)}
    assert stored == {active.version: str(index), other.version: str(named)}

    with pytest.raises(ModelNotFound, match="no model 'm-missing' in the registry"):
        cli_ops.evaluate(database_url, "m-missing", tmp_path)
    blind = TrainedModel(trained_model.estimator, replace(trained_model.report, version="m-blind", validation=None))
    register(database_url, blind, activate=False)
    with pytest.raises(ReportUnavailable, match="model m-blind has no stored validation data"):
        cli_ops.evaluate(database_url, "m-blind", tmp_path)


def test_the_evaluate_command(database_url: str, tmp_path: Path, trained_model: TrainedModel) -> None:
    model = register(database_url, retrained(trained_model, "m-20260103000000-0003"), activate=True)
    env = {"CHURNGUARD_DATABASE_URL": database_url}
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--out", str(tmp_path)], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"report written to {tmp_path / model.version / 'index.html'}"
    missing = runner.invoke(app, ["evaluate", "--version", "m-nope", "--out", str(tmp_path)], env=env)
    assert missing.exit_code == 2
    assert "evaluate failed: no model 'm-nope' in the registry" in missing.output
