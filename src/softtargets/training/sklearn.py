"""``SoftLabelClassifier``: a scikit-learn classifier that fits labels, probabilities or counts.

Rows that aggregate many observations ("this district: 412 pupils above the median, 188 below")
have a proportion as their label and their count as their weight. ``fit(X, Y)`` takes

* ``Y`` of shape ``(n,)``: ordinary class labels;
* ``Y`` of shape ``(n, K)`` whose rows sum to 1: class probabilities (soft labels);
* ``Y`` of shape ``(n, K)`` of non-negative integers: counts, turned into proportions with the row
  totals as weights (times any ``sample_weight``).

With no hidden layers it is multinomial logistic regression on proportions, fitted in float64 by
L-BFGS to a tight tolerance: for two classes, the maximum-likelihood fit of R's
``glm(cbind(yes, no) ~ x, family = binomial)`` and of statsmodels' ``GLM(family=Binomial())``;
for more, that of a multinomial logit on the expanded observations. With hidden layers it is a
small ReLU network trained on the same weighted soft cross-entropy.

The objective is ``(sum_i w_i * H(p_i, softmax(f(x_i))) + alpha / 2 * ||W||^2) / sum_i w_i``,
the convention of scikit-learn's ``MLPClassifier`` (biases are not penalised; ``alpha = 0`` means
no penalty).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from softtargets.data.counts import soft_label_targets
from softtargets.errors import SoftTargetsError
from softtargets.losses.reference import soft_cross_entropy, soft_cross_entropy_and_grad
from softtargets.training.models import mlp


class SoftLabelClassifier(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression (or a small network) on labels, proportions or counts.

    Parameters:
        hidden_layer_sizes: widths of hidden ReLU layers; ``()`` for the linear model.
        alpha: L2 penalty on the weights (not the biases); 0 means none.
        max_iter: L-BFGS iterations.
        tol: gradient tolerance of L-BFGS.
        solver: ``"lbfgs"`` (the only one; full-batch, float64).
        random_state: seeds the initial weights of a network.

    Attributes (after ``fit``): ``classes_``, ``n_features_in_``, ``n_iter_``, ``coef_`` and
    ``intercept_`` (linear model; one row per class, centred over classes, or one row ``w_1 - w_0``
    for two classes as scikit-learn's ``LogisticRegression``), ``network_`` (a torch module).
    """

    def __init__(
        self,
        hidden_layer_sizes: tuple[int, ...] = (),
        alpha: float = 1e-4,
        max_iter: int = 1000,
        tol: float = 1e-8,
        solver: str = "lbfgs",
        random_state: int | None = None,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.random_state = random_state

    # ------------------------------------------------------------------ fitting
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> SoftLabelClassifier:
        """Fit on labels ``(n,)``, probabilities ``(n, K)`` or counts ``(n, K)``; returns ``self``."""
        Y = y
        if self.solver != "lbfgs":
            raise ValueError(f"solver must be 'lbfgs', got {self.solver!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if Y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None"
            )
        Y_arr = np.asarray(Y)
        # our checks first: they name the bad row, where scikit-learn's only say "y contains NaN"
        targets, weights, labels = soft_label_targets(Y_arr, sample_weight)
        multi = labels is None
        X, _ = validate_data(
            self,
            X,
            targets if multi else labels,
            multi_output=multi,
            dtype=np.float64,
            y_numeric=multi,
        )
        if labels is not None:
            check_classification_targets(labels)
            self.classes_, encoded = np.unique(labels, return_inverse=True)
            targets = np.eye(len(self.classes_))[encoded]
        else:
            self.classes_ = np.arange(targets.shape[1])
        if weights.sum() <= 0:
            raise SoftTargetsError(
                "all sample weights are zero (counts x sample_weight); nothing to fit"
            )
        if len(self.classes_) == 1:
            self._single_class = True
            self.n_iter_ = 0
            return self
        self._single_class = False
        if len(self.hidden_layer_sizes) == 0:
            self._fit_linear(X, targets, weights)
        else:
            self._fit_network(X, targets, weights)
        return self

    def _fit_linear(self, X: np.ndarray, P: np.ndarray, w: np.ndarray) -> None:
        n, d = X.shape
        k = P.shape[1]
        total = w.sum()

        targets, weights = torch.from_numpy(P), torch.from_numpy(w)

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            W, b = theta[: d * k].reshape(d, k), theta[d * k :]
            value, dz = soft_cross_entropy_and_grad(torch.from_numpy(X @ W + b), targets, weights)
            R = dz.numpy()  # d loss / d Z
            loss = float(value) + 0.5 * self.alpha * (W**2).sum()
            grad = np.concatenate([(X.T @ R + self.alpha * W).ravel(), R.sum(0)])
            return loss / total, grad / total

        result = minimize(
            objective,
            np.zeros(d * k + k),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": 1e-15, "maxcor": 30},
        )
        if not result.success and result.nit >= self.max_iter:
            warnings.warn(
                f"L-BFGS did not converge in {self.max_iter} iterations; raise max_iter",
                ConvergenceWarning,
                stacklevel=3,
            )
        W, b = result.x[: d * k].reshape(d, k), result.x[d * k :]
        # softmax is unchanged by a shift shared by all classes: report the centred solution
        W, b = W - W.mean(1, keepdims=True), b - b.mean()
        self.n_iter_ = int(result.nit)
        self._W, self._b = W, b
        if k == 2:
            self.coef_, self.intercept_ = (W[:, 1] - W[:, 0])[None, :], np.array([b[1] - b[0]])
        else:
            self.coef_, self.intercept_ = W.T.copy(), b.copy()
        self.network_ = None

    def _fit_network(self, X: np.ndarray, P: np.ndarray, w: np.ndarray) -> None:

        seed = self.random_state if isinstance(self.random_state, int) else np.random.randint(2**31)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = mlp(X.shape[1], list(self.hidden_layer_sizes), P.shape[1]).double()
        x, p, weights = (torch.from_numpy(np.array(a)) for a in (X, P, w))
        total = weights.sum()
        weight_params = [m.weight for m in net if isinstance(m, torch.nn.Linear)]
        optimizer = torch.optim.LBFGS(
            net.parameters(),
            max_iter=self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=1e-14,
            history_size=30,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = soft_cross_entropy(net(x), p, weights, reduction="sum", check=False)
            loss = (loss + 0.5 * self.alpha * sum((m**2).sum() for m in weight_params)) / total
            loss.backward()
            return loss

        optimizer.step(closure)
        self.n_iter_ = int(optimizer.state[optimizer._params[0]]["n_iter"])
        if self.n_iter_ >= self.max_iter:
            warnings.warn(
                f"L-BFGS did not converge in {self.max_iter} iterations; raise max_iter",
                ConvergenceWarning,
                stacklevel=3,
            )
        self.network_ = net.eval()

    # ------------------------------------------------------------------ prediction
    def _log_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "classes_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        if self._single_class:
            return np.zeros((len(X), 1))
        if self.network_ is None:
            Z = X @ self._W + self._b
        else:
            with torch.no_grad():
                Z = self.network_(torch.from_numpy(X)).numpy()
        Z = Z - Z.max(1, keepdims=True)
        return Z - np.log(np.exp(Z).sum(1, keepdims=True))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n, K)``, columns in the order of ``classes_``."""
        return np.exp(self._log_proba(X))

    def predict_log_proba(self, X: Any) -> np.ndarray:
        return self._log_proba(X)

    def decision_function(self, X: Any) -> np.ndarray:
        log_p = self._log_proba(X)
        return log_p[:, 1] - log_p[:, 0] if log_p.shape[1] == 2 else log_p

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        log_p = self._log_proba(X)  # checks that the model is fitted
        return self.classes_[np.argmax(log_p, axis=1)]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy; for a probability or count matrix ``y``, against each row's most likely class
        (weighted by the counts)."""
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] > 1:
            targets, weights, _ = soft_label_targets(y, sample_weight)
            hit = self.predict(X) == self.classes_[targets.argmax(1)]
            return float((weights * hit).sum() / weights.sum())
        return super().score(X, y, sample_weight)

    def __sklearn_tags__(self):  # noqa: ANN204 - sklearn.utils.Tags
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        tags.target_tags.single_output = True
        return tags


def expected_failed_checks(estimator: SoftLabelClassifier) -> dict[str, str]:
    """scikit-learn common checks that cannot apply, with the reason (pass this dict as
    ``expected_failed_checks`` to ``check_estimator`` or ``parametrize_with_checks``)."""
    if len(estimator.hidden_layer_sizes) == 0:
        return {}  # the linear model passes every check
    return {
        "check_sample_weight_equivalence_on_dense_data": (
            "a hidden-layer network is fitted by a non-convex optimisation: weighting rows and "
            "repeating them give the same objective but L-BFGS follows a different path to a "
            "different local optimum, so predictions agree only approximately"
        ),
    }
