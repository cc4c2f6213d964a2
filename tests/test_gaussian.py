from decimal import Decimal, getcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import jaxou

from helpers import central_diff, random_spd


def kl_reference(mp, Sp, mq, Sq):
    d = len(mp)
    Sq_inv = np.linalg.inv(Sq)
    M = Sq_inv @ Sp
    cov = 0.5 * (np.trace(M) - d - np.linalg.slogdet(M)[1])
    diff = mp - mq
    shift = 0.5 * diff @ Sq_inv @ diff
    return cov + shift, cov, shift


def random_gaussian(rng, d, cond=10.0):
    return rng.standard_normal(d), random_spd(rng, d, cond) * rng.uniform(0.5, 2)


@pytest.mark.parametrize("d", [1, 4, 20])
def test_kl_parts_against_closed_form(rng, d):
    mp, Sp = random_gaussian(rng, d)
    mq, Sq = random_gaussian(rng, d, cond=100.0)
    parts = jaxou.kl_parts(jaxou.Gaussian(mp, Sp), jaxou.Gaussian(mq, Sq))
    ref = kl_reference(mp, Sp, mq, Sq)
    np.testing.assert_allclose(parts, ref, rtol=1e-10)
    np.testing.assert_allclose(parts.total, parts.covariance + parts.shift, rtol=1e-14)
    p = jaxou.Gaussian(mp, Sp)
    np.testing.assert_allclose(jaxou.kl(p, p), 0.0, atol=1e-13)
    np.testing.assert_allclose(p.kl(jaxou.Gaussian(mq, Sq)), ref[0], rtol=1e-10)


def test_tiny_kl_keeps_relative_accuracy():
    # Diagonal covariances a vs b = a(1 + ε): the naive tr - d - logdet formula
    # cancels to noise, the reference uses 50-digit decimals.
    getcontext().prec = 50
    a = np.array([0.3, 1.7, 2.2])
    eps = np.array([1e-7, -3e-8, 2e-9])
    b = a * (1 + eps)
    ref = Decimal(0)
    for ai, bi in zip(a, b):
        r = Decimal(float(ai)) / Decimal(float(bi))
        ref += r - 1 - r.ln()
    ref = float(ref / 2)
    got = float(
        jaxou.kl(jaxou.Gaussian(np.zeros(3), np.diag(a)), jaxou.Gaussian(np.zeros(3), np.diag(b)))
    )
    assert abs(got - ref) <= 1e-8 * ref


def test_batch_broadcast_and_vmap(rng):
    d = 5
    ps = [random_gaussian(rng, d) for _ in range(4)]
    q = random_gaussian(rng, d)
    P = jaxou.Gaussian(np.stack([m for m, _ in ps]), np.stack([S for _, S in ps]))
    Q = jaxou.Gaussian(*q)
    assert P.batch_shape == (4,)
    out = jaxou.kl(P, Q)
    assert out.shape == (4,)
    loop = [kl_reference(m, S, *q)[0] for m, S in ps]
    np.testing.assert_allclose(out, loop, rtol=1e-10)
    vm = jax.vmap(jaxou.kl, in_axes=(0, None))(P, Q)
    np.testing.assert_allclose(vm, loop, rtol=1e-10)


def test_kl_gradient(rng):
    d = 3
    mp, Sp = random_gaussian(rng, d)
    mq, Sq = random_gaussian(rng, d)

    def f(S):
        S = 0.5 * (S + S.T)
        return jaxou.kl(jaxou.Gaussian(mp, S), jaxou.Gaussian(mq, Sq))

    g = np.asarray(jax.grad(f)(Sp))
    E = rng.standard_normal((d, d))
    E = E + E.T
    fd = central_diff(lambda S: float(f(S)), Sp, E)
    assert abs(np.sum(g * E) - fd) <= 1e-7 * abs(fd)


def test_w2_against_sqrtm(rng):
    d = 6
    (m1, S1), (m2, S2) = random_gaussian(rng, d), random_gaussian(rng, d)
    r1 = scipy.linalg.sqrtm(S1)
    cross = np.real(scipy.linalg.sqrtm(r1 @ S2 @ r1))
    ref = np.sqrt(np.sum((m1 - m2) ** 2) + np.trace(S1 + S2 - 2 * cross))
    got = jaxou.w2(jaxou.Gaussian(m1, S1), jaxou.Gaussian(m2, S2))
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    # Point masses: W2 is the Euclidean distance.
    np.testing.assert_allclose(
        jaxou.w2(jaxou.Gaussian.point(m1), jaxou.Gaussian.point(m2)), np.linalg.norm(m1 - m2)
    )


def test_log_prob_against_scipy(rng):
    d = 4
    m, S = random_gaussian(rng, d)
    x = rng.standard_normal((7, d))
    got = jaxou.Gaussian(m, S).log_prob(x)
    np.testing.assert_allclose(got, scipy.stats.multivariate_normal(m, S).logpdf(x), rtol=1e-12)


def test_sampling_moments_within_standard_errors(key, rng):
    d, n = 3, 40_000
    m, S = random_gaussian(rng, d)
    x = np.asarray(jaxou.Gaussian(m, S).sample(key, (n,)))
    assert x.shape == (n, d)
    se_mean = np.sqrt(np.diag(S) / n)
    assert np.all(np.abs(x.mean(0) - m) <= 5 * se_mean)
    emp = np.cov(x.T)
    se_cov = np.sqrt((np.outer(np.diag(S), np.diag(S)) + S**2) / n)
    assert np.all(np.abs(emp - S) <= 5 * se_cov)
    # Kolmogorov–Smirnov on a random projection.
    u = rng.standard_normal(d)
    proj = (x - m) @ u / np.sqrt(u @ S @ u)
    assert scipy.stats.kstest(proj, "norm").pvalue > 1e-3


def test_point_mass_and_dtype(key):
    g = jaxou.Gaussian.point(jnp.ones(3, jnp.float32))
    s = g.sample(key, (5,))
    assert s.dtype == jnp.float32
    np.testing.assert_allclose(s, 1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="dimension"):
        jaxou.Gaussian(np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="cov must be"):
        jaxou.Gaussian(np.zeros(3), np.zeros(3))
    with pytest.raises(TypeError, match="dtype|float"):
        jaxou.Gaussian(jnp.zeros(2, jnp.float32), jnp.eye(2, dtype=jnp.float64))
    with pytest.raises(ValueError, match="dimensions differ"):
        jaxou.kl(jaxou.Gaussian(np.zeros(2), np.eye(2)), jaxou.Gaussian(np.zeros(3), np.eye(3)))
    with pytest.raises(ValueError, match="std"):
        jaxou.Gaussian.isotropic(np.zeros(2), -1.0)
