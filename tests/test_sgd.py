import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import jaxou

from helpers import random_psd, random_spd, rel_err


def make_stage(rng, d=4, lr=0.1, batch_size=16.0):
    return jaxou.SGDStage(
        random_spd(rng, d, 50), random_psd(rng, d), rng.standard_normal(d), lr, batch_size
    )


def test_stationary_is_lyapunov_of_scaled_noise(rng):
    stage = make_stage(rng)
    H, C = np.asarray(stage.hessian), np.asarray(stage.noise_cov)
    ref = scipy.linalg.solve_continuous_lyapunov(H, 0.1 / 16 * C)
    assert rel_err(stage.stationary().cov, ref) < 1e-12
    proc = stage.process
    np.testing.assert_allclose(proc.diffusion_cov, 0.1 / 16 * C, atol=1e-15)
    assert rel_err(proc.stationary().cov, ref) < 1e-10


def test_isotropic_closed_form():
    # H = h I, C = c I:  Σ∞ = η c / (2 B h) I  (Mandt et al. 2017).
    d, h, c, lr, B = 3, 2.0, 0.5, 0.05, 8.0
    stage = jaxou.SGDStage(h * np.eye(d), c * np.eye(d), np.zeros(d), lr, B)
    np.testing.assert_allclose(stage.stationary().cov, lr * c / (2 * B * h) * np.eye(d), rtol=1e-14)


def test_marginal_matches_process(rng):
    stage = make_stage(rng)
    init = jaxou.Gaussian(np.zeros(4), np.eye(4))
    a = stage.marginal(init, 3.0)
    b = stage.process.marginal(init, 3.0)
    assert rel_err(a.cov, b.cov) < 1e-10
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hessian=np.array([[1.0, 0.5], [0.0, 1.0]])), "hessian is not symmetric"),
        (dict(hessian=np.diag([1.0, -1.0])), "hessian is not positive definite"),
        (dict(noise_cov=np.diag([1.0, -1.0])), "noise_cov is not positive semi-definite"),
        (dict(batch_size=-4), "batch_size must be positive"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(minimum=np.zeros(3)), r"hessian must be a \[3, 3\]"),
        (dict(lr=np.ones(2)), "lr must be a scalar"),
    ],
)
def test_bad_stage(kwargs, match):
    args = dict(hessian=np.eye(2), noise_cov=np.eye(2), minimum=np.zeros(2), lr=0.1, batch_size=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        jaxou.SGDStage(**args)


def test_traced_bad_lr_raises_at_run_time():
    f = jax.jit(
        lambda lr: jaxou.SGDStage(jnp.eye(2), jnp.eye(2), jnp.zeros(2), lr, 8.0).stationary().cov
    )
    with pytest.raises(Exception, match="lr must be > 0"):
        f(-0.1).block_until_ready()


def make_two_stage(rng, d=4, t1=5.0, t2=2.0):
    init = jaxou.Gaussian.isotropic(np.zeros(d), 1.0)
    return jaxou.TwoStage(
        init, make_stage(rng, d), make_stage(rng, d, lr=0.01, batch_size=4.0), t1, t2
    )


def test_two_stage_laws_compose(rng):
    model = make_two_stage(rng)
    pre, fine = model.laws()

    # Reference: each stage's marginal with SciPy's expm and Lyapunov solve.
    def scipy_marginal(stage, m0, S0, t):
        H, C, mu = map(np.asarray, (stage.hessian, stage.noise_cov, stage.minimum))
        F = scipy.linalg.expm(-H * t)
        S_inf = scipy.linalg.solve_continuous_lyapunov(H, float(stage.lr / stage.batch_size) * C)
        return mu + F @ (m0 - mu), S_inf + F @ (S0 - S_inf) @ F.T

    m1, S1 = scipy_marginal(model.pretrain, np.zeros(4), np.eye(4), 5.0)
    m2, S2 = scipy_marginal(model.finetune, m1, S1, 2.0)
    np.testing.assert_allclose(pre.mean, m1, rtol=1e-10)
    assert rel_err(pre.cov, S1) < 1e-10
    np.testing.assert_allclose(fine.mean, m2, rtol=1e-10)
    assert rel_err(fine.cov, S2) < 1e-10
    assert rel_err(model.finetuned().cov, S2) < 1e-10


def test_two_stage_marginal_over_time(rng):
    """`TwoStage.marginal(t)` against SciPy's expm and Lyapunov solve, on both sides of
    the stage boundary, for an array of times (and its ends equal `laws()`)."""
    model = make_two_stage(rng)  # t_pretrain 5, t_finetune 2
    H1, C1, mu1 = (
        np.asarray(x)
        for x in (model.pretrain.hessian, model.pretrain.noise_cov, model.pretrain.minimum)
    )
    H2, C2, mu2 = (
        np.asarray(x)
        for x in (model.finetune.hessian, model.finetune.noise_cov, model.finetune.minimum)
    )

    def step(H, C, mu, scale, m0, S0, t):
        F = scipy.linalg.expm(-H * t)
        S_inf = scipy.linalg.solve_continuous_lyapunov(H, scale * C)
        return mu + F @ (m0 - mu), S_inf + F @ (S0 - S_inf) @ F.T

    s1 = float(model.pretrain.lr / model.pretrain.batch_size)
    s2 = float(model.finetune.lr / model.finetune.batch_size)
    m1, S1 = step(H1, C1, mu1, s1, np.zeros(4), np.eye(4), 5.0)
    ts = np.array([[0.0, 1.3, 5.0], [5.5, 6.1, 7.0]])
    laws = model.marginal(ts)
    assert laws.batch_shape == (2, 3)
    for idx in np.ndindex(ts.shape):
        t = ts[idx]
        if t <= 5.0:
            m, S = step(H1, C1, mu1, s1, np.zeros(4), np.eye(4), t)
        else:
            m, S = step(H2, C2, mu2, s2, m1, S1, t - 5.0)
        np.testing.assert_allclose(laws.mean[idx], m, rtol=1e-10, atol=1e-13)
        assert rel_err(laws.cov[idx], S) < 1e-10, (t, rel_err(laws.cov[idx], S))
    pre, fine = model.laws()
    np.testing.assert_allclose(laws.cov[0, 2], pre.cov, rtol=1e-12)
    np.testing.assert_allclose(laws.cov[1, 2], fine.cov, rtol=1e-12)
    # Traced times: under jit, and differentiable in t.
    tr = jax.jit(lambda t: model.marginal(t).cov.trace())
    np.testing.assert_allclose(tr(6.1), np.trace(laws.cov[1, 1]), rtol=1e-12)
    g = jax.grad(lambda t: model.marginal(t).cov.trace())(6.1)
    fd = (tr(6.1 + 1e-5) - tr(6.1 - 1e-5)) / 2e-5
    assert abs(g - fd) < 1e-6 * max(1.0, abs(fd))


def test_two_stage_infinite_durations(rng):
    model = make_two_stage(rng, t1=jnp.inf, t2=jnp.inf)
    pre, fine = model.laws()
    np.testing.assert_allclose(pre.cov, model.pretrain.stationary().cov, rtol=1e-12)
    np.testing.assert_allclose(fine.cov, model.finetune.stationary().cov, rtol=1e-12)
    np.testing.assert_allclose(fine.mean, model.finetune.minimum, rtol=1e-12)


def test_two_stage_zero_duration_keeps_init(rng):
    model = make_two_stage(rng, t1=0.0)
    np.testing.assert_allclose(model.pretrained().cov, np.eye(4), atol=1e-14)


def test_two_stage_errors(rng):
    s = make_stage(rng)
    init = jaxou.Gaussian.isotropic(np.zeros(4), 1.0)
    with pytest.raises(ValueError, match="t_pretrain must be >= 0"):
        jaxou.TwoStage(init, s, s, -1.0, 1.0)
    with pytest.raises(ValueError, match="dimensions differ"):
        jaxou.TwoStage(jaxou.Gaussian.isotropic(np.zeros(3), 1.0), s, s, 1.0, 1.0)
    with pytest.raises(TypeError, match="pretrain must be a jaxou.SGDStage"):
        jaxou.TwoStage(init, "stage", s, 1.0, 1.0)


def test_gradient_wrt_lr_and_batch_size(rng):
    d = 3
    H, C, mu = random_spd(rng, d, 10), random_psd(rng, d), rng.standard_normal(d)

    def trace_cov(lr, B):
        return jnp.trace(jaxou.SGDStage(H, C, mu, lr, B).stationary().cov)

    g_lr, g_B = jax.grad(trace_cov, argnums=(0, 1))(0.1, 16.0)
    h = 1e-6
    fd_lr = (trace_cov(0.1 + h, 16.0) - trace_cov(0.1 - h, 16.0)) / (2 * h)
    fd_B = (trace_cov(0.1, 16.0 + h) - trace_cov(0.1, 16.0 - h)) / (2 * h)
    np.testing.assert_allclose(g_lr, fd_lr, rtol=1e-7)
    np.testing.assert_allclose(g_B, fd_B, rtol=1e-7)
    # Σ∞ is linear in η/B: dtr/dη = tr/η.
    np.testing.assert_allclose(g_lr, trace_cov(0.1, 16.0) / 0.1, rtol=1e-12)
