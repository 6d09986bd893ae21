"""The active model as scoring runs it: a few numpy arrays, without sklearn.

Training registers every model twice: as its skops artifact (the sklearn estimator exactly as
it was validated, for evaluation reports and audits) and as serving arrays, written here as a
compressed .npz. The arrays load with numpy alone and `allow_pickle=False`, so nothing in them
can run code, and the scoring service never imports sklearn or scipy: they were ~95 MB of its
~200 MB resident at rest (#8), for a model that is, once fitted, a sum of tree leaves or a dot
product behind a sigmoid.

The forms served: `CalibratedClassifierCV` with sigmoid calibration (one model or the average
of fold models) over `HistGradientBoostingClassifier` (numeric features, binary) or over a
`LogisticRegression`, bare or behind a `StandardScaler` — what training makes. Any other
estimator has no serving form (`ServingModel.from_estimator` gives None) and is served through
sklearn from its artifact, as before.

Scores and their reasons need the model at a row and at copies of it that differ in ONE
feature (services.scoring.reasons). A copy follows its row's path through a tree until the
first split on that feature where the reference value goes the other way, and only from there
needs a walk of its own; `_walk` walks all trees of a fold at once, level by level, as arrays:
every row in every tree, noting where each of its copies leaves its path, then only those
copies from there on. The sums are numpy's (pairwise), sklearn's are tree by tree: results agree
to ~1e-15.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SERVING_FORMAT = 1
"""Written into every serving file; a file of another format is refused at load."""

WALK_MIN_ROWS = 2
"""From this many rows, trees are walked with the copies leaving their rows' paths (`_walk`); a
single row and its copies are walked as rows of their own, which costs it less (155 against
230 µs with 150 trees of 15 leaves; at 2 rows both cost ~250)."""

WALK_CHUNK_ROWS = 256
"""Rows walked together: larger chunks' arrays outgrow the CPU caches (1,000 rows at once cost
~1.5x as much per row as 256)."""


class ModelLoadError(ValueError):
    """A registered model cannot be used by this code: corrupt or incompatible artifact."""


def sigmoid_calibrated(a: float, b: float, raw: np.ndarray) -> np.ndarray:
    """sklearn's _SigmoidCalibration.predict: expit(-(a * raw + b))."""
    with np.errstate(over="ignore"):  # exp overflowing to inf gives probability 0, as expit does
        return 1.0 / (1.0 + np.exp(a * raw + b))


@dataclass(frozen=True)
class Forest:
    """A fold's trees as flat arrays, each node numbered once across all trees. A leaf is its
    own left and right child with threshold +inf, so a walk that reached it stays there."""

    feature: np.ndarray  # intp; 0 for leaves
    threshold: np.ndarray  # float64; a row goes left when its value <= threshold
    missing_left: np.ndarray  # bool; where a missing (NaN) value goes
    children: np.ndarray  # intp; node i's right child at 2i, its left at 2i + 1: children[2i + goes_left]
    value: np.ndarray  # float64; the leaves' values
    is_leaf: np.ndarray  # bool
    roots: np.ndarray  # intp; each tree's first node
    depth: int  # the deepest leaf's depth: steps that take every walk to its leaf

    ARRAYS = ("feature", "threshold", "missing_left", "children", "value", "is_leaf", "roots")


@dataclass(frozen=True)
class TreeFold:
    """One sigmoid-calibrated boosted-tree model."""

    baseline: float
    forest: Forest
    sigmoid: tuple[float, float]

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return sigmoid_calibrated(*self.sigmoid, raw)

    def raw_predictions(self, rows: np.ndarray) -> np.ndarray:
        return _walk_rows(self.forest, self.baseline, rows)


@dataclass(frozen=True)
class LinearFold:
    """One sigmoid-calibrated logistic regression, with the StandardScaler before it if any."""

    mean: np.ndarray | None  # the scaler's mean_ (None: no centring)
    scale: np.ndarray | None  # the scaler's scale_ (None: no scaling)
    coef: np.ndarray  # (features, 1): the regression's coef_.T
    intercept: np.ndarray  # (1,)
    sigmoid: tuple[float, float]

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return sigmoid_calibrated(*self.sigmoid, raw)

    def raw_predictions(self, rows: np.ndarray) -> np.ndarray:
        """decision_function(rows): StandardScaler.transform (subtract mean_, then divide by
        scale_) and LogisticRegression.decision_function (rows @ coef_.T + intercept_)."""
        scaled = rows
        if self.mean is not None:
            scaled = scaled - self.mean
        if self.scale is not None:
            scaled = scaled / self.scale
        return (scaled @ self.coef + self.intercept).reshape(-1)


Fold = TreeFold | LinearFold


@dataclass(frozen=True)
class ServingModel:
    """A binary classifier with `predict_proba`, as sklearn's, computed from arrays."""

    folds: tuple[Fold, ...]
    n_features_in_: int

    @property
    def classes_(self) -> np.ndarray:
        return np.array([0, 1])

    def churn_probability(self, rows: np.ndarray) -> np.ndarray:
        """predict_proba(rows)[:, 1] as CalibratedClassifierCV computes it: each fold's
        calibrated probability, averaged."""
        rows = np.ascontiguousarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.n_features_in_:
            raise ValueError(f"expected rows of {self.n_features_in_} features, got an array of shape {rows.shape}")
        if any(isinstance(fold, LinearFold) for fold in self.folds) and np.isnan(rows).any():
            raise ValueError("input contains NaN: a logistic regression has no value for a missing feature")
        total = np.zeros(len(rows))
        for fold in self.folds:
            total += fold.calibrate(fold.raw_predictions(rows))
        total /= len(self.folds)
        return total

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        churn = self.churn_probability(rows)
        return np.column_stack([1.0 - churn, churn])

    def perturbed_proba(
        self, X: np.ndarray, ref: np.ndarray, rows_at: np.ndarray, features_at: np.ndarray,
    ) -> np.ndarray:
        """churn_probability(vstack([copies, X])), where copy i is X[rows_at[i]] with feature
        features_at[i] set to ref[features_at[i]] (rows_at ascending, as np.nonzero gives them).
        X and ref finite."""
        if len(X) < WALK_MIN_ROWS or not all(isinstance(fold, TreeFold) for fold in self.folds):
            return self.churn_probability(np.vstack([perturbed_copies(X, ref, rows_at, features_at), X]))
        m = len(rows_at)
        X = np.ascontiguousarray(X, dtype=np.float64)
        raw = np.empty(m + len(X))
        total = np.zeros(m + len(X))
        for fold in self.folds:
            for lo in range(0, len(X), WALK_CHUNK_ROWS):
                hi = min(lo + WALK_CHUNK_ROWS, len(X))
                first, last = np.searchsorted(rows_at, (lo, hi))
                raw[m + lo:m + hi], raw[first:last] = _walk(
                    fold.forest, fold.baseline, X[lo:hi], ref, rows_at[first:last] - lo, features_at[first:last])
            total += fold.calibrate(raw)
        total /= len(self.folds)
        return total

    # -- the registry's serving file ---------------------------------------------------------

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "format": np.array(SERVING_FORMAT), "n_features": np.array(self.n_features_in_),
            "kinds": np.array(["tree" if isinstance(fold, TreeFold) else "linear" for fold in self.folds]),
        }
        for i, fold in enumerate(self.folds):
            arrays[f"{i}.sigmoid"] = np.array(fold.sigmoid, dtype=np.float64)
            if isinstance(fold, TreeFold):
                arrays[f"{i}.baseline"] = np.array(fold.baseline, dtype=np.float64)
                arrays[f"{i}.depth"] = np.array(fold.forest.depth)
                for name in Forest.ARRAYS:
                    arrays[f"{i}.{name}"] = getattr(fold.forest, name)
            else:
                empty = np.zeros(0)  # no scaler step of this kind
                arrays[f"{i}.mean"] = empty if fold.mean is None else fold.mean
                arrays[f"{i}.scale"] = empty if fold.scale is None else fold.scale
                arrays[f"{i}.coef"] = fold.coef
                arrays[f"{i}.intercept"] = fold.intercept
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> ServingModel:
        """The model a serving file holds, checked so that every walk ends on a leaf and every
        index and shape fits; ModelLoadError naming the first problem otherwise."""
        try:
            data = np.load(io.BytesIO(blob), allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("one array, not a set of named arrays")
            with data:
                arrays = {name: data[name] for name in data.files}
        except Exception as exc:  # not a zip, a truncated one, pickled objects, ...
            raise ModelLoadError(f"serving arrays are not a readable .npz file ({type(exc).__name__}: {exc})") from exc
        return _Reader(arrays).model()

    # -- from sklearn ----------------------------------------------------------------------

    @classmethod
    def from_estimator(cls, estimator: Any) -> ServingModel | None:
        """The serving form of a fitted sklearn estimator, or None for an estimator of a kind
        not served from arrays (the module doc lists the kinds). Imports sklearn."""
        from sklearn.calibration import CalibratedClassifierCV, _SigmoidCalibration

        if type(estimator) is not CalibratedClassifierCV or [int(c) for c in estimator.classes_] != [0, 1]:
            return None
        folds: list[Fold] = []
        for calibrated in estimator.calibrated_classifiers_:
            model = calibrated.estimator
            if (len(calibrated.calibrators) != 1 or list(model.classes_) != list(estimator.classes_)
                    or type(calibrated.calibrators[0]) is not _SigmoidCalibration):
                return None
            calibrator = calibrated.calibrators[0]
            sigmoid = (float(calibrator.a_), float(calibrator.b_))
            fold = _tree_fold(model, sigmoid) or _linear_fold(model, sigmoid)
            if fold is None:
                return None
            folds.append(fold)
        return cls(tuple(folds), int(estimator.n_features_in_)) if folds else None


def perturbed_copies(X: np.ndarray, ref: np.ndarray, rows_at: np.ndarray, features_at: np.ndarray) -> np.ndarray:
    """Row rows_at[i] of X with feature features_at[i] replaced by its reference value, for each i."""
    copies = X[rows_at].copy()
    copies[np.arange(len(rows_at)), features_at] = ref[features_at]
    return copies


def _tree_fold(model: Any, sigmoid: tuple[float, float]) -> TreeFold | None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    if (type(model) is not HistGradientBoostingClassifier or model.n_trees_per_iteration_ != 1
            or model.is_categorical_ is not None):
        return None
    trees = [tree for (tree,) in model._predictors]
    sizes = [len(tree.nodes) for tree in trees]
    roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
    nodes = np.concatenate([tree.nodes for tree in trees])
    offset = np.repeat(roots, sizes)
    leaf = nodes["is_leaf"].astype(bool)
    itself = np.arange(len(nodes), dtype=np.intp)
    children = np.empty(2 * len(nodes), dtype=np.intp)
    children[0::2] = np.where(leaf, itself, nodes["right"].astype(np.intp) + offset)
    children[1::2] = np.where(leaf, itself, nodes["left"].astype(np.intp) + offset)
    forest = Forest(
        feature=np.where(leaf, 0, nodes["feature_idx"]).astype(np.intp),
        threshold=np.where(leaf, np.inf, nodes["num_threshold"]).astype(np.float64),
        missing_left=np.where(leaf, False, nodes["missing_go_to_left"].astype(bool)),
        children=children, value=nodes["value"].astype(np.float64), is_leaf=leaf, roots=roots,
        depth=int(nodes["depth"].max()),
    )
    return TreeFold(float(model._baseline_prediction.ravel()[0]), forest, sigmoid)


def _linear_fold(model: Any, sigmoid: tuple[float, float]) -> LinearFold | None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    scaler = None
    if type(model) is Pipeline:
        steps = [step for _, step in model.steps if step not in (None, "passthrough")]
        if len(steps) != 2 or type(steps[0]) is not StandardScaler:
            return None
        scaler, model = steps
    if type(model) is not LogisticRegression or model.coef_.shape != (1, model.n_features_in_):
        return None
    mean = scaler.mean_ if scaler is not None and scaler.with_mean else None
    scale = scaler.scale_ if scaler is not None and scaler.with_std else None
    return LinearFold(mean, scale, np.ascontiguousarray(model.coef_.T, dtype=np.float64),
                      np.asarray(model.intercept_, dtype=np.float64), sigmoid)


class _Reader:
    """Checks a serving file's arrays while building the model from them."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def array(self, name: str, kind: str, ndim: int) -> np.ndarray:
        if name not in self.arrays:
            raise ModelLoadError(f"serving arrays lack {name!r}")
        value = self.arrays[name]
        if value.dtype.kind not in kind or value.ndim != ndim:
            raise ModelLoadError(f"serving array {name!r} is {value.dtype} of {value.ndim} dimensions; "
                                 f"expected {ndim} dimensions of kind {kind!r}")
        return value

    def finite(self, name: str, ndim: int, size: int | None = None) -> np.ndarray:
        value = self.array(name, "fiu", ndim).astype(np.float64)
        if not np.isfinite(value).all():
            raise ModelLoadError(f"serving array {name!r} holds values that are not finite")
        if size is not None and value.size != size:
            raise ModelLoadError(f"serving array {name!r} holds {value.size} values, expected {size}")
        return value

    def model(self) -> ServingModel:
        version = int(self.array("format", "iu", 0))
        if version != SERVING_FORMAT:
            raise ModelLoadError(f"serving arrays of format {version}; this code reads format {SERVING_FORMAT}")
        width = int(self.array("n_features", "iu", 0))
        kinds = [str(kind) for kind in self.array("kinds", "U", 1)]
        if width < 1 or not kinds:
            raise ModelLoadError("serving arrays hold no features or no folds")
        folds: list[Fold] = []
        for i, kind in enumerate(kinds):
            sigmoid = self.finite(f"{i}.sigmoid", 1, 2)
            pair = (float(sigmoid[0]), float(sigmoid[1]))
            if kind == "tree":
                folds.append(TreeFold(float(self.finite(f"{i}.baseline", 0)), self.forest(i, width), pair))
            elif kind == "linear":
                folds.append(self.linear(i, width, pair))
            else:
                raise ModelLoadError(f"serving arrays name a fold of unknown kind {kind!r}")
        return ServingModel(tuple(folds), width)

    def linear(self, i: int, width: int, sigmoid: tuple[float, float]) -> LinearFold:
        mean, scale = self.finite(f"{i}.mean", 1), self.finite(f"{i}.scale", 1)
        for name, value in (("mean", mean), ("scale", scale)):
            if value.size not in (0, width):
                raise ModelLoadError(f"serving array '{i}.{name}' holds {value.size} values, expected {width}")
        if scale.size and (scale == 0).any():
            raise ModelLoadError(f"serving array '{i}.scale' holds zeros")
        coef = self.finite(f"{i}.coef", 2, width).reshape(width, 1)
        return LinearFold(mean if mean.size else None, scale if scale.size else None, coef,
                          self.finite(f"{i}.intercept", 1, 1), sigmoid)

    def forest(self, i: int, width: int) -> Forest:
        feature = self.array(f"{i}.feature", "iu", 1).astype(np.intp)
        nodes = len(feature)
        threshold = self.array(f"{i}.threshold", "f", 1).astype(np.float64)
        missing_left = self.array(f"{i}.missing_left", "b", 1)
        children = self.array(f"{i}.children", "iu", 1).astype(np.intp)
        value = self.finite(f"{i}.value", 1, nodes)
        is_leaf = self.array(f"{i}.is_leaf", "b", 1)
        roots = self.array(f"{i}.roots", "iu", 1).astype(np.intp)
        depth = int(self.array(f"{i}.depth", "iu", 0))
        if nodes == 0 or len(roots) == 0:
            raise ModelLoadError(f"serving fold {i} has no trees")
        if not (len(threshold) == len(missing_left) == len(is_leaf) == nodes and len(children) == 2 * nodes):
            raise ModelLoadError(f"serving fold {i}: its node arrays differ in length")
        if (feature < 0).any() or (feature >= width).any():
            raise ModelLoadError(f"serving fold {i} splits on a feature outside 0..{width - 1}")
        if (children < 0).any() or (children >= nodes).any() or (roots < 0).any() or (roots >= nodes).any():
            raise ModelLoadError(f"serving fold {i} points at nodes it does not have")
        itself = np.arange(nodes)
        if not ((children[0::2][is_leaf] == itself[is_leaf]).all() and (children[1::2][is_leaf] == itself[is_leaf]).all()
                and (threshold[is_leaf] == np.inf).all()):
            raise ModelLoadError(f"serving fold {i} has leaves that lead elsewhere")
        if np.isnan(threshold).any():
            raise ModelLoadError(f"serving fold {i} has thresholds that are not numbers")
        # every walk must be on a leaf after `depth` steps, whichever way it goes
        ends = is_leaf.copy()
        for _ in range(max(depth, 0)):
            ends = ends | (ends[children[0::2]] & ends[children[1::2]])
        if depth < 0 or not ends[roots].all():
            raise ModelLoadError(f"serving fold {i} has trees that do not end on leaves within {depth} steps")
        return Forest(feature, threshold, missing_left.astype(bool), children, value, is_leaf.astype(bool),
                      roots, depth)


# --- walking the trees ---------------------------------------------------------------------


def _walk_rows(forest: Forest, baseline: float, X: np.ndarray) -> np.ndarray:
    """baseline + the sum of the trees' leaf values for each row, as sklearn's TreePredictor
    walks a numeric row: left when value <= threshold, a missing value where the node says."""
    n, width = X.shape
    trees = len(forest.roots)
    values = X.ravel()
    missing = bool(np.isnan(values).any())
    start = np.repeat(np.arange(n, dtype=np.intp) * width, trees)
    at = np.tile(forest.roots, n)
    for _ in range(forest.depth):
        value = values[start + forest.feature[at]]
        goes_left = value <= forest.threshold[at]
        if missing:
            goes_left |= np.isnan(value) & forest.missing_left[at]
        at = forest.children[2 * at + goes_left]
    return baseline + forest.value[at].reshape(n, trees).sum(axis=1)


def _walk(
    forest: Forest, baseline: float, X: np.ndarray, ref: np.ndarray, rows_at: np.ndarray, features_at: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The raw predictions of X's rows (finite) and of their copies (as `perturbed_proba`'s)."""
    n, width = X.shape
    trees = len(forest.roots)
    m = len(rows_at)
    values = X.ravel()
    ref_goes_left_at = ref[forest.feature] <= forest.threshold  # per node: where the reference goes
    # every (row, tree): where it is, whether each of its copies has left its path yet
    row_start = np.repeat(np.arange(n, dtype=np.intp) * width, trees)
    left_path = np.zeros((n * trees, width), dtype=bool)
    leaf_of = np.empty(n * trees, dtype=np.intp)
    active, at, start = np.arange(n * trees), np.tile(forest.roots, n), row_start
    departed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (walker, feature, node)
    for step in range(forest.depth):
        feature = forest.feature[at]
        goes_left = values[start + feature] <= forest.threshold[at]
        split = np.flatnonzero(goes_left != ref_goes_left_at[at])
        if len(split):
            walker, changed = active[split], feature[split]
            first = ~left_path[walker, changed]  # a copy leaves its row's path once
            if first.any():
                walker, changed, split = walker[first], changed[first], split[first]
                left_path[walker, changed] = True
                departed.append((walker, changed, forest.children[2 * at[split] + ~goes_left[split]]))
        at = forest.children[2 * at + goes_left]
        if step % 2:  # drop the walks that reached their leaf, once they are many
            done = forest.is_leaf[at]
            if done.sum() * 4 > len(at):
                leaf_of[active[done]] = at[done]
                going = ~done
                active, at, start = active[going], at[going], start[going]
    leaf_of[active] = at
    leaf_value = forest.value[leaf_of]
    raw_rows = baseline + leaf_value.reshape(n, trees).sum(axis=1)
    raw_copies = raw_rows[rows_at]
    if departed:
        walkers = np.concatenate([d[0] for d in departed])
        changed = np.concatenate([d[1] for d in departed])
        leaves = _walk_copies(forest, values, ref_goes_left_at, row_start[walkers], changed,
                              np.concatenate([d[2] for d in departed]))
        copy_at = np.full(n * width, -1, dtype=np.intp)
        copy_at[rows_at * width + features_at] = np.arange(m)
        raw_copies = raw_copies + np.bincount(copy_at[row_start[walkers] + changed],
                                              weights=forest.value[leaves] - leaf_value[walkers], minlength=m)
    return raw_rows, raw_copies


def _walk_copies(
    forest: Forest, values: np.ndarray, ref_goes_left_at: np.ndarray, start: np.ndarray, changed: np.ndarray,
    at: np.ndarray,
) -> np.ndarray:
    """The leaves copies reach from the nodes `at` where they left their rows' paths: the row's
    values (flat, each row from `start`) except feature `changed`, which goes where the
    reference goes."""
    leaf_of = np.empty(len(at), dtype=np.intp)
    active = np.arange(len(at))
    for step in range(forest.depth):
        feature = forest.feature[at]
        goes_left = np.where(feature == changed, ref_goes_left_at[at], values[start + feature] <= forest.threshold[at])
        at = forest.children[2 * at + goes_left]
        if step % 2:
            done = forest.is_leaf[at]
            if done.sum() * 4 > len(at):
                leaf_of[active[done]] = at[done]
                going = ~done
                active, at, start, changed = active[going], at[going], start[going], changed[going]
    leaf_of[active] = at
    return leaf_of
