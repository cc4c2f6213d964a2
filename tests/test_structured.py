"""Structured (diagonal, low-rank plus diagonal) Hessians and noise covariances:
against the dense path at small d, and d = 10⁶ in seconds."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl

import jaxou
from jaxou._structured import (
    DiagonalMatrix,
    DiagonalPlusLowRank,
    LowRankDiagonal,
    StructuredGaussian,
    structured_kl,
    structured_stationary,
    structured_two_stage_bound,
)

D, K = 12, 3


def _basis(rng, d, k):
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


def _dense_law(H, C, minimum, lr, bs):
    S = sl.solve_continuous_lyapunov(np.asarray(H.dense()), lr / bs * np.asarray(C.dense()))
    return jaxou.Gaussian(jnp.asarray(minimum), jnp.asarray(0.5 * (S + S.T)))


def _exact_cases(rng):
    U = _basis(rng, D, K)
    noise_lr = LowRankDiagonal(_basis(rng, D, 2), [2.0, 0.5], rng.uniform(0.1, 1, D))
    return [
        (DiagonalMatrix(rng.uniform(0.5, 2, D)), DiagonalMatrix(rng.uniform(0.1, 1, D))),
        (
            LowRankDiagonal(U, [3.0, 2.0, 1.0], np.full(D, 0.3)),
            DiagonalMatrix(rng.uniform(0.1, 1, D)),
        ),
        (LowRankDiagonal(U, [3.0, 2.0, 1.0], np.full(D, 0.3)), noise_lr),
        (DiagonalMatrix(np.full(D, 0.7)), noise_lr),
    ]


def test_exact_stationary_laws_and_kl_match_dense(rng):
    laws = []
    for H, C in _exact_cases(rng):
        minimum = rng.standard_normal(D)
        law, exact = structured_stationary(H, C, minimum, 0.1, 4.0)
        assert exact
        ref = _dense_law(H, C, minimum, 0.1, 4.0)
        np.testing.assert_allclose(law.cov.dense(), ref.cov, rtol=1e-10, atol=1e-15)
        laws.append((law, ref))
    init = StructuredGaussian.isotropic(jnp.zeros(D), 0.2)
    init_dense = jaxou.Gaussian.isotropic(jnp.zeros(D), 0.2)
    for (p, pd), (q, qd) in zip(laws, laws[1:] + laws[:1]):
        got = structured_kl(p, q)
        want = jaxou.kl_parts(pd, qd)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10)
        np.testing.assert_allclose(
            structured_kl(p, init).total, jaxou.kl(pd, init_dense), rtol=1e-10
        )
    # The two-stage bound (stages at stationarity) against the dense TwoStage.
    (src, src_d), (tgt, tgt_d) = laws[1], laws[2]
    b, disc = structured_two_stage_bound(init, src, tgt, 1e6, 1e3, 0.05, kind="kl")
    np.testing.assert_allclose(disc.total, jaxou.kl(tgt_d, src_d), rtol=1e-10)
    kl1 = jaxou.kl(src_d, init_dense)
    np.testing.assert_allclose(
        b.pretrain_bound, jaxou.pac_bayes_bound(kl1, 1e6, 0.05, kind="kl"), rtol=1e-10
    )


def test_dplr_linear_algebra(rng):
    Z = rng.standard_normal((D, 4))
    S = np.diag([1.0, 0.5, 0.2, 2.0])
    M = DiagonalPlusLowRank(jnp.asarray(rng.uniform(0.5, 1, D)), jnp.asarray(Z), jnp.asarray(S))
    dense = np.asarray(M.dense())
    v = rng.standard_normal(D)
    np.testing.assert_allclose(M.matvec(v), dense @ v, rtol=1e-12)
    np.testing.assert_allclose(M.solve(v), np.linalg.solve(dense, v), rtol=1e-10)
    np.testing.assert_allclose(M.logdet(), np.linalg.slogdet(dense)[1], rtol=1e-12)
    np.testing.assert_allclose(M.trace(), np.trace(dense), rtol=1e-12)


def test_approximation_error_is_measured_and_shrinks(rng):
    """Non-constant diagonal remainder with a noise that does not commute: the
    Neumann-series approximation, error against the dense solution."""
    U = _basis(rng, D, K)
    H = LowRankDiagonal(U, [3.0, 2.0, 1.0], rng.uniform(0.2, 0.4, D))
    C = LowRankDiagonal(_basis(rng, D, 2), [2.0, 0.5], rng.uniform(0.1, 1, D))
    ref = _dense_law(H, C, np.zeros(D), 0.1, 4.0).cov
    errors = []
    for n in (0, 1, 2):
        law, exact = structured_stationary(H, C, np.zeros(D), 0.1, 4.0, corrections=n)
        assert not exact
        errors.append(np.linalg.norm(np.asarray(law.cov.dense()) - ref) / np.linalg.norm(ref))
    rho = (0.4 - 0.2) / (0.4 + 0.2)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2 * rho**3


def test_not_positive_definite_is_named():
    d = 4
    with pytest.raises(ValueError, match="hessian is not positive definite"):
        structured_stationary(
            DiagonalMatrix([1.0, -1.0, 1.0, 1.0]), DiagonalMatrix(np.ones(d)), np.zeros(d), 0.1, 1
        )
    with pytest.raises(ValueError, match="noise_cov is not positive definite.*low-rank"):
        C = LowRankDiagonal(np.eye(d)[:, :1], [-2.0], np.ones(d))
        structured_stationary(DiagonalMatrix(np.ones(d)), C, np.zeros(d), 0.1, 1)
    with pytest.raises(ValueError, match="orthonormal"):
        LowRankDiagonal(2 * np.eye(d)[:, :2], [1.0, 1.0], np.ones(d))


def test_one_million_dimensions_in_seconds():
    d, k = 10**6, 4
    rng = np.random.default_rng(0)
    U = _basis(rng, d, k)
    H_S = LowRankDiagonal(U, np.array([50.0, 20.0, 5.0, 1.0]), np.full(d, 0.01))
    C_S = LowRankDiagonal(U, np.array([30.0, 10.0, 3.0, 1.0]), rng.uniform(0.5, 1.0, d))
    H_T = LowRankDiagonal(U, 1.5 * np.array([50.0, 20.0, 5.0, 1.0]), np.full(d, 0.015))
    t0 = time.perf_counter()
    src, exact_s = structured_stationary(H_S, C_S, jnp.zeros(d), 0.05, 128)
    tgt, exact_t = structured_stationary(H_T, C_S, 0.001 * jnp.ones(d), 0.01, 32)
    init = StructuredGaussian.isotropic(jnp.zeros(d), 0.1)
    b, disc = structured_two_stage_bound(init, src, tgt, 1e7, 1e4)
    total = float(b.finetune_bound)
    elapsed = time.perf_counter() - t0
    assert exact_s and exact_t
    assert np.isfinite(total) and float(disc.shift) > 0
    assert elapsed < 30, elapsed
