"""`jaxou experiment`: the digits study at its quick size, run once in-process through
`jaxou._cli.main` (module-scoped), then its report checked field by field."""

from __future__ import annotations

import json
import math

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


def test_quick_run_writes_report_and_figures(quick_run):
    code, out = quick_run
    assert code == 0
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    text = (out / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert report["experiment"] == "digits"


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
