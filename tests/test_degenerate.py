"""KL divergences between singular Gaussians: on their common support with
pseudo-determinants, +inf (with the reason) where the supports differ or the mean
shift leaves the support; dense and operator paths agree."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxou

from helpers import random_orthogonal

D, R = 6, 3


def _subspace_kl(R_basis, mp, Sp, mq, Sq):
    """The KL of the r-dimensional laws in an orthonormal basis of the support
    (the textbook formula, with NumPy)."""
    P = R_basis.T @ Sp @ R_basis
    Q = R_basis.T @ Sq @ R_basis
    z = R_basis.T @ (mp - mq)
    r = P.shape[0]
    cov = 0.5 * (
        np.trace(np.linalg.solve(Q, P)) - r - np.linalg.slogdet(P)[1] + np.linalg.slogdet(Q)[1]
    )
    return cov, 0.5 * z @ np.linalg.solve(Q, z)


@pytest.fixture
def problem(rng):
    basis = random_orthogonal(rng, D)[:, :R]
    A, B = rng.standard_normal((R, R)), rng.standard_normal((R, R))
    Sp = basis @ (A @ A.T + 0.1 * np.eye(R)) @ basis.T
    Sq = basis @ (B @ B.T + 0.1 * np.eye(R)) @ basis.T
    mq = rng.standard_normal(D)
    mp = mq + basis @ rng.standard_normal(R)
    return basis, mp, Sp, mq, Sq


def test_common_support_against_the_subspace_formula(problem):
    basis, mp, Sp, mq, Sq = problem
    got = jaxou.kl_parts(jaxou.Gaussian(mp, Sp), jaxou.Gaussian(mq, Sq))
    cov, shift = _subspace_kl(basis, mp, Sp, mq, Sq)
    assert np.isclose(got.covariance, cov, rtol=1e-9)
    assert np.isclose(got.shift, shift, rtol=1e-9)
    jitted = jax.jit(jaxou.kl_parts)(jaxou.Gaussian(mp, Sp), jaxou.Gaussian(mq, Sq))
    assert np.allclose(jitted, got, rtol=1e-12)


def test_closed_form_on_a_coordinate_subspace():
    a, b = 0.7, 2.3
    p = jaxou.Gaussian(np.zeros(2), np.diag([a, 0.0]))
    q = jaxou.Gaussian(np.zeros(2), np.diag([b, 0.0]))
    assert np.isclose(jaxou.kl(p, q), 0.5 * (a / b - 1 - np.log(a / b)), rtol=1e-13)
    x = np.array([1.5, 0.0])
    assert np.isclose(
        jaxou.kl(jaxou.Gaussian(x, p.cov), q),
        0.5 * (a / b - 1 - np.log(a / b)) + 0.5 * 1.5**2 / b,
        rtol=1e-13,
    )
    assert float(jaxou.kl(jaxou.Gaussian.point(x), jaxou.Gaussian.point(x))) == 0.0


@pytest.mark.parametrize(
    "case, reason",
    [
        ("wider", "supports of p and q differ"),
        ("narrower", "supports of p and q differ"),
        ("shift", "mean shift leaves the support"),
        ("points", "mean shift leaves the support"),
    ],
)
def test_infinite_with_a_reason(problem, rng, case, reason):
    basis, mp, Sp, mq, Sq = problem
    if case == "wider":
        p, q = jaxou.Gaussian(mp, np.eye(D)), jaxou.Gaussian(mq, Sq)
    elif case == "narrower":
        u = basis[:, :1]
        p, q = jaxou.Gaussian(mp, u @ u.T), jaxou.Gaussian(mq, Sq)
    elif case == "shift":
        p, q = jaxou.Gaussian(mp + rng.standard_normal(D), Sp), jaxou.Gaussian(mq, Sq)
    else:
        p, q = jaxou.Gaussian.point(mp), jaxou.Gaussian.point(mq)
    with pytest.warns(UserWarning, match=reason):
        value = jaxou.kl(p, q)
    assert np.isposinf(value)


def test_operator_and_dense_paths_agree_on_singular_inputs(problem):
    basis, mp, Sp, mq, Sq = problem
    factor_p = basis @ np.linalg.cholesky(basis.T @ Sp @ basis)
    factor_q = basis @ np.linalg.cholesky(basis.T @ Sq @ basis)
    P = jaxou.DiagonalPlusLowRank(np.zeros(D), factor_p)
    Q = jaxou.DiagonalPlusLowRank(np.zeros(D), factor_q)
    op = jaxou.kl_parts(jaxou.Gaussian(mp, P), jaxou.Gaussian(mq, Q))
    dense = jaxou.kl_parts(jaxou.Gaussian(mp, Sp), jaxou.Gaussian(mq, Sq))
    assert np.allclose(op, dense, rtol=1e-9)
    with warnings.catch_warnings(), pytest.warns(UserWarning, match="supports"):
        assert np.isposinf(
            jaxou.kl(jaxou.Gaussian(mp, jaxou.Diagonal(jnp.ones(D))), jaxou.Gaussian(mq, Q))
        )


def test_regular_inputs_are_unchanged_by_the_singular_branch(rng):
    """Nearly singular but numerically regular (condition 1e10): the Cholesky path,
    equal to the textbook formula."""
    V = random_orthogonal(rng, D)
    Sp = (V * np.logspace(0, -10, D)) @ V.T
    Sq = (V * np.logspace(0, -9, D)) @ V.T
    got = jaxou.kl(jaxou.Gaussian(np.zeros(D), Sp), jaxou.Gaussian(np.zeros(D), Sq))
    ratio = np.logspace(0, -10, D) / np.logspace(0, -9, D)
    # Forming Sp, Sq from their eigenvectors costs a relative error of about
    # κ ε = 1e10 × 2.2e-16 in the small eigenvalues: 2e-6 here.
    assert np.isclose(got, 0.5 * np.sum(ratio - 1 - np.log(ratio)), rtol=2e-5)


def test_singular_structured_laws_above_the_dense_limit_are_refused_clearly(rng):
    """A structured law whose whitened spectrum is too wide for the Woodbury path
    (I + 1e16 uuᵀ, float64) at d above the dense limit: a ValueError that says
    which tolerance it failed and what to do, not a wrong number."""
    d = 3000
    u = rng.standard_normal((d, 1)) / np.sqrt(d)
    wide = jaxou.DiagonalPlusLowRank(jnp.ones(d), u, jnp.array([[1e16]]))
    good = jaxou.DiagonalPlusLowRank(jnp.ones(d), u, jnp.array([[2.0]]))
    with pytest.raises(ValueError, match=r"numerically singular at d = 3000.*10·d·ε"):
        jaxou.kl(jaxou.Gaussian(np.zeros(d), good), jaxou.Gaussian(np.zeros(d), wide))
