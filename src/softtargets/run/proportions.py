"""``softtargets fit-proportions`` and ``softtargets predict``: soft labels from a CSV of counts.

The CSV has one row per aggregated group: numeric feature columns and one count column per
class. The model (a :class:`~softtargets.training.sklearn.SoftLabelClassifier`) is saved as a directory:
``model.json`` (settings, classes, feature names, standardisation) and ``model.safetensors``
(weights), written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softtargets.data.counts import read_columns
from softtargets.errors import SoftTargetsError
from softtargets.files import parse_json, read_small_text
from softtargets.run.folder import RunFolder
from softtargets.training.models import mlp
from softtargets.training.sklearn import SoftLabelClassifier


@dataclass
class ProportionModel:
    """A fitted classifier with the column names and standardisation it was fitted with."""

    estimator: SoftLabelClassifier
    features: list[str]
    classes: list[str]
    mean: np.ndarray
    scale: np.ndarray

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.scale

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save

        directory = Path(directory)
        est = self.estimator
        if est.network_ is None:
            tensors = {"W": torch.from_numpy(est._W), "b": torch.from_numpy(est._b)}
        else:
            tensors = {k: v.detach().contiguous() for k, v in est.network_.state_dict().items()}
        meta = {
            "params": est.get_params(),
            "features": self.features,
            "classes": self.classes,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "n_features_in": int(est.n_features_in_),
            "n_iter": int(est.n_iter_),
        }
        # a run folder: never another's files, and never two writers at once
        with RunFolder.open(directory) as folder:
            folder.write_bytes("model.safetensors", save(tensors))
            folder.write_text("model.json", json.dumps(meta, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ProportionModel:
        from safetensors.torch import load_file

        directory = Path(directory)
        if (
            not (directory / "model.json").exists()
            or not (directory / "model.safetensors").exists()
        ):
            raise SoftTargetsError(
                f"{directory} holds no model; fit one with softtargets fit-proportions"
            )
        try:
            meta = parse_json(
                read_small_text(directory / "model.json", "model.json"),
                str(directory / "model.json"),
            )
            tensors = load_file(str(directory / "model.safetensors"))
        except (json.JSONDecodeError, OSError, Exception) as err:
            raise SoftTargetsError(
                f"{directory}: the model files are unreadable ({err}); fit again"
            ) from None
        _check_model_json(meta, tensors, directory / "model.json")
        params = meta["params"]
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
        est = SoftLabelClassifier(**params)
        est.classes_ = np.arange(len(meta["classes"]))
        est.n_features_in_ = meta["n_features_in"]
        est.n_iter_ = meta["n_iter"]
        est._single_class = False
        if est.hidden_layer_sizes:
            net = mlp(
                meta["n_features_in"], list(est.hidden_layer_sizes), len(meta["classes"])
            ).double()
            try:
                net.load_state_dict(tensors)
            except RuntimeError:  # missing, unexpected or misshapen weights
                raise SoftTargetsError(
                    f"{directory}/model.safetensors does not fit model.json's network; fit again"
                ) from None
            est.network_ = net.eval()
        else:
            est._W, est._b, est.network_ = tensors["W"].numpy(), tensors["b"].numpy(), None
        return cls(
            est, meta["features"], meta["classes"], np.array(meta["mean"]), np.array(meta["scale"])
        )


#: the keys of a fit-proportions model.json, each with what its value must be
MODEL_KEYS = ("params", "features", "classes", "mean", "scale", "n_features_in", "n_iter")


def _check_model_json(meta: Any, tensors: dict[str, Any], where: Path) -> None:
    """A model.json holding exactly the keys fit-proportions writes, consistent with its weights
    (one line naming the first thing wrong, never a KeyError or a shape error later)."""
    if not isinstance(meta, dict):
        raise SoftTargetsError(f"{where} is not a fit-proportions model; fit again")
    missing = [k for k in MODEL_KEYS if k not in meta]
    extra = sorted(set(meta) - set(MODEL_KEYS))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has an unknown key {extra[0]!r}"
        raise SoftTargetsError(f"{where} {what}; it was not written by fit-proportions: fit again")
    features, classes = meta["features"], meta["classes"]
    n = meta["n_features_in"]
    listed = all(isinstance(v, list) for v in (features, classes, meta["mean"], meta["scale"]))
    if not listed or not isinstance(n, int) or not isinstance(meta["params"], dict):
        raise SoftTargetsError(f"{where}: a value has the wrong type; fit again")
    if not (len(features) == len(meta["mean"]) == len(meta["scale"]) == n) or len(classes) < 2:
        raise SoftTargetsError(
            f"{where}: {len(features)} features, {len(meta['mean'])} means, {n} inputs and "
            f"{len(classes)} classes do not fit together; fit again"
        )
    if "W" in tensors and tuple(tensors["W"].shape) != (n, len(classes)):
        raise SoftTargetsError(
            f"{where} names {n} features and {len(classes)} classes but the weights are "
            f"{tuple(tensors['W'].shape)}; fit again"
        )


def fit_proportions(
    path: str | Path,
    features: list[str],
    counts: list[str],
    hidden: list[int] | None = None,
    alpha: float = 0.0,
    standardize: bool = True,
    holdout: float = 0.2,
    seed: int = 0,
) -> tuple[ProportionModel, dict[str, Any]]:
    """Fit on a CSV of counts. Returns the model and a report: coefficients for the linear model,
    held-out metrics (per observation) for a network."""
    if len(counts) < 2:
        raise SoftTargetsError("give at least two count columns (--counts yes,no)")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise SoftTargetsError(
            f"--alpha (the L2 penalty) must be a finite number >= 0, got {alpha}"
        )
    if hidden and min(hidden) < 1:
        raise SoftTargetsError(f"--hidden widths must be >= 1, got {hidden}")
    X = read_columns(path, features)
    C = read_columns(path, counts)
    mean = X.mean(0) if standardize else np.zeros(X.shape[1])
    scale = X.std(0) if standardize else np.ones(X.shape[1])
    scale[scale == 0] = 1.0
    estimator = SoftLabelClassifier(
        hidden_layer_sizes=tuple(hidden or ()), alpha=alpha, random_state=seed
    )
    model = ProportionModel(estimator, features, counts, mean, scale)
    Z = model.transform(X)
    report: dict[str, Any] = {"rows": len(X), "observations": float(C.sum())}
    if not hidden:
        estimator.fit(Z, C)
        if len(counts) == 2:  # as R's glm(cbind(first, second) ~ ...): log-odds of the first column
            report["coefficients"] = {
                f"log-odds of {counts[0]} (vs {counts[1]})": dict(
                    zip(
                        ["intercept", *features],
                        [-float(estimator.intercept_[0]), *(-estimator.coef_[0]).tolist()],
                        strict=True,
                    )
                )
            }
        else:  # one row per class, centred over the classes
            report["coefficients"] = {
                f"class {name}": dict(
                    zip(["intercept", *features], [float(b), *w.tolist()], strict=True)
                )
                for name, w, b in zip(counts, estimator.coef_, estimator.intercept_, strict=True)
            }
        return model, report
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    n_test = max(1, round(holdout * len(X)))
    test, train = order[:n_test], order[n_test:]
    estimator.fit(Z[train], C[train])
    log_p = estimator.predict_log_proba(Z[test])
    observed = C[test]
    report["held_out_rows"] = int(n_test)
    report["held_out_log_loss"] = float(-(observed * log_p).sum() / observed.sum())
    report["held_out_accuracy"] = float(
        (observed[np.arange(len(test)), log_p.argmax(1)]).sum() / observed.sum()
    )
    return model, report


def predict_file(directory: str | Path, path: str | Path) -> tuple[list[str], np.ndarray]:
    """Class probabilities for every row of a CSV holding the model's feature columns."""
    model = ProportionModel.load(directory)
    X = read_columns(path, model.features)
    return model.classes, model.estimator.predict_proba(model.transform(X))
