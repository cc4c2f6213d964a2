from decimal import Decimal, getcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

import jaxou

from helpers import random_psd, random_spd


def mcallester_ref(kl, n, delta, risk):
    return risk + np.sqrt((kl + np.log(2 * np.sqrt(n) / delta)) / (2 * n))


def binary_kl_ref(q, p):
    from scipy.special import xlogy

    return xlogy(q, q) - xlogy(q, p) + xlogy(1 - q, 1 - q) - xlogy(1 - q, 1 - p)


def kl_inverse_ref(q, c):
    f = lambda p: binary_kl_ref(q, p) - c
    if f(1 - 1e-15) <= 0:
        return 1.0
    return scipy.optimize.brentq(f, q, 1 - 1e-15, xtol=1e-15, rtol=1e-15)


def test_mcallester_formula(rng):
    kl = rng.uniform(0, 50, 10)
    n = rng.uniform(10, 1e6, 10)
    delta = rng.uniform(0.01, 0.2, 10)
    risk = rng.uniform(0, 0.5, 10)
    got = jaxou.pac_bayes_bound(kl, n, delta, empirical_risk=risk)
    np.testing.assert_allclose(got, mcallester_ref(kl, n, delta, risk), rtol=1e-14)


def binary_kl_decimal(q, p):
    getcontext().prec = 60
    q, p = Decimal(float(q)), Decimal(float(p))
    out = Decimal(0)
    if q > 0:
        out += q * (q / p).ln()
    if q < 1:
        out += (1 - q) * ((1 - q) / (1 - p)).ln()
    return out


def test_binary_kl_against_decimal(rng):
    for q, p in [
        (0.2, 0.55),
        (0.3, 0.3 + 1e-7),
        (0.0, 0.2),
        (1.0, 0.9),
        (0.01, 0.5),
        (0.7, 0.69999),
    ]:
        ref = float(binary_kl_decimal(q, p))
        assert abs(float(jaxou.binary_kl(q, p)) - ref) <= 1e-14 * ref


def test_kl_inverse_against_brentq(rng):
    qs = np.concatenate([[0.0, 0.0, 0.3, 0.9999], rng.uniform(0, 1, 8)])
    cs = np.concatenate([[1e-6, 2.0, 1e-9, 0.5], rng.uniform(1e-4, 1.0, 8)])
    got = np.asarray(jaxou.kl_inverse(qs, cs))
    for q, c, p in zip(qs, cs, got):
        assert q <= p <= 1
        assert abs(p - kl_inverse_ref(q, c)) <= 1e-9 * p
        if p == 1.0:
            continue
        # Independent 60-digit check: p - p* ≈ (kl(q‖p) - c) / ∂_p kl. The result is
        # the root to within a few ulps, and below it only by kl's own rounding.
        gap = binary_kl_decimal(q, p) - Decimal(float(c))
        slope = Decimal(float((p - q) / (p * (1 - p))))
        offset = float(gap / slope) / p
        eps = np.finfo(np.float64).eps
        # Below the root only by what kl's own rounding (a few ulps of c, here 4)
        # moves the root, plus p's own last ulp.
        below = 4 * eps * c / (float(slope) * p) + eps
        assert -below <= offset <= 4 * eps, (q, c, p, offset)
    # q = 0: closed form p = 1 - e^{-c}.
    np.testing.assert_allclose(jaxou.kl_inverse(0.0, 0.3), -np.expm1(-0.3), rtol=1e-14)


def test_kl_bound_tighter_than_mcallester(rng):
    kl = rng.uniform(0, 100, 50)
    n = rng.uniform(10, 1e5, 50)
    risk = rng.uniform(0, 0.3, 50)
    a = jaxou.pac_bayes_bound(kl, n, 0.05, empirical_risk=risk, kind="kl")
    b = jaxou.pac_bayes_bound(kl, n, 0.05, empirical_risk=risk, kind="mcallester")
    assert np.all(a <= b + 1e-15)
    assert np.all(a >= risk)


@pytest.mark.parametrize("kind", ["mcallester", "kl"])
def test_gradients_against_finite_differences(kind):
    x0 = np.array([7.0, 2000.0, 0.05, 0.08])

    def f(x):
        return jaxou.pac_bayes_bound(x[0], x[1], x[2], empirical_risk=x[3], kind=kind)

    g = np.asarray(jax.jit(jax.grad(f))(x0))
    for i in range(4):
        h = 1e-6 * x0[i]
        e = np.zeros(4)
        e[i] = h
        fd = (f(x0 + e) - f(x0 - e)) / (2 * h)
        np.testing.assert_allclose(g[i], fd, rtol=1e-6)


def test_broadcast_and_vmap():
    kl = np.linspace(0, 10, 5)
    got = jaxou.pac_bayes_bound(kl[:, None], np.array([100.0, 1000.0]), 0.05, kind="kl")
    assert got.shape == (5, 2)
    vm = jax.vmap(lambda k: jaxou.pac_bayes_bound(k, 1000.0, 0.05, kind="kl"))(kl)
    np.testing.assert_allclose(vm, got[:, 1], rtol=1e-14)


def test_one_over_sqrt_n():
    # For a fixed KL the complexity term is O(1/sqrt N): quadrupling N halves it up
    # to the slowly varying ln(2 sqrt N / delta).
    n = np.array([1e4, 4e4, 1.6e5])
    t = np.asarray(jaxou.pac_bayes_bound(50.0, n, 0.05))
    ratio = t[1:] / t[:-1]
    expected = (
        np.sqrt(
            (50 + np.log(2 * np.sqrt(n[1:]) / 0.05)) / (50 + np.log(2 * np.sqrt(n[:-1]) / 0.05))
        )
        / 2
    )
    np.testing.assert_allclose(ratio, expected, rtol=1e-12)
    assert np.all(np.abs(ratio - 0.5) < 0.02)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((1.0, 100.0, 1.5), {}, r"delta must lie in \(0, 1\)"),
        ((1.0, 100.0, 0.0), {}, r"delta must lie in \(0, 1\)"),
        ((1.0, 0.5, 0.05), {}, r"n must lie in \[1"),
        ((-1.0, 100.0, 0.05), {}, r"kl must lie in \[0"),
        ((1.0, 100.0, 0.05), {"empirical_risk": 1.2}, r"empirical_risk must lie in \[0, 1\]"),
        ((1.0, 100.0, 0.05), {"kind": "catoni2"}, "unknown kind"),
        ((np.ones(2), np.ones(3) * 10, 0.05), {}, "do not broadcast"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxou.pac_bayes_bound(*args, **kwargs)


def test_bad_argument_under_jit():
    f = jax.jit(lambda d: jaxou.pac_bayes_bound(1.0, 100.0, d))
    with pytest.raises(Exception, match="delta must lie"):
        f(2.0).block_until_ready()


def _stage(rng, d, lr, B, shift=0.0, scale=1.0):
    return jaxou.SGDStage(
        scale * random_spd(rng, d, 10), random_psd(rng, d), shift * np.ones(d), lr, B
    )


def test_domain_discrepancy(rng):
    d = 4
    src = _stage(rng, d, 0.1, 32)
    tgt = _stage(rng, d, 0.05, 8, shift=0.3, scale=2.0)
    total, cov, shift = jaxou.domain_discrepancy(src, tgt)
    ref = jaxou.kl_parts(tgt.stationary(), src.stationary())
    np.testing.assert_allclose([total, cov, shift], ref, rtol=1e-14)
    # Same covariance, shifted minimum: only the shift term.
    moved = jaxou.SGDStage(src.hessian, src.noise_cov, src.minimum + 0.1, src.lr, src.batch_size)
    parts = jaxou.domain_discrepancy(src, moved)
    np.testing.assert_allclose(parts.covariance, 0.0, atol=1e-12)
    Sinv = np.linalg.inv(np.asarray(src.stationary().cov))
    np.testing.assert_allclose(parts.shift, 0.5 * 0.01 * np.sum(Sinv), rtol=1e-10)
    with pytest.raises(TypeError, match="source must be"):
        jaxou.domain_discrepancy("x", tgt)


def test_two_stage_bound_shows_which_term_dominates(rng):
    d = 4
    model = jaxou.TwoStage(
        jaxou.Gaussian.isotropic(np.zeros(d), 1.0),
        _stage(rng, d, 0.1, 32),
        _stage(rng, d, 0.05, 8, shift=0.3, scale=2.0),
        50.0,
        5.0,
    )
    out = jaxou.two_stage_bound(model, 1e6, 1e3, 0.05, empirical_risk_target=0.1, kind="kl")
    pre, fine = model.laws()
    np.testing.assert_allclose(out.pretrain_kl.total, jaxou.kl(pre, model.init), rtol=1e-14)
    np.testing.assert_allclose(out.finetune_kl.total, jaxou.kl(fine, pre), rtol=1e-14)
    b2 = jaxou.pac_bayes_bound(out.finetune_kl.total, 1e3, 0.05, empirical_risk=0.1, kind="kl")
    np.testing.assert_allclose(out.finetune_bound, b2, rtol=1e-14)
    np.testing.assert_allclose(out.finetune_term, b2 - 0.1, rtol=1e-14)
    assert bool(out.finetune_dominates) == bool(out.finetune_term > out.pretrain_term)
    assert bool(out.finetune_dominates)  # N_T ≪ N_S
    # Swap the sample sizes: now the same KLs make pre-training dominate.
    swapped = jaxou.two_stage_bound(model, 1e2, 1e9, 0.05)
    assert not bool(swapped.finetune_dominates)


def test_two_stage_bound_gradient(rng):
    d = 3
    H1, C1 = random_spd(rng, d, 5), random_psd(rng, d)
    H2, C2 = random_spd(rng, d, 5), random_psd(rng, d)

    def term(lr_t):
        model = jaxou.TwoStage(
            jaxou.Gaussian.isotropic(jnp.zeros(d), 1.0),
            jaxou.SGDStage(H1, C1, jnp.ones(d), 0.1, 32.0),
            jaxou.SGDStage(H2, C2, -jnp.ones(d), lr_t, 8.0),
            20.0,
            3.0,
        )
        return jaxou.two_stage_bound(model, 1e5, 1e3, kind="kl").finetune_bound

    g = jax.grad(term)(0.05)
    h = 1e-7
    fd = (term(0.05 + h) - term(0.05 - h)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    q=st.floats(0.0, 0.99, allow_subnormal=False),
    gap=st.floats(1e-6, 0.99, allow_subnormal=False),
)
def test_kl_inverse_inverts_binary_kl(q, gap):
    # Property: for p in (q, 1), kl^{-1}(q, kl(q‖p)) = p, and binary kl is >= 0.
    p = q + gap * (1 - q)
    if not q < p < 1:
        return
    c = float(jaxou.binary_kl(q, p))
    assert c >= 0
    back = float(jaxou.kl_inverse(q, c))
    # p is recovered to the conditioning of the inversion: δp ≈ δc / ∂_p kl.
    slope = (p - q) / (p * (1 - p))
    assert abs(back - p) <= 8 * np.finfo(float).eps * max(c / slope, p) + 1e-15
