"""SoftLabelClassifier: scikit-learn's checks, statsmodels' fits, equivalent inputs, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from softtargets.data.counts import aggregate, expand
from softtargets.errors import SoftTargetsError
from softtargets.training.sklearn import SoftLabelClassifier, expected_failed_checks

sm = pytest.importorskip("statsmodels.api")


@parametrize_with_checks(
    [
        SoftLabelClassifier(),
        SoftLabelClassifier(hidden_layer_sizes=(8,), random_state=0, max_iter=200),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_scikit_learn_conventions(estimator, check) -> None:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


@pytest.fixture(scope="module")
def star98():
    data = sm.datasets.star98.load_pandas()
    X = data.exog.to_numpy()
    X = (X - X.mean(0)) / X.std(0)
    return X, data.endog[["NABOVE", "NBELOW"]].to_numpy()


def test_binary_counts_match_statsmodels_glm_binomial(star98) -> None:
    X, counts = star98
    glm = sm.GLM(counts, sm.add_constant(X), family=sm.families.Binomial()).fit(tol=1e-12)
    ours = SoftLabelClassifier(alpha=0).fit(X, counts)
    np.testing.assert_allclose(
        ours.predict_proba(X)[:, 0], glm.predict(sm.add_constant(X)), atol=1e-4
    )
    # coef_ is log-odds of the second column, as LogisticRegression's: minus the GLM's
    np.testing.assert_allclose(-ours.coef_[0], glm.params[1:], atol=1e-4)
    np.testing.assert_allclose(-ours.intercept_, glm.params[:1], atol=1e-4)


def three_class_groups(seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(40, 2))
    logits = features @ np.array([[1.0, -0.5, 0.0], [0.3, 0.8, 0.0]]) + np.array([0.2, -0.1, 0])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    counts = np.stack([rng.multinomial(rng.integers(5, 40), p) for p in probs])
    return features, counts


def test_three_classes_match_mnlogit_on_expanded_observations() -> None:
    features, counts = three_class_groups()
    X_obs, y_obs = expand(features, counts)
    mn = sm.MNLogit(y_obs, sm.add_constant(X_obs)).fit(
        method="newton", tol=1e-12, disp=False, maxiter=100
    )
    ours = SoftLabelClassifier(alpha=0).fit(features, counts)
    np.testing.assert_allclose(
        ours.predict_proba(features), mn.predict(sm.add_constant(features)), atol=1e-4
    )


def test_counts_proportions_with_weights_and_expanded_rows_give_one_model() -> None:
    features, counts = three_class_groups(1)
    totals = counts.sum(1)
    by_counts = SoftLabelClassifier(alpha=0.1).fit(features, counts)
    by_props = SoftLabelClassifier(alpha=0.1).fit(
        features, counts / totals[:, None], sample_weight=totals
    )
    X_obs, y_obs = expand(features, counts)
    by_rows = SoftLabelClassifier(alpha=0.1).fit(X_obs, y_obs)
    for other in (by_props, by_rows):
        np.testing.assert_allclose(
            other.predict_proba(features), by_counts.predict_proba(features), atol=1e-6
        )
    # sample_weight multiplies the counts: twice the data weighs the same penalty half as much
    doubled = SoftLabelClassifier(alpha=0.1).fit(features, counts, sample_weight=np.full(40, 2.0))
    halved_penalty = SoftLabelClassifier(alpha=0.05).fit(features, counts)
    np.testing.assert_allclose(
        doubled.predict_proba(features), halved_penalty.predict_proba(features), atol=1e-6
    )


def test_hidden_layers_learn_a_nonlinear_proportion() -> None:
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, size=(300, 2))
    p = 1 / (1 + np.exp(-3 * (X[:, 0] ** 2 + X[:, 1] ** 2 - 2)))  # a ring: not linear in X
    counts = np.stack([rng.binomial(50, p), np.zeros(300, int)], 1)
    counts[:, 1] = 50 - counts[:, 0]
    linear = SoftLabelClassifier(alpha=0).fit(X, counts)
    network = SoftLabelClassifier(hidden_layer_sizes=(16,), alpha=1e-3, random_state=0).fit(
        X, counts
    )
    err_linear = np.abs(linear.predict_proba(X)[:, 0] - p).mean()
    err_network = np.abs(network.predict_proba(X)[:, 0] - p).mean()
    assert err_network < 0.5 * err_linear and err_network < 0.08
    assert network.n_iter_ > 0 and network.score(X, counts) > 0.8


@pytest.mark.parametrize(
    ("Y", "message"),
    [
        ([[1, 2], [-1, 3]], "row 1, column 0 is negative"),
        ([[1, 2], [0, 0]], "row 1 has no observations"),
        ([[1, 2], [np.nan, 3]], "row 1, column 0 is NaN"),
        ([[0.5, 0.5], [0.3, 0.3]], "row 1 sums to 0.6"),
    ],
)
def test_bad_targets_name_the_row(Y, message: str) -> None:
    with pytest.raises(SoftTargetsError, match=message) as info:
        SoftLabelClassifier().fit(np.zeros((2, 1)), np.array(Y, dtype=float))
    assert "\n" not in str(info.value)


def test_mismatched_shapes_and_weights() -> None:
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        SoftLabelClassifier().fit(np.zeros((3, 1)), np.array([[1, 2], [3, 4]]))
    with pytest.raises(SoftTargetsError, match="sample_weight has 2 values for 3 rows"):
        SoftLabelClassifier().fit(np.zeros((3, 1)), [0, 1, 0], sample_weight=[1, 2])


def test_aggregate_and_expand_round_trip() -> None:
    frame = {
        "school": [1, 1, 2, 2, 2, 3],
        "size": [10, 10, 20, 20, 20, 30],
        "passed": ["yes", "no", "yes", "yes", "no", "no"],
    }
    agg = aggregate(frame, by=["school", "size"], label="passed")
    assert agg.classes.tolist() == ["no", "yes"]
    assert agg.counts.tolist() == [[1, 1], [1, 2], [1, 0]]
    X, y = expand(agg.features, agg.counts)
    again = aggregate(
        {"school": X[:, 0], "size": X[:, 1], "passed": agg.classes[y]},
        by=["school", "size"],
        label="passed",
    )
    assert np.array_equal(again.counts, agg.counts)
    with pytest.raises(SoftTargetsError, match="no column named 'grade'"):
        aggregate(frame, by=["grade"], label="passed")
    with pytest.raises(SoftTargetsError, match="row 0 holds a negative"):
        expand(np.zeros((1, 1)), np.array([[-1, 2]]))


def test_fit_proportions_and_predict_commands(tmp_path, star98) -> None:
    from typer.testing import CliRunner

    from softtargets.cli.app import app

    X, counts = star98
    lines = ["a,b,yes,no"] + [
        f"{x[0]},{x[1]},{c[0]:.0f},{c[1]:.0f}" for x, c in zip(X, counts, strict=True)
    ]
    (tmp_path / "groups.csv").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "fit-proportions",
            str(tmp_path / "groups.csv"),
            "--features",
            "a,b",
            "--counts",
            "yes,no",
            "--out",
            str(tmp_path / "model"),
        ],
    )
    assert result.exit_code == 0, result.output
    glm = sm.GLM(counts, sm.add_constant(X[:, :2]), family=sm.families.Binomial()).fit()
    # a and b are already standardised, so the printed log-odds of "yes" are the GLM's
    printed = {
        line.split("│")[1].strip(): float(line.split("│")[2])
        for line in result.output.splitlines()
        if line.count("│") == 3
    }
    assert printed["a"] == pytest.approx(glm.params[1], abs=1e-4)
    assert printed["intercept"] == pytest.approx(glm.params[0], abs=1e-4)
    assert "log-odds of yes (vs no)" in result.output
    result = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "model"),
            str(tmp_path / "groups.csv"),
            "--out",
            str(tmp_path / "p.csv"),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "row,yes,no" and len(rows) == len(X) + 1
    first = [float(v) for v in rows[1].split(",")[1:]]
    assert first[0] == pytest.approx(glm.predict(np.array([[1.0, X[0, 0], X[0, 1]]]))[0], abs=1e-4)
    result = runner.invoke(
        app,
        [
            "fit-proportions",
            str(tmp_path / "groups.csv"),
            "--features",
            "a,z",
            "--counts",
            "yes,no",
            "--out",
            str(tmp_path / "m2"),
        ],
    )
    assert (
        result.exit_code == 2 and "no column named 'z'; columns are a, b, yes, no" in result.output
    )
    result = runner.invoke(
        app,
        [
            "fit-proportions",
            str(tmp_path / "groups.csv"),
            "--features",
            "a,b",
            "--counts",
            "yes,no",
            "--hidden",
            "8",
            "--out",
            str(tmp_path / "m3"),
        ],
    )
    assert result.exit_code == 0 and "held out" in result.output, result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "m3"), str(tmp_path / "groups.csv")])
    assert result.exit_code == 0 and result.output.startswith("row,yes,no")
