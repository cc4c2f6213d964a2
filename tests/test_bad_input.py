"""Bad input gets a clear error that names the argument, before any work: NaN and inf
in every array argument of the public constructors and functions, indefinite
covariances; and singular or rank-deficient noise covariances, which are valid, give
the right laws."""

import numpy as np
import pytest
import scipy.linalg as sl

import jaxou

from helpers import random_psd, random_spd

D = 4


def _poison(x, value, index=(0,)):
    x = np.array(x, dtype=float)
    x[index] = value
    return x


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_entries_are_named(value):
    eye, zeros = np.eye(D), np.zeros(D)
    cases = [
        (lambda: jaxou.Gaussian(_poison(zeros, value), eye), "mean"),
        (lambda: jaxou.Gaussian(zeros, _poison(eye, value, (1, 1))), "cov"),
        (lambda: jaxou.Gaussian(zeros, jaxou.Diagonal(_poison(np.ones(D), value))), "cov"),
        (lambda: jaxou.SGDStage(_poison(eye, value, (2, 2)), eye, zeros, 0.1, 8), "hessian"),
        (lambda: jaxou.SGDStage(eye, _poison(eye, value, (0, 0)), zeros, 0.1, 8), "noise_cov"),
        (lambda: jaxou.SGDStage(eye, eye, _poison(zeros, value), 0.1, 8), "minimum"),
        (lambda: jaxou.SGDStage(eye, eye, zeros, value, 8), "lr"),
        (lambda: jaxou.SGDStage(eye, eye, zeros, 0.1, value), "batch_size"),
        (lambda: jaxou.OUProcess(_poison(eye, value, (0, 1)), zeros, eye), "drift"),
        (lambda: jaxou.OUProcess(eye, _poison(zeros, value), eye), "mean"),
        (lambda: jaxou.OUProcess(eye, zeros, _poison(eye, value, (3, 0))), "diffusion"),
        (lambda: jaxou.pac_bayes_bound(value, 100.0, 0.05), "kl"),
        (lambda: jaxou.pac_bayes_bound(1.0, value, 0.05), "n"),
        (lambda: jaxou.pac_bayes_bound(1.0, 100.0, value), "delta"),
        (lambda: jaxou.pac_bayes_bound(1.0, 100.0, 0.05, empirical_risk=value), "empirical_risk"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()


def test_kl_refuses_what_is_not_a_gaussian():
    p = jaxou.Gaussian(np.zeros(D), np.eye(D))
    with pytest.raises(TypeError, match="q must be a jaxou.Gaussian"):
        jaxou.kl(p, np.eye(D))
    with pytest.raises(ValueError, match="dimensions differ"):
        jaxou.kl(p, jaxou.Gaussian(np.zeros(D + 1), np.eye(D + 1)))


def test_indefinite_gaussian_cov_is_refused(rng):
    M = random_spd(rng, D)
    M = M - 1.5 * np.linalg.eigvalsh(M)[0] * np.eye(D)  # smallest eigenvalue < 0
    with pytest.raises(ValueError, match="cov is not positive semi-definite"):
        jaxou.Gaussian(np.zeros(D), M)
    with pytest.raises(ValueError, match="cov is not positive semi-definite"):
        jaxou.Gaussian(
            np.zeros(D), jaxou.DiagonalPlusLowRank(np.ones(D), np.ones((D, 1)), [[-2 / D]])
        )


@pytest.mark.parametrize("rank", [0, 1, D - 1])
def test_singular_noise_covariances_give_the_right_laws(rng, rank):
    """A rank-deficient (or zero) noise covariance is a valid stage: its stationary
    law is singular where the noise does not reach, and equals SciPy's solution."""
    H = random_spd(rng, D, cond=20.0)
    C = random_psd(rng, D, rank=rank)
    stage = jaxou.SGDStage(H, C, np.zeros(D), 0.1, 8.0)
    ref = sl.solve_continuous_lyapunov(H, 0.1 / 8 * C)
    assert np.allclose(stage.stationary().cov, ref, atol=1e-14 * max(np.abs(ref).max(), 1))
    # and as an operator: diag(0) + Z Zᵀ
    Z = np.linalg.cholesky(C + 1e-300 * np.eye(D)) if rank == D else None
    if Z is None:
        lam, V = np.linalg.eigh(C)
        Z = V[:, lam > 1e-12] * np.sqrt(lam[lam > 1e-12])
    op = jaxou.DiagonalPlusLowRank(np.zeros(D), Z)
    op_stage = jaxou.SGDStage(jaxou.Dense(H), op, np.zeros(D), 0.1, 8.0)
    assert np.allclose(op_stage.stationary().cov_matrix(), ref, atol=1e-13)
