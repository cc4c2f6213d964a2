import diffrax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.special
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
    # The general flow (Van Loan alone for ||A|| t <= 1, with doublings beyond) and
    # the symmetric closed form.
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


# ---------------------------------------------------------------------------
# Transient growth: stable drifts whose symmetric part is indefinite, so that
# ||e^{-At}|| grows before it decays and Σ∞ - F Σ∞ Fᵀ cancels badly at moderate t.


def _jordan_flow_reference(c, t):
    """A = I + cN (N = [[0, 1], [0, 0]]), D = I: e^{-As} = e^{-s}(I - csN), so
    Σ_t = I₀ D - c I₁ (N D + D Nᵀ) + c² I₂ N D Nᵀ with I_k = ∫_0^t s^k e^{-2s} ds
    (regularised incomplete gamma functions: no cancellation)."""
    N = np.array([[0.0, 1.0], [0.0, 0.0]])
    integrals = [
        scipy.special.gamma(k + 1)
        / 2 ** (k + 1)
        * (1.0 if np.isinf(t) else scipy.special.gammainc(k + 1, 2 * t))
        for k in range(3)
    ]
    I0, I1, I2 = integrals
    S = I0 * np.eye(2) - c * I1 * (N + N.T) + c**2 * I2 * N @ N.T
    F = np.zeros((2, 2)) if np.isinf(t) else np.exp(-t) * (np.eye(2) - c * t * N)
    return F, S


TIMES = [1e-9, 1e-3, 3e-3, 0.05, 0.3, 1.0, 3.0, 10.0, 40.0, 1e3, 1e6, np.inf]


@pytest.mark.parametrize("c", [50.0, 1000.0])
def test_transient_growth_marginal_jordan(rng, c):
    A = np.array([[1.0, c], [0.0, 1.0]])
    assert np.linalg.eigvalsh(A + A.T)[0] < 0
    proc = jaxou.OUProcess(A, rng.standard_normal(2), np.eye(2))
    m0, S0 = rng.standard_normal(2), random_psd(rng, 2)
    mu = np.asarray(proc.mean)
    # Scaling and squaring errors: about (number of squarings) x (transient growth
    # max_s ||e^{-As}|| ≈ c/e) x eps; a factor 10 above that.
    squarings = np.log2(2 * c * 1e6)
    tol = 10 * squarings * (c / np.e + 1) * np.finfo(np.float64).eps
    for t in TIMES:
        F, S = _jordan_flow_reference(c, t)
        law = proc.marginal(jaxou.Gaussian(m0, S0), t)
        assert rel_err(law.cov, F @ S0 @ F.T + S) <= tol, t
        assert rel_err(law.mean, mu + F @ (m0 - mu)) <= tol, t
        if np.isfinite(t):
            F_dt, S_dt = proc.transition(t)
            assert rel_err(S_dt, S) <= tol, t
            assert np.linalg.norm(F_dt - F) <= tol * np.linalg.norm(F) + 1e-300, t


def _quadrature_flow(A, D, t):
    """Σ_t = ∫_0^t e^{-As} D e^{-Aᵀs} ds by adaptive Gauss–Kronrod quadrature of a
    positive semi-definite integrand (no cancellation), split where it changes."""
    f = lambda s: (lambda F: F @ D @ F.T)(scipy.linalg.expm(-A * s))
    knots = np.unique(np.clip(np.r_[0.0, np.geomspace(1e-3, 10.0, 12), t], 0, t))
    return sum(
        scipy.integrate.quad_vec(f, a, b, epsrel=1e-13, epsabs=0)[0]
        for a, b in zip(knots[:-1], knots[1:])
    )


def test_transient_growth_marginal_random(rng):
    # Upper triangular: the eigenvalues (0.5 to 2) on the diagonal, a coupling of
    # size 8 above it; its symmetric part is indefinite.
    d = 6
    A = np.diag(rng.uniform(0.5, 2.0, d)) + np.triu(8 * rng.standard_normal((d, d)), 1)
    assert np.linalg.eigvalsh(A + A.T)[0] < 0
    G = rng.standard_normal((d, d)) / np.sqrt(d)
    proc = jaxou.OUProcess(A, rng.standard_normal(d), G)
    D = np.asarray(proc.diffusion_cov)
    m0, S0 = rng.standard_normal(d), random_psd(rng, d)
    mu = np.asarray(proc.mean)
    # The quadrature is good to about 1e-13; the flow to about (squarings ≤ 6) x
    # (transient growth max_s ||e^{-As}||) x eps, with a factor 10 here.
    growth = max(np.linalg.norm(scipy.linalg.expm(-A * s), 2) for s in np.linspace(0, 5, 200))
    tol = 1e-13 + 10 * 6 * growth * np.finfo(np.float64).eps
    for t in [1e-9, 1e-3, 0.05, 0.3, 1.0, 3.0, 10.0, np.inf]:
        if np.isinf(t):
            F, S = np.zeros((d, d)), scipy.linalg.solve_continuous_lyapunov(A, D)
        else:
            F, S = scipy.linalg.expm(-A * t), _quadrature_flow(A, D, t)
        law = proc.marginal(jaxou.Gaussian(m0, S0), t)
        assert rel_err(law.cov, F @ S0 @ F.T + S) <= tol, t
        err = np.linalg.norm(law.mean - mu - F @ (m0 - mu))
        assert err <= tol * np.linalg.norm(F) * np.linalg.norm(m0 - mu), t


def test_unstable_drift_has_finite_time_laws_only(rng):
    # A finite-time law exists for any drift; only t = inf needs stability.
    A = np.array([[-0.5, 3.0], [0.0, 1.0]])
    proc = jaxou.OUProcess(A, np.zeros(2), np.eye(2))
    t = 0.7
    F = scipy.linalg.expm(-A * t)
    S = _quadrature_flow(A, np.eye(2), t)
    law = proc.marginal(np.zeros(2), t)
    assert rel_err(law.cov, S) <= 1e-11
    with pytest.raises(Exception, match="not stable"):
        proc.marginal(np.zeros(2), jnp.inf)
    np.testing.assert_allclose(proc.transition(t)[0], F, rtol=1e-12)


def test_flow_factor():
    from jaxou._flow import flow_factor

    # (1 - e^{-st}) / s with its limits: s = 0 gives t, t = inf gives 1/s.
    s = np.array([0.0, 1e-300, 1e-12, 1e-3, 2.0, -0.5])
    t = 0.7
    ref = np.array(
        [
            t,
            t,
            t * (1 - 1e-12 * t / 2),
            -np.expm1(-1e-3 * t) / 1e-3,
            -np.expm1(-2 * t) / 2,
            -np.expm1(0.5 * t) / -0.5,
        ]
    )
    np.testing.assert_allclose(flow_factor(jnp.asarray(s), t), ref, rtol=1e-15)
    np.testing.assert_array_equal(flow_factor(jnp.asarray(s[1:]), jnp.inf), 1 / s[1:])
    assert flow_factor(jnp.asarray(0.0), jnp.inf) == jnp.inf
    # A singular symmetric drift: the flow along its kernel is plain diffusion.
    F, S = jaxou.OUProcess(np.diag([0.0, 1.0]), np.zeros(2), np.eye(2)).transition(t)
    np.testing.assert_allclose(S, np.diag([t, -np.expm1(-2 * t) / 2]), rtol=1e-15)
