"""Estimation (layer 7): the minimum, the Hessian, the gradient-noise covariance and
real SGD, each against an independent reference (finite differences, a Python loop,
numpy.linalg.eigh, the discrete Lyapunov equation)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxou

N, P, K = 200, 4, 3  # examples, features, classes: d = P*K + K = 15
REG = 0.05


def _loss(params, x, y):
    logits = x @ params["W"] + params["b"]
    reg = 0.5 * REG * (jnp.sum(params["W"] ** 2) + jnp.sum(params["b"] ** 2))
    return -jax.nn.log_softmax(logits)[y] + reg


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(1234)
    X = rng.standard_normal((N, P))
    Y = np.argmax(X @ rng.standard_normal((P, K)) + rng.standard_normal((N, K)), 1)
    p0 = {"W": jnp.zeros((P, K)), "b": jnp.zeros(K)}
    minimum = jaxou.train_to_minimum(_loss, p0, (X, Y), steps=60)
    H = jaxou.estimate_hessian(_loss, minimum.params, (X, Y))
    return X, Y, minimum, np.asarray(H)


def test_minimum(problem):
    X, Y, minimum, H = problem
    assert minimum.params["W"].shape == (P, K)
    assert float(minimum.grad_norm) < 1e-8
    assert np.all(np.linalg.eigvalsh(H) >= REG * (1 - 1e-10))
    # The mean loss at the minimum is below its value at nearby points.
    theta, unravel = jaxou.flatten_params(minimum.params)
    L = lambda t: float(np.mean([_loss(unravel(t), x, y) for x, y in zip(X[:20], Y[:20])]))
    assert np.isfinite(L(theta))


def test_minibatch_training_with_adam(problem, key):
    X, Y, minimum, _ = problem
    p0 = {"W": jnp.zeros((P, K)), "b": jnp.zeros(K)}
    out = jaxou.train_to_minimum(
        _loss, p0, (X, Y), optimizer=optax.adam(0.05), steps=300, batch_size=32, key=key
    )
    assert out.losses.shape == (300,)
    assert float(out.loss) < float(minimum.loss) + 0.05


def test_hessian_against_finite_differences(problem):
    """Central differences of the (exact) gradient, float64: error O(h²) + O(eps/h)."""
    X, Y, minimum, H = problem
    theta, unravel = jaxou.flatten_params(minimum.params)
    grad = jax.jit(
        jax.grad(lambda t: jnp.mean(jax.vmap(lambda x, y: _loss(unravel(t), x, y))(X, Y)))
    )
    d, h = theta.size, 1e-5
    fd = np.stack(
        [(grad(theta + h * e) - grad(theta - h * e)) / (2 * h) for e in np.eye(d)], axis=1
    )
    np.testing.assert_allclose(H, 0.5 * (fd + fd.T), atol=1e-8 * np.abs(H).max() + 1e-9)


def test_noise_cov_against_python_loop(problem):
    X, Y, minimum, _ = problem
    theta, unravel = jaxou.flatten_params(minimum.params)
    g = jax.jit(jax.grad(lambda t, x, y: _loss(unravel(t), x, y)))
    G = np.stack([np.asarray(g(theta, X[i], Y[i])) for i in range(N)])
    ref = np.cov(G.T, bias=True)
    C = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y))
    np.testing.assert_allclose(C, ref, rtol=1e-10, atol=1e-13)
    low = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), method="lowrank", k=4)
    lam = np.linalg.eigvalsh(ref)[::-1]
    np.testing.assert_allclose(low.values, lam[:4], rtol=1e-8)
    np.testing.assert_allclose(low.diagonal(), np.diag(ref), atol=1e-12)
    assert np.all(low.residual_stderr == 0)


def test_lanczos_matches_eigh(problem, key):
    X, Y, minimum, H = problem
    k = 5
    est = jaxou.estimate_hessian(_loss, minimum.params, (X, Y), method="lanczos", k=k, key=key)
    lam, V = np.linalg.eigh(H)
    lam, V = lam[::-1], V[:, ::-1]
    np.testing.assert_allclose(est.values, lam[:k], rtol=1e-9)
    # Eigenvectors up to sign (the top eigenvalues are simple here).
    assert np.min(np.diff(-lam[: k + 1])) > 1e-4
    overlap = np.abs(np.sum(np.asarray(est.vectors) * V[:, :k], 0))
    np.testing.assert_allclose(overlap, 1, atol=1e-7)


def test_hutchinson_within_standard_error(problem, key):
    """z = (estimate - exact)/stderr per diagonal entry. With 400 probes each z is
    close to N(0, 1) (CLT; the stderr is estimated from the same probes): P(|z| > 4.5)
    ~ 7e-6 per entry, so over d = 15 entries a false alarm has probability ~1e-4."""
    X, Y, minimum, H = problem
    est = jaxou.estimate_hessian(
        _loss, minimum.params, (X, Y), method="lanczos", k=3, n_probes=400, key=key
    )
    lam, V = np.linalg.eigh(H)
    residual = np.diag(H - (V[:, -3:] * lam[-3:]) @ V[:, -3:].T)
    z = (np.asarray(est.residual_diagonal) - residual) / np.asarray(est.residual_stderr)
    assert np.all(est.residual_stderr > 0)
    assert np.max(np.abs(z)) < 4.5, z
    # The plain (undeflated) Hutchinson estimator, checked the same way.
    theta, unravel = jaxou.flatten_params(minimum.params)
    mv = lambda v: jnp.asarray(H) @ v
    diag, se = jaxou.hutchinson_diagonal(mv, theta.size, key=key, n_probes=400)
    assert np.max(np.abs((diag - np.diag(H)) / se)) < 4.5


def test_equinox_module_and_stage(key):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((64, 3))
    Y = np.sin(X @ np.array([1.0, -0.5, 0.3]))
    model = eqx.nn.MLP(3, "scalar", 4, 1, activation=jnp.tanh, key=key)

    def loss(m, x, y):
        arrays = eqx.filter(m, eqx.is_inexact_array)
        reg = sum(jnp.sum(a**2) for a in jax.tree.leaves(arrays))
        return 0.5 * (m(x) - y) ** 2 + 0.5 * 0.1 * reg

    theta, unravel = jaxou.flatten_params(model)
    back = unravel(theta)
    assert isinstance(back, eqx.nn.MLP) and np.allclose(back(X[0]), model(X[0]))
    est = jaxou.estimate_stage(loss, model, (X, Y), lr=0.1, batch_size=8, train_steps=60)
    assert isinstance(est.stage, jaxou.SGDStage) and est.stage.dim == theta.size
    assert float(est.grad_norm) < 1e-6
    assert isinstance(est.unravel(est.stage.minimum), eqx.nn.MLP)
    law = est.stage.stationary()
    assert np.all(np.isfinite(law.cov))
    # The structured path returns its factors; its dense form is close to the dense H.
    s = jaxou.estimate_stage(
        loss,
        est.params,
        (X, Y),
        lr=0.1,
        batch_size=8,
        train_steps=0,
        hessian_method="lanczos",
        noise_method="lowrank",
        k=theta.size - 2,
        n_probes=50,
        key=key,
    )
    assert isinstance(s.hessian, jaxou.LowRankPlusDiagonal)
    top = np.linalg.eigvalsh(est.stage.hessian)[::-1][: theta.size - 2]
    np.testing.assert_allclose(s.hessian.values, top, rtol=1e-8)


def test_errors(problem):
    X, Y, minimum, _ = problem
    with pytest.raises(ValueError, match="unknown method"):
        jaxou.estimate_hessian(_loss, minimum.params, (X, Y), method="qr")
    with pytest.raises(ValueError, match="needs a key"):
        jaxou.estimate_hessian(_loss, minimum.params, (X, Y), method="lanczos")
    with pytest.raises(ValueError, match="unknown method"):
        jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), method="svd")
    with pytest.raises(ValueError, match="leading"):
        jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y[:-1]))
    with pytest.raises(TypeError, match="pair"):
        jaxou.estimate_noise_cov(_loss, minimum.params, X)
    with pytest.raises(ValueError, match="k must"):
        jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), method="lowrank", k=999)
    with pytest.raises(ValueError, match="no floating-point"):
        jaxou.flatten_params({"a": 1})


def test_discrete_lyapunov_closed_form(rng):
    d = 4
    A = rng.standard_normal((d, d))
    H = A @ A.T / d + 0.2 * np.eye(d)
    B = rng.standard_normal((d, d))
    C = B @ B.T
    lr, bs = 0.3, 5.0
    S = np.asarray(jaxou.sgd_stationary_cov(H, C, lr, bs))
    M = np.eye(d) - lr * H
    np.testing.assert_allclose(S, M @ S @ M.T + lr**2 / bs * C, atol=1e-12)
    cont = np.asarray(jaxou.SGDStage(H, C, np.zeros(d), lr, bs).stationary().cov)
    np.testing.assert_allclose(S, cont, rtol=2 * lr * np.linalg.eigvalsh(H).max())


def _exact_sgd_cov(X, r, lr, bs):
    """The exact stationary covariance of SGD (mini-batches with replacement) on
    least squares: δ' = (I - ηĤ_b)δ - η ḡ_b with Ĥ_b = mean of x xᵀ over the batch
    and ḡ_b = mean of x r. Second moments: Σ' = Σ - η(HΣ + ΣH) + η²[HΣH +
    (E[x xᵀΣ x xᵀ] - HΣH)/B] + η² C/B; solved as a d²×d² linear system."""
    n, d = X.shape
    H = X.T @ X / n
    G = X * r[:, None]
    C = G.T @ G / n
    eye = np.eye(d)
    # vec(AΣB) = (Bᵀ ⊗ A) vec(Σ) (column-major vec), Σ symmetric.
    fourth = sum(np.kron(np.outer(x, x), np.outer(x, x)) for x in X) / n
    HH = np.kron(H, H)
    T = (
        np.kron(eye, eye)
        - lr * (np.kron(eye, H) + np.kron(H, eye))
        + lr**2 * (HH + (fourth - HH) / bs)
    )
    vec = np.linalg.solve(np.eye(d * d) - T, lr**2 / bs * C.reshape(-1, order="F"))
    S = vec.reshape(d, d, order="F")
    return 0.5 * (S + S.T), H, C


@pytest.mark.slow
def test_sgd_matches_lyapunov_on_linear_gaussian(key):
    """Linear regression, Gaussian inputs, squared loss: the loss is exactly quadratic,
    so the OU model's only approximations are (a) continuous time and (b) a constant
    gradient-noise covariance. SGD with mini-batches drawn with replacement has

        δ' = (I - ηH)δ - η[(Ĥ_b - H)δ + ḡ_b],

    whose stationary covariance is Σ_exact (`_exact_sgd_cov`): the discrete
    Lyapunov equation Σ = (I-ηH)Σ(I-ηH)ᵀ + (η²/B)C plus the multiplicative-noise term
    η²(E[xxᵀΣxxᵀ] - HΣH)/B, which is O(η) relative to Σ. The continuous-time
    Lyapunov solution differs from the discrete one at O(ηλ) as well.

    Tolerances: each entry of the empirical covariance over S independent seeds has
    a standard error estimated from the seeds; 6 free entries, |z| < 4 each (false
    alarm ~ 4e-4). Against Σ_exact: z-scores alone. Against the discrete Lyapunov
    solution (the OU noise model): z-scores plus the computed bias |Σ_exact - Σ_lyap|
    (checked to be small, below 10 %, so the comparison means something). The
    continuous-time solution's relative deviation is reported in the assert message.
    """
    rng = np.random.default_rng(7)
    n, d, bs, lr, seeds = 400, 3, 8, 0.04, 6000
    X = rng.standard_normal((n, d)) * np.array([1.0, 0.8, 0.6])
    y = X @ np.array([0.5, -1.0, 2.0]) + rng.standard_normal(n)
    theta_star = np.linalg.lstsq(X, y, rcond=None)[0]
    r = X @ theta_star - y

    def loss(theta, x, yy):
        return 0.5 * (x @ theta - yy) ** 2

    exact, H, C = _exact_sgd_cov(X, r, lr, bs)
    lyap = np.asarray(jaxou.sgd_stationary_cov(H, C, lr, bs))
    cont = np.asarray(jaxou.SGDStage(H, C, theta_star, lr, bs).stationary().cov)
    lam = np.linalg.eigvalsh(H)
    steps = int(12 / (lr * lam[0]))  # e^{-24} of the initial (zero) covariance is left
    theta, unravel = jaxou.flatten_params(jnp.asarray(theta_star))
    out = jaxou.sample_sgd(
        loss,
        jnp.broadcast_to(theta, (seeds, d)),
        (X, y),
        unravel=unravel,
        lr=lr,
        batch_size=bs,
        steps=steps,
        key=key,
    )
    delta = np.asarray(out) - theta_star
    emp = delta.T @ delta / seeds  # the mean is known: θ*
    prods = delta[:, :, None] * delta[:, None, :]
    se = prods.std(0, ddof=1) / np.sqrt(seeds)
    iu = np.triu_indices(d)
    z_exact = ((emp - exact) / se)[iu]
    bias = np.abs(exact - lyap)
    assert np.max(bias / np.abs(exact).max()) < 0.1
    z_lyap = (np.abs(emp - lyap) - bias)[iu] / se[iu]
    z_mean = delta.mean(0) / (delta.std(0, ddof=1) / np.sqrt(seeds))
    cont_dev = np.linalg.norm(cont - emp) / np.linalg.norm(emp)
    lyap_dev = np.linalg.norm(lyap - emp) / np.linalg.norm(emp)
    msg = f"continuous-time rel. dev {cont_dev:.3f}, discrete Lyapunov rel. dev {lyap_dev:.3f}"
    assert np.max(np.abs(z_exact)) < 4, (z_exact, msg)
    assert np.max(z_lyap) < 4, (z_lyap, msg)
    assert np.max(np.abs(z_mean)) < 4, z_mean
