"""The evaluation report of one registered model: an HTML page with PNG charts.

Drawn from what the registry row holds (no history needed, so a report can be redrawn after
customers were erased): the validation period's labels, the model's probabilities and the
recency baseline's scores, the calibration bins and the permutation importance computed at
training time. Charts: ROC (with the baseline), calibration, cumulative gain and lift per
decile, the score distribution of churned vs retained customers, and feature importance.

matplotlib is imported lazily with its object-oriented API (`Figure`, Agg canvas, no pyplot
state), so the scoring service never loads it and reports can be drawn from any thread.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from services.scoring.model import ValidationData

DEFAULT_REPORTS_DIR = Path("var/reports")
CHARTS = ("roc.png", "calibration.png", "gain_lift.png", "distribution.png", "importance.png")

_MODEL = "#1f5fa8"
_BASELINE = "#d9822b"
_CHANCE = "#9a9a9a"
_CHURNED = "#c23b22"
_RETAINED = "#3c8d5a"


class ReportUnavailable(ValueError):
    """The registry row has no validation data to draw from (retrain the model)."""


def _figure(width: float = 6.4, height: float = 4.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")


def gain_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of customers contacted, share of churners reached), riskiest first."""
    order = np.argsort(-scores, kind="stable")
    caught = np.concatenate([[0.0], np.cumsum(y[order]) / max(1, int(y.sum()))])
    contacted = np.arange(len(y) + 1) / max(1, len(y))
    return contacted, caught


def decile_lift(y: np.ndarray, scores: np.ndarray) -> list[float]:
    """Churn rate per decile (riskiest first) divided by the overall churn rate."""
    base = float(y.mean()) if len(y) else 0.0
    order = np.argsort(-scores, kind="stable")
    return [float(y[chunk].mean() / base) if base and len(chunk) else 0.0 for chunk in np.array_split(order, 10)]


def reach_at(y: np.ndarray, scores: np.ndarray, share: float) -> float:
    """Share of churners among the riskiest `share` of customers."""
    contacted, caught = gain_curve(y, scores)
    return float(np.interp(share, contacted, caught))


# --- charts ---------------------------------------------------------------------------------


def _roc_chart(path: Path, y: np.ndarray, p: np.ndarray, baseline: np.ndarray, auc: float, baseline_auc: float) -> None:
    fig = _figure()
    ax = fig.subplots()
    fpr, tpr, _ = roc_curve(y, p)
    bfpr, btpr, _ = roc_curve(y, baseline)
    ax.plot(fpr, tpr, color=_MODEL, lw=2.2, label=f"model (AUC {auc:.3f})")
    ax.plot(bfpr, btpr, color=_BASELINE, lw=1.8, label=f"recency only (AUC {baseline_auc:.3f})")
    ax.plot([0, 1], [0, 1], color=_CHANCE, lw=1, ls="--", label="chance (AUC 0.5)")
    ax.set(xlabel="false alarms: share of retained customers flagged", ylabel="share of churners flagged",
           title="ROC curve on the validation period", xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)


def _calibration_chart(path: Path, bins: Sequence[Mapping[str, float]]) -> None:
    fig = _figure()
    ax = fig.subplots()
    predicted = [float(b["mean_predicted"]) for b in bins]
    observed = [float(b["observed"]) for b in bins]
    top = max([*predicted, *observed, 0.05]) * 1.08
    ax.plot([0, top], [0, top], color=_CHANCE, lw=1, ls="--", label="perfectly calibrated")
    ax.plot(predicted, observed, color=_MODEL, lw=2, marker="o", label="model (10 equal-size groups)")
    ax.set(xlabel="predicted churn probability (group mean)", ylabel="observed churn rate",
           title="Calibration: does 20 % mean 20 %?", xlim=(0, top), ylim=(0, top))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    _save(fig, path)


def _gain_lift_chart(path: Path, y: np.ndarray, p: np.ndarray, baseline: np.ndarray) -> None:
    fig = _figure(10.5, 4.4)
    gain, lift = fig.subplots(1, 2)
    for scores, color, label in ((p, _MODEL, "model"), (baseline, _BASELINE, "recency only")):
        contacted, caught = gain_curve(y, scores)
        gain.plot(contacted * 100, caught * 100, color=color, lw=2, label=label)
    gain.plot([0, 100], [0, 100], color=_CHANCE, lw=1, ls="--", label="random")
    gain.axvline(10, color=_CHANCE, lw=0.8, ls=":")
    gain.set(xlabel="% of customers contacted (riskiest first)", ylabel="% of churners reached",
             title="Cumulative gain", xlim=(0, 100), ylim=(0, 101))
    gain.grid(alpha=0.3)
    gain.legend(loc="lower right")
    deciles = np.arange(1, 11)
    width = 0.4
    lift.bar(deciles - width / 2, decile_lift(y, p), width, color=_MODEL, label="model")
    lift.bar(deciles + width / 2, decile_lift(y, baseline), width, color=_BASELINE, label="recency only")
    lift.axhline(1.0, color=_CHANCE, lw=1, ls="--", label="average customer")
    lift.set(xlabel="decile (1 = riskiest tenth)", ylabel="churn rate / average churn rate",
             title="Lift per decile", xticks=deciles)
    lift.grid(alpha=0.3, axis="y")
    lift.legend(loc="upper right")
    _save(fig, path)


def _distribution_chart(path: Path, y: np.ndarray, p: np.ndarray) -> None:
    fig = _figure()
    ax = fig.subplots()
    edges = np.linspace(0, 1, 41)
    for mask, color, label in ((y == 0, _RETAINED, "stayed"), (y == 1, _CHURNED, "churned")):
        group = p[mask]
        ax.hist(group, bins=edges, weights=np.full(len(group), 100.0 / max(1, len(group))), alpha=0.6,
                color=color, label=f"{label} ({len(group)})")
    ax.set(xlabel="predicted churn probability", ylabel="% of the group (log scale)",
           title="Score distribution: churned vs stayed", xlim=(0, 1))
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    _save(fig, path)


def _importance_chart(path: Path, importance: Sequence[Mapping[str, Any]]) -> None:
    rows = list(importance)[:15][::-1]
    fig = _figure(6.4, max(3.0, 0.32 * len(rows) + 1.2))
    ax = fig.subplots()
    names = [str(r["feature"]) for r in rows]
    means = [float(r["mean"]) for r in rows]
    stds = [float(r["std"]) for r in rows]
    ax.barh(names, means, xerr=stds, color=_MODEL, alpha=0.85, ecolor=_CHANCE)
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel="drop in validation ROC AUC when the feature is shuffled",
           title="What the model relies on (permutation importance)")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


# --- the page -----------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, datetime):
        return value.date().isoformat()
    return html.escape(str(value))


def _page(model: Mapping[str, Any], y: np.ndarray, p: np.ndarray, baseline: np.ndarray) -> str:
    e = html.escape
    version = str(model["version"])
    churn_rate = float(y.mean())
    reach10, base10 = reach_at(y, p, 0.10), reach_at(y, baseline, 0.10)
    reach20 = reach_at(y, p, 0.20)
    auc, base_auc = float(model["roc_auc"]), float(model["baseline_auc"])
    verdict = (f"beats the recency-only baseline ({auc:.3f} vs {base_auc:.3f} ROC AUC)" if auc > base_auc
               else f"does NOT beat the recency-only baseline ({auc:.3f} vs {base_auc:.3f} ROC AUC)")
    candidates = "".join(
        f"<tr><td>{e(str(c['name']))}{' <b>(winner)</b>' if c.get('winner') else ''}</td>"
        f"<td>{float(c['roc_auc']):.3f}</td><td class=small>{e(str(c['algorithm']))}</td></tr>"
        for c in model.get("candidates") or []
    )
    candidates += f"<tr><td>recency only (baseline)</td><td>{base_auc:.3f}</td><td class=small>days since last activity</td></tr>"
    status = "active" if model.get("active") else "not active"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>churnguard model {e(version)}</title>
<style>
 body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; padding: 0 1em; }}
 h1 {{ margin-bottom: 0.2em; }} .sub {{ color: #666; margin-top: 0; }}
 .cards {{ display: flex; gap: 1em; flex-wrap: wrap; margin: 1.5em 0; }}
 .card {{ background: #f3f6fa; border-radius: 8px; padding: 0.8em 1.1em; min-width: 150px; }}
 .card b {{ display: block; font-size: 1.6em; color: {_MODEL}; }}
 table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
 td, th {{ border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: left; }}
 .small {{ font-size: 0.85em; color: #555; }}
 figure {{ margin: 2em 0; }} figcaption {{ color: #444; max-width: 800px; }}
 img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
<h1>Churn model {e(version)}</h1>
<p class=sub>{e(str(model.get("candidate") or model["algorithm"]))} · {status} · trained {_fmt(model.get("trained_at"))}
 on tenant {e(str(model.get("trained_on_tenant", "")))}'s history</p>
<p>On the validation period (customers as of {_fmt(model.get("validation_cutoff"))}, outcome over the next
 {int(model["horizon_days"])} days) this model {verdict}. Contacting the riskiest <b>10 %</b> of customers reaches
 <b>{reach10:.0%}</b> of those who churned (recency alone: {base10:.0%}, random: 10 %); the riskiest 20 % reach {reach20:.0%}.</p>
<div class=cards>
 <div class=card>ROC AUC<b>{auc:.3f}</b>baseline {base_auc:.3f}</div>
 <div class=card>PR AUC<b>{_fmt(model.get("pr_auc"))}</b>churn rate {churn_rate:.1%}</div>
 <div class=card>Top-decile lift<b>{_fmt(model.get("lift_top_decile"), 2)}×</b>vs average customer</div>
 <div class=card>Brier score<b>{_fmt(model.get("brier"), 4)}</b>lower is better</div>
</div>
<h2>Candidates on the validation period</h2>
<table><tr><th>model</th><th>ROC AUC</th><th>what it is</th></tr>{candidates}</table>
<figure><img src="roc.png" alt="ROC curve"><figcaption>How well the model ranks churners above stayers, at every
 threshold. The further the blue curve bends to the top left, the better; orange is what "longest inactive first" achieves.</figcaption></figure>
<figure><img src="gain_lift.png" alt="cumulative gain and lift"><figcaption>Left: if you work down the list
 from the riskiest customer, which share of all churners have you reached? Right: how much more often customers in
 each tenth churn than the average customer.</figcaption></figure>
<figure><img src="calibration.png" alt="calibration curve"><figcaption>Customers grouped into ten equal-size groups
 by predicted probability. On the diagonal, a predicted 20 % really means one in five churned — which makes the
 probability usable for budgets and thresholds, not just for ranking.</figcaption></figure>
<figure><img src="distribution.png" alt="score distribution"><figcaption>Predicted probabilities of customers who
 stayed (green) and who churned (red). The less the two overlap, the cleaner the separation. Log scale.</figcaption></figure>
<figure><img src="importance.png" alt="feature importance"><figcaption>How much the validation ROC AUC drops when
 one feature's values are shuffled: what the model actually relies on.</figcaption></figure>
<h2>Training</h2>
<table>
 <tr><td>algorithm</td><td>{e(str(model["algorithm"]))}</td></tr>
 <tr><td>training cutoffs</td><td>{_fmt(model.get("first_cutoff"))} … {_fmt(model.get("last_cutoff"))}</td></tr>
 <tr><td>validation cutoff</td><td>{_fmt(model.get("validation_cutoff"))}</td></tr>
 <tr><td>horizon</td><td>{int(model["horizon_days"])} days</td></tr>
 <tr><td>examples</td><td>{int(model["n_train"])} training, {int(model["n_holdout"])} validation ({int(y.sum())} churned)</td></tr>
 <tr><td>features</td><td class=small>{e(", ".join(model.get("feature_names") or []))}</td></tr>
</table>
</body></html>
"""


def write_report(model: Mapping[str, Any], reports_dir: Path = DEFAULT_REPORTS_DIR) -> Path:
    """Draw the report of one model (a registry row with validation data) into
    `reports_dir/<version>/`; returns the path of its index.html."""
    validation = ValidationData.from_json(model.get("validation"))
    if validation is None:
        raise ReportUnavailable(
            f"model {model['version']} has no stored validation data to draw a report from; retrain it"
        )
    y = np.asarray(validation.labels, dtype=int)
    p = np.asarray(validation.probabilities, dtype=float)
    baseline = np.asarray(validation.baseline, dtype=float)
    if len({int(v) for v in y}) < 2:
        raise ReportUnavailable(f"model {model['version']}: the validation data has only one class")
    out = Path(reports_dir) / str(model["version"])
    out.mkdir(parents=True, exist_ok=True)
    _roc_chart(out / "roc.png", y, p, baseline, float(model["roc_auc"]), float(model["baseline_auc"]))
    _calibration_chart(out / "calibration.png", model.get("calibration") or [])
    _gain_lift_chart(out / "gain_lift.png", y, p, baseline)
    _distribution_chart(out / "distribution.png", y, p)
    _importance_chart(out / "importance.png", model.get("importance") or [])
    index = out / "index.html"
    index.write_text(_page(model, y, p, baseline), encoding="utf-8")
    return index
