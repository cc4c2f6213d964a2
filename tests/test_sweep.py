"""Grids of hyperparameters: `jaxou.evaluate`, `jaxou.grid`, `jaxou.sensitivity`.

One small problem (d = 5) and a few fixed grid shapes are shared by every test,
so that each compiled program is built once.
"""

from __future__ import annotations

import itertools
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxou
from jaxou._sweep import HYPERPARAMETERS, TERMS

D = 5


def _model(rng, t_pretrain=40.0, t_finetune=5.0, init_cond=None):
    from helpers import random_psd, random_spd

    H_S = random_spd(rng, D, cond=50.0)
    C_S = random_psd(rng, D) + 0.1 * np.eye(D)
    H_T = random_spd(rng, D, cond=20.0)
    C_T = random_psd(rng, D) + 0.1 * np.eye(D)
    th_S = rng.standard_normal(D)
    th_T = th_S + 0.3 * rng.standard_normal(D)
    init = jaxou.Gaussian.isotropic(jnp.zeros(D), 0.3)
    if init_cond is not None:  # a correlated, ill-conditioned initial law
        init = jaxou.Gaussian(jnp.zeros(D), jnp.asarray(0.3 * random_spd(rng, D, cond=init_cond)))
    pre = jaxou.SGDStage(H_S, C_S, th_S, 0.05, 32.0)
    fine = jaxou.SGDStage(H_T, C_T, th_T, 0.01, 8.0)
    return jaxou.TwoStage(init, pre, fine, t_pretrain, t_finetune)


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(1234)
    return {
        "finite": _model(rng),
        "stationary": _model(rng, math.inf, math.inf, init_cond=1e4),
        "no_pretraining": _model(rng, 0.0, 3.0),
    }


AXES = dict(
    finetune_lr=[1e-3, 3e-2],
    finetune_batch_size=[4.0, 64.0],
    n_target=[50.0, 5e3],
    target_hessian_scale=[0.5, 2.0],
    target_shift=[0.0, 0.7],
)


def _hyper(**extra):
    g = jaxou.grid(**AXES)
    return jaxou.Hyperparameters(**{**g.given(), "n_source": 1e6, "pretrain_lr": 0.02, **extra})


def _loop_reference(model, hyper, kind):
    """A Python loop over the grid calling the library's public functions."""
    given = {k: np.broadcast_to(np.asarray(v, float), (2,) * 5) for k, v in hyper.given().items()}
    u = np.asarray(model.finetune.minimum - model.pretrain.minimum)
    u = u / np.linalg.norm(u)
    rows = {}
    # Every third point (the loop is eager and slow; the rest is covered by the
    # plain path, compared at every point below).
    for idx in list(itertools.product(range(2), repeat=5))[::3]:
        h = {k: float(v[idx]) for k, v in given.items()}
        pre = jaxou.SGDStage(
            model.pretrain.hessian,
            model.pretrain.noise_cov,
            model.pretrain.minimum,
            h["pretrain_lr"],
            model.pretrain.batch_size,
        )
        fine = jaxou.SGDStage(
            h["target_hessian_scale"] * model.finetune.hessian,
            model.finetune.noise_cov,
            model.pretrain.minimum + h["target_shift"] * u,
            h["finetune_lr"],
            h["finetune_batch_size"],
        )
        m = jaxou.TwoStage(model.init, pre, fine, model.t_pretrain, model.t_finetune)
        b = jaxou.two_stage_bound(m, h["n_source"], h["n_target"], 0.05, kind=kind)
        disc = jaxou.domain_discrepancy(pre, fine)
        values = {
            "discrepancy_total": disc.total,
            "discrepancy_covariance": disc.covariance,
            "discrepancy_shift": disc.shift,
            "pretrain_kl_total": b.pretrain_kl.total,
            "pretrain_kl_covariance": b.pretrain_kl.covariance,
            "finetune_kl_total": b.finetune_kl.total,
            "finetune_kl_covariance": b.finetune_kl.covariance,
            "finetune_kl_shift": b.finetune_kl.shift,
            "pretrain_bound": b.pretrain_bound,
            "finetune_bound": b.finetune_bound,
            "total_term": b.pretrain_term + b.finetune_term,
            "source_trace": jnp.trace(pre.stationary().cov),
            "target_trace": jnp.trace(fine.stationary().cov),
        }
        for k, v in values.items():
            rows.setdefault(k, []).append(float(v))
    return {k: np.asarray(v) for k, v in rows.items()}


@pytest.mark.parametrize("which", ["finite", "stationary", "no_pretraining"])
def test_grid_equals_python_loop(models, which):
    model = models[which]
    hyper = _hyper()
    ref = _loop_reference(model, hyper, "mcallester")
    fast = jaxou.evaluate(model, hyper).columns()
    plain = jaxou.evaluate(model, hyper, method="plain").columns()
    assert jaxou.evaluate(model, hyper).shape == (2,) * 5
    for name, expected in ref.items():
        for got in (fast, plain):
            np.testing.assert_allclose(
                got[name][::3], expected, rtol=1e-9, atol=1e-13, err_msg=name
            )
    for name in TERMS:
        np.testing.assert_allclose(fast[name], plain[name], rtol=1e-9, atol=1e-13, err_msg=name)
    r = jaxou.evaluate(model, hyper)
    np.testing.assert_array_equal(
        np.asarray(r.finetune_dominates), np.asarray(r.finetune_term > r.pretrain_term)
    )


def test_kl_kind_and_risks_against_two_stage_bound(models):
    model = models["finite"]
    hyper = jaxou.Hyperparameters(
        n_source=jnp.array([1e5, 1e6]),
        n_target=jnp.array([30.0, 1e3]),
        delta=jnp.array([0.01, 0.2]),
        empirical_risk_source=jnp.array([0.0, 0.1]),
        empirical_risk_target=jnp.array([0.3, 0.05]),
    )
    r = jaxou.evaluate(model, hyper, kind="kl")
    for i in range(2):
        b = jaxou.two_stage_bound(
            model,
            hyper.n_source[i],
            hyper.n_target[i],
            hyper.delta[i],
            empirical_risk_source=hyper.empirical_risk_source[i],
            empirical_risk_target=hyper.empirical_risk_target[i],
            kind="kl",
        )
        np.testing.assert_allclose(r.pretrain_bound[i], b.pretrain_bound, rtol=1e-10)
        np.testing.assert_allclose(r.finetune_bound[i], b.finetune_bound, rtol=1e-10)
        np.testing.assert_allclose(r.finetune_term[i], b.finetune_term, rtol=1e-10)


def test_laws_match_the_model(models):
    model = models["finite"]
    r = jaxou.evaluate(model, jaxou.Hyperparameters(n_source=1e6, n_target=1e3), laws=True)
    pre, fine = model.laws()
    np.testing.assert_allclose(r.laws["pretrained"].cov, pre.cov, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(r.laws["finetuned"].cov, fine.cov, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(r.laws["finetuned"].mean, fine.mean, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        r.laws["target"].cov, model.finetune.stationary().cov, rtol=1e-10, atol=1e-14
    )


def _compiles(caplog, fn):
    """The names of the programs XLA compiled while running `fn`."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        out = fn()
    return out, [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]


def test_new_grid_of_same_shape_does_not_recompile(models, caplog):
    model = models["finite"]
    jaxou.evaluate(model, _hyper())
    other = jaxou.Hyperparameters(
        **{
            k: (np.asarray(v) * 1.7 if k != "target_shift" else np.asarray(v) + 0.1)
            for k, v in _hyper().given().items()
        }
    )
    r, compiled = _compiles(caplog, lambda: jaxou.evaluate(model, other))
    assert not [c for c in compiled if "_evaluate_flat" in c], compiled
    assert np.all(np.isfinite(np.asarray(r.total_term)))
    # ... and neither does a new base model of the same dimension.
    _, compiled = _compiles(caplog, lambda: jaxou.evaluate(models["stationary"], other))
    assert not [c for c in compiled if "_evaluate_flat" in c], compiled
    # The check can fail: a grid of another shape does compile.
    _, compiled = _compiles(
        caplog,
        lambda: jaxou.evaluate(
            model, jaxou.grid(finetune_lr=[0.01, 0.02, 0.03], n_source=[1e5], n_target=[1e3])
        ),
    )
    assert [c for c in compiled if "_evaluate_flat" in c], compiled


def test_dedupe_changes_nothing(models):
    model = models["finite"]
    a = jaxou.evaluate(model, _hyper()).columns()
    b = jaxou.evaluate(model, _hyper(), dedupe=False, batch_size=8).columns()
    for k in TERMS:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-13, atol=1e-15, err_msg=k)


def _fd_check(model, hyper, method, kind, wrt):
    sens = jaxou.sensitivity(model, hyper, method=method, kind=kind, wrt=wrt)
    from jaxou._sweep import _resolve

    h, _ = _resolve(model, hyper)
    worst = 0.0
    for name in wrt:
        step = 1e-5 * np.abs(np.asarray(h[name]))
        up, down = dict(h), dict(h)
        up[name] = h[name] + step
        down[name] = h[name] - step
        fu = jaxou.evaluate(model, jaxou.Hyperparameters(**up), method=method, kind=kind)
        fd_ = jaxou.evaluate(model, jaxou.Hyperparameters(**down), method=method, kind=kind)
        cu, cd = fu.columns(), fd_.columns()
        for t in TERMS:
            fd = (cu[t] - cd[t]) / (2 * step)
            an = np.asarray(sens[t][name])
            scale = np.abs(an) + 1e-9 * np.abs(cu[t]) / np.abs(np.asarray(h[name])) + 1e-300
            err = np.max(np.abs(fd - an) / scale)
            assert err <= 1e-6, (name, t, fd, an)
            worst = max(worst, err)
    return worst


SENS_HYPER = dict(
    n_source=np.array([1e6, 2e4]),
    n_target=np.array([1e3, 40.0]),
    empirical_risk_source=np.array([0.05, 0.2]),
    empirical_risk_target=np.array([0.1, 0.3]),
    target_shift=np.array([0.2, 0.9]),
    target_hessian_scale=np.array([0.7, 1.6]),
    delta=np.array([0.05, 0.1]),
)


@pytest.mark.parametrize("method", ["eigen", pytest.param("plain", marks=pytest.mark.slow)])
def test_sensitivity_against_finite_differences(models, method):
    """Every term against every hyperparameter; "plain" differentiates through
    the Lyapunov solve's own (adjoint) derivative."""
    worst = _fd_check(
        models["finite"], jaxou.Hyperparameters(**SENS_HYPER), method, "kl", HYPERPARAMETERS
    )
    assert worst <= 1e-6


def test_sensitivity_eigen_equals_plain(models):
    hyper = jaxou.Hyperparameters(**SENS_HYPER)
    a = jaxou.sensitivity(models["finite"], hyper, kind="kl")
    b = jaxou.sensitivity(models["finite"], hyper, kind="kl", method="plain")
    for t in TERMS:
        for w in HYPERPARAMETERS:
            np.testing.assert_allclose(a[t][w], b[t][w], rtol=1e-8, atol=1e-12, err_msg=(t, w))


def _kl_sum(model, hyper, weights, method="eigen"):
    """A weighted sum of every scalar term over the grid (one scalar to
    differentiate in reverse mode)."""
    cols = jaxou.evaluate(model, hyper, kind="kl", method=method)
    from jaxou._sweep import _scalars

    s = _scalars(cols._asdict())
    return sum(jnp.sum(w * s[t]) for t, w in zip(TERMS, weights))


def test_reverse_mode_gradient_equals_sensitivity(models):
    """`jax.grad` through `evaluate` (the KL terms' own derivative, transposed)
    against the forward-mode sensitivities, which are checked against finite
    differences above: for random weights over the terms, the gradient of the
    weighted sum is the weighted sum of the derivatives."""
    model = models["finite"]
    rng = np.random.default_rng(7)
    h = {k: jnp.asarray(v, float) for k, v in SENS_HYPER.items()}
    sens = jaxou.sensitivity(model, jaxou.Hyperparameters(**h), kind="kl")
    for _ in range(2):
        weights = rng.standard_normal(len(TERMS))
        g = jax.grad(lambda hh, w=weights: _kl_sum(model, jaxou.Hyperparameters(**hh), w))(h)
        for name in h:
            expect = sum(w * np.asarray(sens[t][name]) for t, w in zip(TERMS, weights))
            scale = sum(np.abs(w * np.asarray(sens[t][name])) for t, w in zip(TERMS, weights))
            np.testing.assert_allclose(
                g[name], expect, rtol=0, atol=1e-11 * scale.max(), err_msg=name
            )


@pytest.mark.slow
def test_second_derivatives_against_finite_differences(models):
    """The KL terms' derivative rule is itself differentiable: Hessians of the
    fine-tuning KL in (Hessian scale, shift, fine-tuning lr) against central
    differences of the first derivatives."""
    import jax

    model = models["finite"]
    names = ("target_hessian_scale", "target_shift", "finetune_lr")
    x0 = np.array([1.3, 0.4, 0.02])

    def kl2(x):
        h = dict(zip(names, x), n_source=1e6, n_target=1e3)
        return jaxou.evaluate(model, jaxou.Hyperparameters(**h), kind="kl").finetune_kl.total

    grad = jax.jit(jax.grad(kl2))
    hess = np.asarray(jax.hessian(kl2)(jnp.asarray(x0)))
    for i in range(3):
        e = np.zeros(3)
        e[i] = 1e-5 * x0[i]
        fd = (np.asarray(grad(x0 + e)) - np.asarray(grad(x0 - e))) / (2 * e[i])
        np.testing.assert_allclose(hess[:, i], fd, rtol=1e-6, atol=1e-9 * np.abs(hess).max())


@pytest.mark.slow
def test_gradient_in_the_initial_law_eigen_equals_plain(models):
    """Differentiating with respect to the model (here the initial covariance,
    which enters the pre-training KL through its Cholesky factor and the
    transported mean) gives the same gradient on both paths."""
    import equinox as eqx
    import jax

    model = models["finite"]
    hyper = jaxou.Hyperparameters(**SENS_HYPER)
    w = np.random.default_rng(3).standard_normal(len(TERMS))

    def f(cov, method):
        m = eqx.tree_at(lambda m: m.init.cov, model, cov)
        return _kl_sum(m, hyper, w, method)

    cov = model.init.cov + 0.05 * jnp.ones((D, D))
    a = np.asarray(jax.grad(f)(cov, "eigen"))
    b = np.asarray(jax.grad(f)(cov, "plain"))
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())


@pytest.mark.slow
def test_float32_model_gives_float32_terms_and_gradients(models):
    """A float32 model is evaluated and differentiated in float32 (the KL terms'
    own derivative included), within float32 accuracy of the float64 results."""
    import jax

    m64 = models["finite"]
    m32 = jax.tree.map(
        lambda x: x.astype(jnp.float32) if getattr(x, "dtype", None) == jnp.float64 else x, m64
    )
    h64 = {k: jnp.asarray(v) for k, v in SENS_HYPER.items()}
    h32 = {k: v.astype(jnp.float32) for k, v in h64.items()}

    def f(h, m):
        return jaxou.evaluate(m, jaxou.Hyperparameters(**h)).total_term.sum()

    r32 = jaxou.evaluate(m32, jaxou.Hyperparameters(**h32))
    r64 = jaxou.evaluate(m64, jaxou.Hyperparameters(**h64))
    assert r32.total_term.dtype == jnp.float32
    for a, b in zip(r32.finetune_kl, r64.finetune_kl):
        np.testing.assert_allclose(a, b, rtol=1e-4)
    g32, g64 = jax.grad(f)(h32, m32), jax.grad(f)(h64, m64)
    for k in h64:
        assert g32[k].dtype == jnp.float32, k
        np.testing.assert_allclose(
            g32[k], g64[k], rtol=1e-4, atol=1e-6 * np.abs(g64[k]).max(), err_msg=k
        )


def test_grid_helper():
    g = jaxou.grid(finetune_lr=[1.0, 2.0], n_target=[1.0, 2.0, 3.0])
    assert g.finetune_lr.shape == (2, 3) and g.n_target.shape == (2, 3)
    np.testing.assert_array_equal(g.n_target[1], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(g.finetune_lr[:, 0], [1.0, 2.0])
    with pytest.raises(ValueError, match="did you mean 'finetune_lr'"):
        jaxou.grid(finetune_lrr=[1.0])
    with pytest.raises(ValueError, match="n_target must be a non-empty 1-D"):
        jaxou.grid(n_target=[[1.0]])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(delta=1.5), r"Hyperparameters\.delta must lie in \(0, 1\)"),
        (dict(delta=0.0), r"Hyperparameters\.delta must lie in \(0, 1\)"),
        (dict(n_target=0.5), r"Hyperparameters\.n_target must lie in \[1, inf\)"),
        (dict(n_source=np.array([10.0, 0.0])), r"Hyperparameters\.n_source"),
        (dict(empirical_risk_target=1.2), r"Hyperparameters\.empirical_risk_target.*\[0, 1\]"),
        (dict(empirical_risk_source=-0.1), r"Hyperparameters\.empirical_risk_source"),
        (dict(finetune_lr=-1.0), r"Hyperparameters\.finetune_lr"),
        (dict(target_hessian_scale=0.0), r"Hyperparameters\.target_hessian_scale"),
        (
            dict(finetune_lr=np.ones(3), n_target=np.ones(4)),
            r"incompatible shapes \(.*finetune_lr \(3,\).*n_target \(4,\)",
        ),
    ],
)
def test_bad_hyperparameters(models, bad, match):
    hyper = jaxou.Hyperparameters(**{"n_source": 1e6, "n_target": 100.0, **bad})
    with pytest.raises(ValueError, match=match):
        jaxou.evaluate(models["finite"], hyper)


def test_missing_sample_size_and_bad_options(models):
    with pytest.raises(ValueError, match=r"Hyperparameters\.n_target is required"):
        jaxou.evaluate(models["finite"], jaxou.Hyperparameters(n_source=1.0))
    hyper = jaxou.Hyperparameters(n_source=1e6, n_target=1e3)
    with pytest.raises(ValueError, match="unknown kind"):
        jaxou.evaluate(models["finite"], hyper, kind="catoni")
    with pytest.raises(ValueError, match="unknown term"):
        jaxou.sensitivity(models["finite"], hyper, terms=("bound",))
    with pytest.raises(TypeError, match="jaxou.Hyperparameters"):
        jaxou.evaluate(models["finite"], {"n_source": 1.0})


# ---------------------------------------------------------------------------
# `jaxou sweep` on the command line (in-process), on a tiny grid.

SWEEP_TOML = """
[problem]
dim = 4
seed = 3

[finetune]
n_samples = 200

[sweep]
finetune_lr = [0.001, 0.01]
finetune_batch_size = [8, 64]
n_target = [100, 1000, 10000]
chunk_size = 5
"""


@pytest.mark.slow
def test_sweep_cli_resumes_and_refuses_a_different_config(tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    import jaxou._cmd_sweep as cmd
    from jaxou._cli import main

    cfg = tmp_path / "sweep.toml"
    cfg.write_text(SWEEP_TOML)
    out = tmp_path / "out"
    real = cmd._evaluate_chunk
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cmd, "_evaluate_chunk", interrupted)
    assert main(["sweep", str(cfg), "--out", str(out), "-q"]) == 130
    assert "interrupted" in capsys.readouterr().err
    chunks = sorted(p.name for p in (out / "sweep_chunks").iterdir())
    assert chunks == ["chunk_000000.npz", "manifest.json"]  # no half-written file

    calls.clear()
    monkeypatch.setattr(cmd, "_evaluate_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["sweep", str(cfg), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resuming: 1 of 3 chunks already done" in err
    assert len(calls) == 2  # only the two missing chunks
    for name in cmd.OUTPUTS:
        assert (out / name).is_file(), name
    table = pq.read_table(out / "sweep_table.parquet").to_pydict()
    assert len(table["total_term"]) == 12
    csv_lines = (out / "sweep_table.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 13
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["points"] == 12 and summary["grid_shape"] == [2, 2, 3]
    assert -0.52 < summary["finetune_term_slope_in_n_target"]["median"] < -0.45

    # The same table as jaxou.evaluate over the same grid.
    from jaxou._config import load_config
    from jaxou._problem import build_problem

    model, info = build_problem(load_config(cfg))
    g = jaxou.grid(finetune_lr=[0.001, 0.01], finetune_batch_size=[8, 64], n_target=[100, 1e3, 1e4])
    ref = jaxou.evaluate(
        model, jaxou.Hyperparameters(**g.given(), n_source=float(info.n_source))
    ).columns()
    np.testing.assert_allclose(table["total_term"], ref["total_term"], rtol=1e-12)

    # A different config in the same directory: refused, nothing mixed.
    cfg2 = tmp_path / "other.toml"
    cfg2.write_text(SWEEP_TOML.replace("seed = 3", "seed = 4"))
    assert main(["sweep", str(cfg2), "--out", str(out), "-q"]) == 2
    assert "holds chunks of a different sweep" in capsys.readouterr().err
    assert main(["sweep", str(cfg2), "--out", str(out), "-q", "--fresh", "--no-plot"]) == 0


@pytest.mark.parametrize(
    "text, match",
    [
        ("[sweep]\ndelta = [0.5, 1.5]\n", r"sweep\.delta values must lie in \(0, 1\)"),
        ("[sweep]\nn_target = [0.5]\n", r"sweep\.n_target values must lie in \[1, inf\)"),
        ("[sweep]\nempirical_risk_target = [2]\n", r"sweep\.empirical_risk_target"),
        ("[sweep]\nfinetune_lrr = [0.1]\n", r"did you mean sweep\.finetune_lr"),
        ("[sweep]\nchunk_size = 0\n", r"sweep\.chunk_size must be >= 1"),
    ],
)
def test_sweep_cli_bad_config(tmp_path, capsys, text, match):
    import re

    from jaxou._cli import main

    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()
