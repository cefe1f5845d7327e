"""Every study in --quick mode, the verdict logic, and the gathered report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.config import StudyConfig
from softtargets.run.stats import (
    ABSENT,
    CONTRADICTED,
    INCONCLUSIVE,
    LABELS,
    PRESENT,
    REPRODUCED,
    WEAKER,
    Reported,
    equivalence_p,
    judge,
    mean_ci,
)
from softtargets.studies import STUDIES
from softtargets.studies.base import run_study
from softtargets.studies.gradient_variance import gradient_statistics
from softtargets.studies.learning_rate import collapse_rate
from softtargets.studies.similarity import specificity

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_runs_quick_and_writes_its_files(runs, name: str) -> None:
    out = runs / f"study-{name}"
    result = run_study(
        name, StudyConfig(quick=True), out, command=f"softtargets study {name} --quick"
    )
    for file in ("results.csv", "results.json", "config.yaml", "section.md"):
        assert (out / file).stat().st_size > 0, file
    assert result["figures"] and all((out / f).stat().st_size > 1000 for f in result["figures"])
    assert result["verdict"]["label"] in LABELS
    saved = json.loads((out / "results.json").read_text())
    # declared by every study, with the unit its verdict is written in
    assert set(saved["reported"]) == {"size", "smallest", "source", "scale", "unit"}
    assert saved["seeds"] == [0, 1] and saved["command"].endswith("--quick")
    assert saved["rows"] and "seconds" in saved
    assert f"**Verdict: {result['verdict']['label']}**" in (out / "section.md").read_text()


@pytest.mark.parametrize("name", ["similarity", "data-fraction", "omit-class"])
def test_a_study_runs_on_a_users_own_files(tmp_path, name: str) -> None:
    """``--data FILE --test-data FILE``: the study's teacher and students use the user's rows,
    the test file only for reporting."""
    import numpy as np

    rng = np.random.default_rng(0)

    def write(path, rows: int) -> None:
        x = rng.normal(size=(rows, 6)).astype(np.float32)
        y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)  # 4 classes
        np.savez(path, x=x, y=y)

    write(tmp_path / "mine.npz", 400)
    write(tmp_path / "mine_test.npz", 120)
    out = tmp_path / "runs" / f"study-{name}"
    result = runner.invoke(app, ["study", name, "--quick", "--data", str(tmp_path / "mine.npz"),
                                 "--test-data", str(tmp_path / "mine_test.npz"), "--out",
                                 str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["data"].endswith("mine.npz")
    assert payload["config"]["test_data"].endswith("mine_test.npz")
    # the study's teacher was trained on the user's file, tested on every row of the test file
    assert list((tmp_path / "runs" / "teachers").glob("*mine.npz*/teacher.safetensors"))
    assert "360 train / 40 validation / 120 test rows" in result.output


def test_a_study_on_a_task_of_its_own_refuses_a_users_data(tmp_path) -> None:
    result = runner.invoke(app, ["study", "width", "--quick", "--data", "digits", "--out",
                                 str(tmp_path / "study-width")])  # fmt: skip
    assert result.exit_code == 2 and "takes no --data; leave it out" in result.output
    assert not (tmp_path / "study-width").exists()


def test_width_slope_reads_how_fast_the_neurons_needed_grow() -> None:
    from softtargets.studies.width import slope

    gammas = [0.4, 0.2, 0.1]
    assert slope(gammas, [2.0, 8.0, 32.0], 512) == pytest.approx(2.0)  # m* ~ (1/gamma)^2
    assert slope(gammas, [4.0, 4.0, 4.0], 512) == pytest.approx(0.0)
    # a width beyond the widest counts as twice the widest: (log 1024 - log 4) / log 4 = 4
    assert slope([0.4, 0.1], [4.0, math.inf], 512) == pytest.approx(4.0)


def test_report_gathers_every_study(runs) -> None:
    for name in ("similarity", "smoothing-vs-teacher"):
        if not (runs / f"study-{name}" / "results.json").exists():
            run_study(name, StudyConfig(quick=True), runs / f"study-{name}")
    result = runner.invoke(app, ["report", "--runs", str(runs)])
    assert result.exit_code == 0, result.output
    markdown = (runs / "report.md").read_text()
    html = (runs / "report.html").read_text()
    assert "| study | claim | paper's size | verdict (95%) | evidence |" in markdown
    assert "(quick run)" in markdown
    studies = len(list(runs.glob("study-*/results.json")))
    assert f"**Reading {studies} verdicts together.**" in markdown  # the multiple-testing note
    assert html.count("data:image/png;base64,") >= 2 and "<table>" in html
    assert 'src="data:image/png;base64,"' not in html  # every figure found and embedded


def test_report_without_studies_is_a_clear_error(tmp_path) -> None:
    result = runner.invoke(app, ["report", "--runs", str(tmp_path)])
    assert result.exit_code == 2 and "no studies found" in result.output


def test_study_command_rejects_unknown_names(tmp_path) -> None:
    result = runner.invoke(app, ["study", "colour", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown study 'colour'" in result.output


# ---------------------------------------------------------------- verdict logic on synthetic data
SIGN_ONLY = Reported(None, 0.01, "no size")
PAPER = Reported(0.05, 0.01, "a paper")


def test_a_clear_effect_is_present_without_a_paper_size_and_judged_against_one() -> None:
    effect = mean_ci([0.05, 0.06, 0.055, 0.052, 0.058])  # 95% CI about 0.049 to 0.061
    assert judge("c", effect, SIGN_ONLY, "d").label == PRESENT
    assert judge("c", effect, PAPER, "d").label == REPRODUCED  # includes 0.05
    assert judge("c", effect, Reported(0.03, 0.01, "p"), "d").label == REPRODUCED  # above it
    weaker = judge("c", effect, Reported(0.10, 0.01, "p"), "d", 100, " points")
    assert weaker.label == WEAKER and "paper +10.00 points" in weaker.evidence


def test_an_effect_below_zero_is_contradicted() -> None:
    effect = mean_ci([-0.05, -0.06, -0.055, -0.052])
    assert judge("c", effect, PAPER, "d").label == CONTRADICTED


def test_a_precise_effect_near_zero_is_absent_and_a_vague_one_inconclusive() -> None:
    precise = mean_ci([0.001, -0.002, 0.0015, 0.0, -0.001, 0.0005])
    assert judge("c", precise, PAPER, "d").label == ABSENT
    vague = mean_ci([0.05, -0.04, 0.02, -0.01, 0.03])
    v = judge("c", vague, PAPER, "soft - hard", 100, " points")
    assert v.label == INCONCLUSIVE and "95% CI" in v.evidence and "points" in v.evidence
    assert judge("c", mean_ci([0.5]), PAPER, "d").label == INCONCLUSIVE  # one run


def test_the_equivalence_test_agrees_with_statsmodels() -> None:
    import numpy as np
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.normal(0.7, 0.02, size=8)
        b = a - rng.normal(rng.uniform(-0.02, 0.02), 0.01, size=8)
        margin = rng.uniform(0.002, 0.03)
        expected = ttost_paired(a, b, -margin, margin)[0]
        assert equivalence_p(mean_ci(a - b), margin) == pytest.approx(expected, rel=1e-6)


def test_a_claim_of_two_parts_takes_the_weaker_verdict() -> None:
    from softtargets.run.stats import all_of

    yes = judge("c", mean_ci([0.05, 0.06, 0.055]), SIGN_ONLY, "a")
    no = judge("c", mean_ci([-0.05, -0.06, -0.055]), SIGN_ONLY, "b")
    maybe = judge("c", mean_ci([0.05, -0.04, 0.02]), SIGN_ONLY, "d")
    assert all_of("c", [yes, yes]).label == PRESENT
    assert all_of("c", [yes, maybe]).label == INCONCLUSIVE
    assert all_of("c", [maybe, no]).label == CONTRADICTED
    assert "a = " in all_of("c", [yes, no]).evidence and "b = " in all_of("c", [yes, no]).evidence


def test_sign_test_for_grid_outcomes() -> None:
    from softtargets.run.stats import sign_test

    # every seed on the same grid point: a t-interval would have zero width; the sign test
    # needs enough seeds
    assert sign_test("c", [0.3] * 5, "d").label == INCONCLUSIVE  # 5 of 5: p = 0.0625
    assert sign_test("c", [0.3] * 9 + [0.0], "d").label == PRESENT  # ties dropped: p = 0.004
    assert sign_test("c", [-0.3] * 9 + [0.3], "d").label == CONTRADICTED
    assert "p = 0.0215" in sign_test("c", [0.3] * 9 + [-0.3], "d").evidence


def test_methods_study_chooses_each_temperature_on_validation_only() -> None:
    from softtargets.studies.methods import select_temperatures

    rows = [
        {"task": "a", "targets": "KD", "T": t, "seed": s, "val_accuracy": v, "test_accuracy": w}
        for t, s, v, w in [
            (1.0, 0, 0.70, 0.99), (1.0, 1, 0.72, 0.99),  # best on test, worse on validation
            (4.0, 0, 0.80, 0.10), (4.0, 1, 0.78, 0.10),
            (2.0, 0, 0.79, 0.50), (2.0, 1, 0.79, 0.50),  # the same mean: the lower T wins
        ]
    ]  # fmt: skip
    assert select_temperatures(rows) == {("a", "KD"): 2.0}
    rows[2]["val_accuracy"] = 0.81
    assert select_temperatures(rows) == {("a", "KD"): 4.0}


def test_the_collapse_rate_is_log_interpolated_above_the_best_rate() -> None:
    # best 0.85 at 0.1; the floor 0.84 is crossed between 1.0 (0.845) and 10 (0.545): a 60th of
    # the way in accuracy, so a 60th of the decade in log rate
    points = {0.01: 0.80, 0.1: 0.85, 1.0: 0.845, 10.0: 0.545}
    assert collapse_rate(points) == pytest.approx(10 ** (1 / 60))
    # a fall below the best rate does not count; a curve that never falls is censored at its end
    assert collapse_rate({0.01: 0.50, 0.1: 0.85, 1.0: 0.845}) == 1.0
    assert collapse_rate({0.1: 0.85, 1.0: 0.80}) == pytest.approx(0.1 * 10 ** (1 / 5))


def test_row_matched_smoothing_keeps_each_rows_label_probability() -> None:
    import torch

    from softtargets.data.targets import row_matched_smoothing

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]])
    labels = torch.tensor([0, 2, 1])
    out = row_matched_smoothing(probs, labels)
    want = torch.tensor([[0.7, 0.15, 0.15], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(out, want)  # the last row: 0.25 < 1/3, raised to uniform


def test_label_smoothing_of_a_teacher_changes_its_key_only_when_set() -> None:
    from softtargets.run.teacher import config_key

    plain = demo_config_for_keys()
    before = config_key(plain, teacher_only=True)
    plain.teacher_training.label_smoothing = 0.0
    assert config_key(plain, teacher_only=True) == before
    plain.teacher_training.label_smoothing = 0.1
    assert config_key(plain, teacher_only=True) != before


def demo_config_for_keys():
    from softtargets.config import demo_config

    return demo_config(quick=True)


def test_shuffling_the_off_target_mass_keeps_label_probability_and_entropy() -> None:
    import torch

    from softtargets.data.targets import entropy, shuffle_off_target

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 6, generator=g) * 2, 1)
    labels = torch.randint(0, 6, (50,), generator=g)
    shuffled = shuffle_off_target(probs, labels, seed=1)
    rows = torch.arange(50)
    assert torch.equal(shuffled[rows, labels], probs[rows, labels])
    torch.testing.assert_close(entropy(shuffled), entropy(probs))
    torch.testing.assert_close(shuffled.sum(1), probs.sum(1))
    assert (shuffled != probs).any(1).float().mean() > 0.9  # the structure moved
    assert torch.equal(shuffle_off_target(probs, labels, seed=1), shuffled)  # seeded


def test_specificity_is_zero_for_a_shared_pattern_and_positive_for_class_patterns() -> None:
    import torch

    labels = torch.arange(40) % 4
    shared = torch.tensor([0.4, 0.3, 0.2, 0.1]).expand(40, 4)
    pattern = shared[:4]
    assert specificity(shared, labels, pattern).abs().max() < 1e-6
    own = torch.softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 3, 1)
    probs = own[labels]
    assert specificity(probs, labels, own).mean() > 0.3


def test_gradient_statistics_against_a_direct_computation() -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(10, 3)
    y = torch.randint(0, 2, (10,))
    stats = gradient_statistics(
        model, x, lambda z, t: torch.nn.functional.cross_entropy(z, t[None]), y, batches=5
    )
    grads = []
    for i in range(10):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    g = torch.stack(grads)
    assert stats["variance_between_cases"] == pytest.approx(
        float(((g - g.mean(0)) ** 2).sum(1).mean())
    )
    assert stats["mean_gradient_sq_norm"] == pytest.approx(float((g.mean(0) ** 2).sum()))


def test_teachers_are_the_unit_of_the_verdict() -> None:
    from softtargets.run.stats import all_of, over_teachers, sign_test

    # three teachers, each with a tight interval over its seeds, but far apart from each other:
    # over teachers the interval is wide, as the teacher-to-teacher spread says
    per_teacher = [
        judge("c", mean_ci([m + d for d in (-0.001, 0.0, 0.001)]), PAPER, "d")
        for m in (0.01, 0.06, 0.11)
    ]
    assert all(v.label != INCONCLUSIVE for v in per_teacher)
    pooled = over_teachers(per_teacher)
    expected = mean_ci([0.01, 0.06, 0.11])
    assert pooled.effect is not None and pooled.effect.n == 3
    assert pooled.effect.mean == pytest.approx(expected.mean)
    assert pooled.effect.half_width == pytest.approx(expected.half_width)
    assert pooled.label == INCONCLUSIVE and "over 3 teachers" in pooled.evidence
    # a claim of two parts is judged part by part; a sign test pools the teachers' seeds
    two = [all_of("c", [v, v]) for v in per_teacher]
    assert [p.effect.n for p in over_teachers(two).parts] == [3, 3]
    signs = [sign_test("c", [0.3] * 4, "d") for _ in range(3)]  # 4 seeds each: p = 0.125
    assert all(v.label == INCONCLUSIVE for v in signs)
    assert over_teachers(signs).label == PRESENT  # 12 of 12 pooled: p < 0.001


def test_every_teacher_of_a_pass_is_trained_on_that_pass_s_split(tmp_path) -> None:
    """A study's own teacher variants (a smoothed or a self-distillation teacher) go through
    distill_config too, so none of them is trained on rows that are another pass's test rows."""
    from softtargets.run.folder import RunFolder
    from softtargets.studies.base import TEACHER_SEED_STEP, StudyContext

    with RunFolder.open(tmp_path / "study") as folder:
        for replicate in (0, 1, 2):
            ctx = StudyContext("x", StudyConfig(quick=True), folder, replicate=replicate,
                               replicates=3)  # fmt: skip
            variant = ctx.distill_config(label_noise=0.3)
            assert variant.data.split_seed == replicate
            assert variant.first_seed == TEACHER_SEED_STEP * replicate
            assert ctx.path("figure.png").name == (
                "figure.png" if replicate == 0 else f"figure-teacher{replicate}.png"
            )


def test_a_users_teacher_stands_in_for_the_preset_on_the_default_data_too(tmp_path) -> None:
    from softtargets.config import ModelConfig
    from softtargets.run.folder import RunFolder
    from softtargets.studies.base import StudyContext

    yours = ModelConfig(name="mlp", options={"hidden": [7]})
    with RunFolder.open(tmp_path / "study") as folder:
        ctx = StudyContext("x", StudyConfig(quick=True, teacher=yours), folder)
        assert ctx.distill_config().teacher == yours  # mnist1d, the default
        assert ctx.distill_config(label_noise=0.3).teacher != yours  # a variant: the study's own
        assert ctx.distill_config(options={"num_samples": 99}).teacher != yours


def test_lighter_student_recovered_share_is_hintons_statistic_per_teacher() -> None:
    from softtargets.studies.lighter_student import recovered_share

    def row(kind, method, seed, accuracy, teacher):
        return {"teacher": kind, "share": 0.5, "method": method, "seed": seed,
                "test_accuracy": accuracy, "teacher_accuracy": teacher}  # fmt: skip

    rows = [
        row("preset", "hard", 0, 0.60, 0.90), row("preset", "soft", 0, 0.84, 0.90),
        row("mlp", "hard", 0, 0.60, 0.70), row("mlp", "soft", 0, 0.65, 0.70),
        row("mlp", "hard", 1, 0.70, 0.70), row("mlp", "soft", 1, 0.72, 0.70),
    ]  # fmt: skip
    assert recovered_share(rows, "preset", 0.5, [0]) == pytest.approx([0.8])  # (84-60)/(90-60)
    # each teacher's own accuracy is its gap's end; no gap at all counts as 0
    assert recovered_share(rows, "mlp", 0.5, [0, 1]) == pytest.approx([0.5, 0.0])


def test_results_and_the_report_quote_the_protocol_version(runs) -> None:
    from softtargets.run.stats import protocol_line
    from softtargets.studies import PROTOCOL_VERSION

    out = runs / "study-generalisation"
    if not (out / "results.json").exists():
        run_study("generalisation", StudyConfig(quick=True), out)
    assert json.loads((out / "results.json").read_text())["protocol"] == PROTOCOL_VERSION
    assert f"protocol version {PROTOCOL_VERSION}" in (out / "section.md").read_text()
    assert protocol_line([{"protocol": 5}, {}]) == (
        "Protocol versions of these runs: 5, not recorded (before version 5) "
        "(`softtargets/studies/PROTOCOLS.md`)."
    )
    # the protocol file names the version the code records
    protocols = (Path(__file__).parents[2] / "src/softtargets/studies/PROTOCOLS.md").read_text()
    assert f"**Version {PROTOCOL_VERSION}, " in protocols
