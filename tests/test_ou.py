import diffrax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import jaxou

from helpers import random_psd, random_spd, random_stable, rel_err


def make_process(rng, d, symmetric):
    A = random_spd(rng, d, 20) if symmetric else random_stable(rng, d, 20)
    G = rng.standard_normal((d, d + 1)) / np.sqrt(d)
    return jaxou.OUProcess(A, rng.standard_normal(d), G), A, G @ G.T


@pytest.mark.parametrize("symmetric", [True, False])
def test_stationary_against_scipy(rng, symmetric):
    proc, A, D = make_process(rng, 5, symmetric)
    ref = scipy.linalg.solve_continuous_lyapunov(A, D)
    law = proc.stationary()
    assert rel_err(law.cov, ref) < 1e-12
    np.testing.assert_array_equal(law.mean, proc.mean)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("t", [0.05, 0.7, 30.0])
def test_marginal_against_expm(rng, symmetric, t):
    # Both branches of the general flow (Van Loan for ||A|| t <= 2, Lyapunov form
    # beyond) and the symmetric closed form.
    proc, A, D = make_process(rng, 4, symmetric)
    m0 = rng.standard_normal(4)
    S0 = random_psd(rng, 4)
    law = proc.marginal(jaxou.Gaussian(m0, S0), t)
    F = scipy.linalg.expm(-A * t)
    S_inf = scipy.linalg.solve_continuous_lyapunov(A, D)
    mu = np.asarray(proc.mean)
    np.testing.assert_allclose(law.mean, mu + F @ (m0 - mu), rtol=1e-11, atol=1e-13)
    ref = S_inf + F @ (S0 - S_inf) @ F.T
    assert rel_err(law.cov, ref) < 1e-10


@pytest.mark.parametrize("symmetric", [True, False])
def test_transition_tiny_dt_is_accurate(rng, symmetric):
    # Σ_dt = D dt - (AD + DAᵀ) dt²/2 + (A²D + 2ADAᵀ + DA²ᵀ) dt³/6 - ...; the naive
    # Σ∞ - FΣ∞Fᵀ would lose about log10(1/dt) digits here.
    proc, A, D = make_process(rng, 4, symmetric)
    dt = 1e-9
    AD = A @ D + D @ A.T
    ref = D * dt - AD * dt**2 / 2 + (A @ A @ D + 2 * A @ D @ A.T + D @ A.T @ A.T) * dt**3 / 6
    F, S = proc.transition(dt)
    assert rel_err(S, ref) < 1e-12
    assert rel_err(F, scipy.linalg.expm(-A * dt)) < 1e-14


@pytest.mark.parametrize("symmetric", [True, False])
def test_transition_semigroup(rng, symmetric):
    proc, _, _ = make_process(rng, 3, symmetric)
    F1, S1 = proc.transition(0.3)
    F2, S2 = proc.transition(0.6)
    np.testing.assert_allclose(F1 @ F1, F2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(F1 @ S1 @ F1.T + S1, S2, rtol=1e-11, atol=1e-14)


def test_marginal_limits(rng):
    proc, _, _ = make_process(rng, 3, False)
    init = jaxou.Gaussian(rng.standard_normal(3), random_psd(rng, 3))
    at_inf = proc.marginal(init, jnp.inf)
    stat = proc.stationary()
    np.testing.assert_allclose(at_inf.cov, stat.cov, rtol=1e-12)
    np.testing.assert_allclose(at_inf.mean, stat.mean, rtol=1e-12)
    at0 = proc.marginal(init, 0.0)
    np.testing.assert_allclose(at0.cov, init.cov, atol=1e-14)
    np.testing.assert_allclose(at0.mean, init.mean, atol=1e-14)


def test_exact_step_sampling(key, rng):
    proc, _, _ = make_process(rng, 3, False)
    n = 40_000
    x0 = rng.standard_normal(3)
    x = np.asarray(proc.transition_sample(key, jnp.tile(x0, (n, 1)), 0.5))
    law = proc.marginal(x0, 0.5)
    se = np.sqrt(np.diag(law.cov) / n)
    assert np.all(np.abs(x.mean(0) - law.mean) <= 5 * se)
    u = rng.standard_normal(3)
    proj = (x - law.mean) @ u / np.sqrt(u @ law.cov @ u)
    assert scipy.stats.kstest(proj, "norm").pvalue > 1e-3


def test_fields_plug_into_diffrax(rng):
    proc, A, _ = make_process(rng, 3, False)
    y = rng.standard_normal((7, 3))  # many paths in one state
    drift = diffrax.ODETerm(proc.drift_field)
    np.testing.assert_allclose(drift.vf(0.0, y, None), -(y - proc.mean) @ A.T, rtol=1e-13)
    g = proc.diffusion_field(0.0, y[0], None)
    np.testing.assert_array_equal(g, proc.diffusion)


def test_bad_shapes():
    with pytest.raises(ValueError, match="drift must be"):
        jaxou.OUProcess(np.ones((2, 3)), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="mean must have shape"):
        jaxou.OUProcess(np.eye(2), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="diffusion must be"):
        jaxou.OUProcess(np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="single law"):
        jaxou.OUProcess(np.eye(2), np.zeros(2), np.eye(2)).marginal(
            jaxou.Gaussian(np.zeros(3), np.eye(3)), 1.0
        )


def test_unstable_stationary_raises():
    proc = jaxou.OUProcess(np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(Exception, match="not stable"):
        proc.stationary()
    with pytest.raises(Exception, match="no stationary law"):
        proc.marginal(np.zeros(2), jnp.inf)
