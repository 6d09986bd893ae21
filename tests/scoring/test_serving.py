"""Serving arrays: every trained model is registered with them, scoring serves from them without
sklearn, and a damaged serving file is refused with the problem named."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sqlalchemy import select, update

from services.scoring import cli_ops, reasons
from services.scoring.features import FEATURE_NAMES, compute_features
from services.scoring.model import (
    ModelLoadError,
    TrainedModel,
    load_artifact,
    load_predictor,
    serving_arrays,
)
from services.scoring.serving import ServingModel
from services.scoring.service import load_active_predictor, model_detail
from services.scoring.tables import ScoringModel
from shared.db import make_engine, session_scope

from .conftest import SIM_END, register, retrained, simulated_histories


def _rows(customers: int = 80) -> list[dict[str, float]]:
    return [compute_features(events, SIM_END - timedelta(days=d))
            for d in (0, 60) for events in simulated_histories(customers, seed=21).values()]


def _stored(database_url: str, version: str) -> tuple[bytes, bytes | None]:
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            row = session.execute(select(ScoringModel).where(ScoringModel.version == version)).scalar_one()
            return row.artifact, row.serving
    finally:
        engine.dispose()


def _served_from(database_url: str, version: str) -> str:
    listed = {m["version"]: m for m in cli_ops.list_models(database_url)}[version]
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            assert model_detail(session, version)["served_from"] == listed["served_from"]
    finally:
        engine.dispose()
    return listed["served_from"]


def _active(database_url: str) -> object:
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            return load_active_predictor(session)
    finally:
        engine.dispose()


def test_a_registered_model_is_served_from_its_arrays_as_its_artifact_would_score(
    database_url: str, trained_model: TrainedModel,
) -> None:
    register(database_url, retrained(trained_model, "m-arrays"), activate=True)
    artifact, arrays = _stored(database_url, "m-arrays")
    assert arrays is not None and arrays.startswith(b"PK")  # an .npz (zip) of plain arrays
    predictor = _active(database_url)
    assert isinstance(predictor.estimator, ServingModel)
    assert _served_from(database_url, "m-arrays") == "arrays"

    rows = _rows()
    names = list(FEATURE_NAMES)
    from_artifact = load_artifact(artifact)
    expected = reasons.score_and_explain(from_artifact, names, rows, trained_model.report.reference)
    served = reasons.score_and_explain(predictor.estimator, names, rows, reasons.reference_of(predictor))
    assert np.allclose(served[0], expected[0], rtol=0, atol=1e-12)
    assert served[1] == expected[1] and sum(bool(r) for r in served[1]) > 10
    matrix = np.array([[row[name] for name in names] for row in rows])
    assert np.allclose(predictor.predict(rows), from_artifact.predict_proba(matrix)[:, 1], rtol=0, atol=1e-12)

    # a model registered before serving arrays existed is read from its artifact once: its
    # serving arrays are written on that load, and it scores from them from then on
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            session.execute(update(ScoringModel).where(ScoringModel.version == "m-arrays").values(serving=None))
    finally:
        engine.dispose()
    assert _stored(database_url, "m-arrays")[1] is None
    assert _served_from(database_url, "m-arrays") == "artifact"
    older = _active(database_url)
    assert isinstance(older.estimator, ServingModel)
    assert np.allclose(older.predict(rows), predictor.predict(rows), rtol=0, atol=1e-12)
    assert _served_from(database_url, "m-arrays") == "arrays"
    backfilled = _stored(database_url, "m-arrays")[1]
    assert backfilled is not None
    assert np.allclose(ServingModel.from_bytes(backfilled).churn_probability(matrix),
                       from_artifact.predict_proba(matrix)[:, 1], rtol=0, atol=1e-12)


def test_the_scoring_service_scores_and_explains_without_importing_sklearn_or_scipy(
    trained_model: TrainedModel, tmp_path: Path,
) -> None:
    """Resident memory (#8): sklearn and scipy (which it imports) were ~95 MB of the scoring
    service's ~200. A fresh interpreter starts the app's modules, creates its tables, loads a
    model from serving arrays and scores and explains a batch: none of them is imported."""
    script = (
        "import sys, services.scoring.app\n"
        "from services.scoring.features import FEATURE_NAMES\n"
        "from services.scoring.model import load_predictor\n"
        "from services.scoring.reasons import score_and_explain, reference_of\n"
        "from services.scoring.tables import TABLES\n"
        "from shared.db import create_tables, make_engine\n"
        "create_tables(make_engine(sys.argv[1]), TABLES)\n"
        "p = load_predictor('v', FEATURE_NAMES, b'', 0.8, serving=sys.stdin.buffer.read())\n"
        "rows = [dict.fromkeys(FEATURE_NAMES, 1.0), dict.fromkeys(FEATURE_NAMES, 90.0)]\n"
        "probabilities, why = score_and_explain(p.estimator, FEATURE_NAMES, rows, reference_of(p))\n"
        "print(len(probabilities), all(0 <= x <= 1 for x in probabilities))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'skops', 'threadpoolctl'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, f"sqlite:///{tmp_path / 'scoring.db'}"],
                          input=serving_arrays(trained_model.estimator),
                          capture_output=True, check=True, cwd=Path(__file__).parents[2])
    assert done.stdout.decode().split("\n")[:2] == ["2 True", "[]"], done.stderr.decode()


@pytest.fixture(scope="module")
def tree_arrays() -> bytes:
    rng = np.random.default_rng(9)
    X = rng.normal(0, 10, size=(400, len(FEATURE_NAMES)))
    y = (X[:, 0] + rng.normal(0, 5, size=400) > 0).astype(int)
    model = CalibratedClassifierCV(HistGradientBoostingClassifier(max_iter=10, random_state=0),
                                   method="sigmoid", cv=3, ensemble=False).fit(X, y)
    return serving_arrays(model)


def _tampered(blob: bytes, change: Callable[[dict[str, np.ndarray]], None]) -> bytes:
    with np.load(io.BytesIO(blob)) as data:
        arrays = {name: data[name] for name in data.files}
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _set(name: str, value: object) -> Callable[[dict[str, np.ndarray]], None]:
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = np.asarray(value)
    return change


def _edit(name: str, edit: Callable[[np.ndarray], None]) -> Callable[[dict[str, np.ndarray]], None]:
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = arrays[name].copy()
        edit(arrays[name])
    return change


def _loop_at_first_inner_node(arrays: dict[str, np.ndarray]) -> None:
    inner = int(np.flatnonzero(~arrays["0.is_leaf"])[0])
    arrays["0.children"] = arrays["0.children"].copy()
    arrays["0.children"][2 * inner] = inner  # its right child is itself: a walk that never ends


def _one_array(blob: bytes) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(3))
    return buffer.getvalue()


def _pickled(blob: bytes) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, format=np.array([{"evil": "object"}], dtype=object))
    return buffer.getvalue()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda blob: b"not a zip at all", "serving arrays are not a readable .npz file"),
    (lambda blob: blob[: len(blob) // 2], "serving arrays are not a readable .npz file"),
    (_one_array, "serving arrays are not a readable .npz file (ValueError: one array"),
    (_pickled, "serving arrays are not a readable .npz file (ValueError: Object arrays cannot be loaded"),
    (lambda blob: _tampered(blob, _set("format", 2)), "serving arrays of format 2; this code reads format 1"),
    (lambda blob: _tampered(blob, lambda a: a.pop("0.children")), "serving arrays lack '0.children'"),
    (lambda blob: _tampered(blob, _set("kinds", ["forest"])), "serving arrays name a fold of unknown kind 'forest'"),
    (lambda blob: _tampered(blob, _edit("0.feature", lambda f: f.__setitem__(0, 99))),
     "serving fold 0 splits on a feature outside 0..18"),
    (lambda blob: _tampered(blob, _edit("0.children", lambda c: c.__setitem__(0, 10**6))),
     "serving fold 0 points at nodes it does not have"),
    (lambda blob: _tampered(blob, _loop_at_first_inner_node),
     "serving fold 0 has trees that do not end on leaves within"),
    (lambda blob: _tampered(blob, _edit("0.value", lambda v: v.__setitem__(-1, np.nan))),
     "serving array '0.value' holds values that are not finite"),
    (lambda blob: _tampered(blob, _set("0.sigmoid", [1.0])), "serving array '0.sigmoid' holds 1 values, expected 2"),
    (lambda blob: _tampered(blob, _set("0.threshold", np.zeros((2, 2)))),
     "serving array '0.threshold' is float64 of 2 dimensions"),
])
def test_damaged_serving_arrays_are_refused_naming_the_problem(
    tree_arrays: bytes, damage: Callable[[bytes], bytes], message: str,
) -> None:
    assert load_predictor("good", FEATURE_NAMES, b"", 0.8, serving=tree_arrays).version == "good"
    with pytest.raises(ModelLoadError, match=f"^model bad: {message.replace('(', '[(]').replace('.', '[.]')}"):
        load_predictor("bad", FEATURE_NAMES, b"", 0.8, serving=damage(tree_arrays))


def test_serving_arrays_of_the_wrong_width_are_refused(tree_arrays: bytes) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    with pytest.raises(ModelLoadError, match="model narrow: the artifact expects 19 features but its feature list names 18"):
        load_predictor("narrow", FEATURE_NAMES[:-1], b"", 0.8, serving=tree_arrays)
    rng = np.random.default_rng(2)
    X = rng.normal(0, 10, size=(300, len(FEATURE_NAMES)))
    y = (X[:, 0] + rng.normal(0, 5, size=300) > 0).astype(int)
    linear = serving_arrays(CalibratedClassifierCV(
        Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression())]), method="sigmoid", cv=3).fit(X, y))
    assert load_predictor("linear", FEATURE_NAMES, b"", 0.8, serving=linear).version == "linear"
    with pytest.raises(ModelLoadError, match="serving array '0.coef' holds 3 values, expected 19"):
        load_predictor("short", FEATURE_NAMES, b"", 0.8, serving=_tampered(linear, _set("0.coef", np.zeros((3, 1)))))
    with pytest.raises(ModelLoadError, match="serving array '0.scale' holds zeros"):
        load_predictor("flat", FEATURE_NAMES, b"", 0.8, serving=_tampered(linear, _set("0.scale", np.zeros(19))))
