"""`jaxou experiment`: the digits study at its quick size, run once in-process through
`jaxou._cli.main` (module-scoped), then its report checked field by field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

import jaxou
from jaxou._cli import main
from jaxou.experiments import EXPERIMENTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("covariances.png", "gap_vs_lr_over_b.png", "bound_vs_gap.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "out"
    code = main(["experiment", "digits", "--quick", "--quiet", "--out", str(out)])
    return code, out


def _numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    else:
        yield path, x


@pytest.mark.slow
def test_quick_run_writes_report_and_figures(quick_run):
    code, out = quick_run
    assert code == 0
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    text = (out / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert report["experiment"] == "digits"


@pytest.mark.slow
def test_report_fields_present_and_finite(quick_run):
    _, out = quick_run
    r = json.loads((out / "report.json").read_text())
    grid = r["finetune_grid"]
    n_t, delta = r["data"]["n_target_train"], r["settings"]["delta"]
    assert len(grid) >= 3 and sum(q["large_lr"] for q in grid) == 1
    for q in grid:
        for field in (
            "lr_over_b",
            "gap_sgd",
            "gap_sgd_se",
            "bound_kl",
            "bound_mcallester",
            "test_risk_q",
            "test_risk_sgd",
            "kl_posterior_prior",
            "hessian_rel_change_at_samples",
        ):
            assert math.isfinite(q[field]), field
        for field in ("cov_rel_frobenius", "kl_empirical_predicted", "mean_offset_se_max"):
            assert math.isfinite(q["ou_prediction"][field]), field
        assert 0 <= q["test_risk_q"] <= 1 and 0 <= q["train_risk_q"] <= 1
        # Each derived number is what the reported inputs imply.
        assert q["lr_over_b"] == pytest.approx(q["lr"] / q["batch_size"], rel=1e-12)
        # (risks are float32 means over the seeds: rounding up to seeds × 2⁻²⁴)
        rounding = r["settings"]["seeds"] * 2.0**-24
        assert q["gap_sgd"] == pytest.approx(q["test_risk_sgd"] - q["train_risk_sgd"], abs=rounding)
        assert q["t_finetune"] == pytest.approx(q["lr"] * q["steps"], rel=1e-12)
        expected = jaxou.pac_bayes_bound(
            q["kl_posterior_prior"], n_t, delta, empirical_risk=q["train_risk_q"], kind="kl"
        )
        assert q["bound_kl"] == pytest.approx(float(expected), rel=1e-9)
        assert q["bound_holds_q"] == (q["test_risk_q"] <= q["bound_kl"])
    s = r["finetune_summary"]
    x, gap, bound = ([q[f] for q in grid] for f in ("lr_over_b", "gap_sgd", "bound_kl"))
    assert s["spearman_lr_over_b_vs_gap"]["rho"] == pytest.approx(spearmanr(x, gap).statistic)
    assert s["spearman_bound_vs_gap"]["rho"] == pytest.approx(spearmanr(bound, gap).statistic)
    assert math.isfinite(r["pretrain"]["ou_prediction"]["cov_rel_frobenius"])
    noise = r["dense_model"]["gradient_noise"]
    assert math.isfinite(noise["target_per_example_excess_kurtosis_max"])
    mlp = r["mlp"]
    assert mlp["lanczos_top_rel_err_max"] < 1e-6  # Lanczos against eigh of the dense H
    assert math.isfinite(mlp["ou_prediction_dense"]["cov_rel_frobenius"])
    assert isinstance(r["ou_model_failures"], list) and r["ou_model_failures"]
    # Every number in the report is finite, except p-values of degenerate correlations.
    bad = [
        p
        for p, v in _numbers(r)
        if v in ("nan", "inf", "-inf") and "p_value" not in p and "kl_" not in p
    ]
    assert not bad, bad


def test_unknown_experiment_and_list(capsys, tmp_path):
    assert main(["experiment", "mnist", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown experiment 'mnist'" in err[0]
    assert all(name in err[0] for name in EXPERIMENTS)
    assert main(["experiment", "--list"]) == 0
    assert "digits" in capsys.readouterr().out
    assert main(["experiment"]) == 2


# ---------------------------------------------------------------------------
# digits-mlp


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_mlp") / "out"
    code = main(["experiment", "digits-mlp", "--quick", "--quiet", "--out", str(out)])
    return code, out


def test_compare_variances_against_exact_draws(rng):
    """Draws from the predicted law itself: each variance ratio's z-score is about
    N(0, 1) (S = 4000 draws: the chi-square's skewness is negligible), |z| < 4.5 for
    12 directions fails with probability ~1e-4; the reported ratio is empirical /
    predicted and the predicted variance is vᵀΣv."""
    from jaxou.experiments.digits_mlp import compare_variances

    d, S = 6, 4000
    A = rng.standard_normal((d, d))
    cov = A @ A.T / d + 0.1 * np.eye(d)
    mean = rng.standard_normal(d)
    law = jaxou.Gaussian(mean, cov)
    samples = mean + rng.standard_normal((S, d)) @ np.linalg.cholesky(cov).T
    V = rng.standard_normal((d, 12))
    V /= np.linalg.norm(V, axis=0)
    out = compare_variances(samples, law, V)
    np.testing.assert_allclose(out["predicted"], np.einsum("ij,ik,kj->j", V, cov, V), rtol=1e-12)
    np.testing.assert_allclose(out["ratio"], out["empirical"] / out["predicted"], rtol=1e-14)
    assert out["sampling_floor_relative_sd"] == pytest.approx(math.sqrt(2 / (S - 1)))
    assert out["z_abs_max"] < 4.5
    assert out["mean_offset_se_abs_max"] < 4.5


@pytest.mark.slow
def test_digits_mlp_quick_report(mlp_run):
    """The quick run's report: every derived number is what its reported inputs
    imply (sizes, schedules, gaps, ratios, the kl-bound, the Spearman correlations),
    and each step carries its time and the process's peak memory."""
    from jaxou.experiments.digits_mlp import SIZES

    code, out = mlp_run
    assert code == 0
    assert (out / "digits_mlp.png").read_bytes()[:8] == PNG_MAGIC
    r = json.loads((out / "report.json").read_text())
    size = SIZES["quick"]
    h1, h2 = size["hidden"]
    assert r["dim"] == 64 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10
    peaks = [s["peak_rss_mb"] for s in r["steps"]]
    assert all(s["seconds"] > 0 for s in r["steps"]) and peaks == sorted(peaks)
    grid = r["finetune_grid"]
    assert len(grid) == len(size["grid_lr"]) * len(size["grid_batch"])
    n_t, S = r["target_stage"]["n_examples"], r["settings"]["seeds"]
    for q in grid:
        assert q["lr_over_b"] == pytest.approx(q["lr"] / q["batch_size"], rel=1e-12)
        assert q["t_finetune"] == pytest.approx(q["lr"] * q["steps"], rel=1e-12)
        assert q["gap_sgd"] == pytest.approx(q["test_risk_sgd"] - q["train_risk_sgd"], abs=1e-12)
        assert q["law_error"] is None and q["discrepancy_error"] is None
        expected = jaxou.pac_bayes_bound(
            q["finetune_kl"],
            n_t,
            r["settings"]["delta"],
            empirical_risk=q["train_risk_sgd"],
            kind="kl",
        )
        assert q["finetune_bound"] == pytest.approx(float(expected), rel=1e-9)
        for name in ("top_hessian", "random"):
            v = q[f"variance_{name}"]
            assert v["sampling_floor_relative_sd"] == pytest.approx(math.sqrt(2 / (S - 1)))
    # The fine-tuning bound from the grid's laws is jaxou.two_stage_bound's.
    ref = grid[0]["two_stage_bound"]
    assert ref["finetune_kl"] == pytest.approx(grid[0]["finetune_kl"], rel=1e-9)
    assert ref["finetune_bound"] == pytest.approx(grid[0]["finetune_bound"], rel=1e-9)
    s = r["finetune_summary"]
    gap = [q["gap_sgd"] for q in grid]
    for field in ("lr_over_b", "finetune_kl", "discrepancy"):
        rho = spearmanr([q[field] for q in grid], gap).statistic
        assert s[f"spearman_{field}_vs_gap"]["rho"] == pytest.approx(rho)
    v = r["pretrain"]["variance_random"]
    np.testing.assert_allclose(v["ratio"], np.array(v["empirical"]) / np.array(v["predicted"]))
