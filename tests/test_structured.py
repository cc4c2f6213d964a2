"""Structured (diagonal, low-rank plus diagonal) Hessians and noise covariances:
against the dense path at small d, and d = 10⁶ in seconds."""

from __future__ import annotations

import time

import equinox as eqx
import jax
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
    structured_error_bound,
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


def test_dplr_algebra_with_a_rank_deficient_factor_and_indefinite_core(rng):
    """The Gram-matrix algebra (no thin QR) neither inverts the factor's Gram
    matrix nor the core: a repeated column (singular Gram matrix) and a core with
    a negative eigenvalue (M still positive definite) give the dense results, and
    the eigenvalues agree with `whitened`'s (QR-based)."""
    Z = rng.standard_normal((D, 3))
    Z = np.concatenate([Z, Z[:, :1]], axis=1)  # rank 3, four columns
    S = np.array(
        [[1.0, 0.2, 0.0, 0.3], [0.2, -0.1, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.3, 0.0, 0.0, 0.5]]
    )
    g = rng.uniform(1.0, 2.0, D)
    M = DiagonalPlusLowRank(jnp.asarray(g), jnp.asarray(Z), jnp.asarray(S))
    dense = np.asarray(M.dense())
    assert np.linalg.eigvalsh(dense).min() > 0 and np.linalg.eigvalsh(S).min() < 0
    v = rng.standard_normal(D)
    np.testing.assert_allclose(M.solve(v), np.linalg.solve(dense, v), rtol=1e-10)
    np.testing.assert_allclose(M.logdet(), np.linalg.slogdet(dense)[1], rtol=1e-12)
    tau, _, _ = M._woodbury()
    _, _, tau_qr = M.whitened()
    np.testing.assert_allclose(np.sort(tau), np.sort(tau_qr), atol=1e-12 * np.abs(tau_qr).max())
    other = DiagonalPlusLowRank(
        jnp.asarray(rng.uniform(0.5, 1.0, D)), jnp.asarray(Z[:, :2]), jnp.eye(2)
    )
    p = StructuredGaussian(jnp.asarray(rng.standard_normal(D)), other)
    q = StructuredGaussian(jnp.asarray(rng.standard_normal(D)), M)
    want = jaxou.kl_parts(
        jaxou.Gaussian(p.mean, other.dense()), jaxou.Gaussian(q.mean, jnp.asarray(dense))
    )
    for got, ref in zip(structured_kl(p, q), want):
        np.testing.assert_allclose(got, ref, rtol=1e-10)


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


def _spread_hessian(rng, d, k, ratio, eigenvalues=None):
    """LowRankDiagonal Hessian whose diagonal remainder spans exactly [1/ratio, 1]."""
    h = np.exp(rng.uniform(np.log(1.0 / ratio), 0.0, d))
    h[rng.choice(d, 2, replace=False)] = [1.0 / ratio, 1.0]
    lam = np.logspace(2, 0, k) if eigenvalues is None else eigenvalues
    return LowRankDiagonal(_basis(rng, d, k), lam, h)


def test_moderate_spread_is_within_the_documented_bound(rng):
    """Spread 1.5 (ρ = 0.2): every truncation is within ρ^(n+1) of SciPy's dense
    solution, on fresh random problems; also with a negative Hessian eigenvalue,
    where the bound uses the generalised ρ."""
    d, k = 30, 4
    for draw in range(2):
        eigenvalues = None if draw == 0 else np.array([5.0, 2.0, 1.0, -0.3])
        H = _spread_hessian(rng, d, k, 1.5, eigenvalues)
        C = LowRankDiagonal(_basis(rng, d, 2), [3.0, 0.5], rng.uniform(0.2, 1.0, d))
        ref = _dense_law(H, C, np.zeros(d), 0.05, 32.0).cov
        rho = (1.0 - 1 / 1.5) / (1.0 + 1 / 1.5 + 2 * min(0.0, np.min(H.eigenvalues)))
        for n in (0, 1, 2, 3):
            bound = float(structured_error_bound(H, C, corrections=n))
            np.testing.assert_allclose(bound, rho ** (n + 1), rtol=1e-12)
            law, exact = structured_stationary(H, C, np.zeros(d), 0.05, 32.0, corrections=n)
            assert not exact
            X = np.asarray(law.cov.dense())
            err = np.linalg.norm(X - ref) / np.linalg.norm(ref)
            assert err <= bound, (draw, n, err, bound)
            assert np.linalg.eigvalsh(X).min() > 0
        if draw == 0:
            assert bound == pytest.approx(0.2**4)  # the documented 1.6e-3 at n = 3


def test_error_bound_is_zero_when_exact_and_options_are_checked(rng):
    for H, C in _exact_cases(rng):
        assert float(structured_error_bound(H, C, corrections=2)) == 0.0
    H = _spread_hessian(rng, D, K, 2.0)
    C = DiagonalMatrix(np.ones(D))
    with pytest.raises(ValueError, match="corrections must be >= 0"):
        structured_stationary(H, C, np.zeros(D), 0.1, 1.0, corrections=-1)
    with pytest.raises(TypeError, match="corrections must be a Python int"):
        structured_error_bound(H, C, corrections=1.5)
    with pytest.raises(ValueError, match="max_error_bound must lie in"):
        structured_stationary(H, C, np.zeros(D), 0.1, 1.0, max_error_bound=0.0)


def test_wide_spread_is_refused_before_the_solve(rng):
    """Spread 100 (ρ = 0.98): the benchmark's one-correction result was indefinite
    (NaN KL); the bound ρ² = 0.96 is refused, naming `corrections` and the spread."""
    d = 20
    H = _spread_hessian(rng, d, 3, 100.0)
    C = LowRankDiagonal(_basis(rng, d, 2), [3.0, 0.5], rng.uniform(0.2, 1.0, d))
    match = r"corrections=1 is not enough for the spread.*h_max/h_min = 100.*dense"
    with pytest.raises(ValueError, match=match):
        structured_stationary(H, C, np.zeros(d), 0.05, 32.0, corrections=1)
    # Spread 10 (ρ = 0.82) needs 3 corrections for a bound below 1/2, and says so.
    H10 = _spread_hessian(rng, d, 3, 10.0)
    with pytest.raises(ValueError, match="use corrections >= 3"):
        structured_stationary(H10, C, np.zeros(d), 0.05, 32.0, corrections=1)
    structured_stationary(H10, C, np.zeros(d), 0.05, 32.0, corrections=1, max_error_bound=1.0)
    # Under jit the refusal happens at run time.
    solve = eqx.filter_jit(
        lambda H, C: structured_stationary(H, C, jnp.zeros(d), 0.05, 32.0, corrections=1)[0]
    )
    with pytest.raises(
        (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="corrections=1"
    ):
        jax.block_until_ready(solve(H, C))


def test_indefinite_result_below_the_bound_is_caught(rng):
    """The bound is relative to ‖Σ‖_F: with a noise covariance spanning eight orders
    of magnitude a truncation within it can still be indefinite; that is caught."""
    d = 20
    H = _spread_hessian(rng, d, 2, 3.0, np.array([10.0, 1.0]))
    C = LowRankDiagonal(_basis(rng, d, 1), [100.0], rng.permutation(np.logspace(-8, 0, d)))
    with pytest.raises(ValueError, match=r"corrections=1 is not positive definite.*noise_cov"):
        structured_stationary(H, C, np.zeros(d), 1.0, 1.0, corrections=1)
    solve = eqx.filter_jit(
        lambda H, C: structured_stationary(H, C, jnp.zeros(d), 1.0, 1.0, corrections=1)[0]
    )
    with pytest.raises(
        (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="not positive definite"
    ):
        jax.block_until_ready(solve(H, C))
    # A well-conditioned problem passes the same jitted checks and matches eager.
    C_ok = LowRankDiagonal(_basis(rng, d, 1), [1.0], rng.uniform(0.5, 1.0, d))
    got = solve(H, C_ok).cov.dense()
    want = structured_stationary(H, C_ok, np.zeros(d), 1.0, 1.0, corrections=1)[0].cov.dense()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
