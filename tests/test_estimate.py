"""Estimation (layer 7): the minimum, the Hessian, the gradient-noise covariance and
real SGD, each against an independent reference (closed forms, finite differences,
a Python loop, numpy.linalg.eigh, the discrete Lyapunov equation); the estimators'
operators against the dense estimates at d ≈ 2,000; the data as arguments of the
compiled programs."""

from __future__ import annotations

import contextlib
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxou
from jaxou._estimate import _hessian, _noise, _sampling, _train
from jaxou._estimate._objective import flatten_params, make_objective

N, P, K = 200, 4, 3  # examples, features, classes: d = P*K + K = 15
REG = 0.05


def _loss(params, x, y):
    logits = x @ params["W"] + params["b"]
    reg = 0.5 * REG * (jnp.sum(params["W"] ** 2) + jnp.sum(params["b"] ** 2))
    return -jax.nn.log_softmax(logits)[y] + reg


def _classes(rng, n, p, k):
    X = rng.standard_normal((n, p))
    return X, np.argmax(X @ rng.standard_normal((p, k)) + rng.standard_normal((n, k)), 1)


@pytest.fixture(scope="module")
def problem():
    X, Y = _classes(np.random.default_rng(1234), N, P, K)
    p0 = {"W": jnp.zeros((P, K)), "b": jnp.zeros(K)}
    minimum = jaxou.train_to_minimum(_loss, p0, (X, Y), steps=60)
    H = jaxou.estimate_hessian(_loss, minimum.params, (X, Y), jaxou.DenseHessian())
    return X, Y, minimum, np.asarray(H.as_matrix())


@contextlib.contextmanager
def _count_compiles():
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ---------------------------------------------------------------------------
# The minimum.


def test_minimum_of_ridge_regression_in_closed_form(rng):
    """Ridge regression: θ* = (XᵀX/N + λI)⁻¹ Xᵀy/N, H = XᵀX/N + λI exactly, and
    g_i = x_i(x_iᵀθ* − y_i) + λθ*, so C is the covariance of the residual-weighted
    inputs, all in closed form."""
    n, d, lam = 150, 6, 0.3
    X = rng.standard_normal((n, d)) * np.linspace(0.5, 2, d)
    y = X @ rng.standard_normal(d) + rng.standard_normal(n)

    def loss(theta, x, t):
        return 0.5 * (x @ theta - t) ** 2 + 0.5 * lam * theta @ theta

    H_ref = X.T @ X / n + lam * np.eye(d)
    theta_ref = np.linalg.solve(H_ref, X.T @ y / n)
    out = jaxou.train_to_minimum(loss, jnp.zeros(d), (X, y), steps=50, chunk_size=64)
    np.testing.assert_allclose(out.params, theta_ref, rtol=1e-10, atol=1e-12)
    assert float(out.grad_norm) < 1e-10
    H = jaxou.estimate_hessian(loss, out.params, (X, y), jaxou.DenseHessian(), chunk_size=64)
    np.testing.assert_allclose(H.as_matrix(), H_ref, rtol=1e-12, atol=1e-14)
    G = X * (X @ theta_ref - y)[:, None] + lam * theta_ref
    C_ref = np.cov(G.T, bias=True)
    C = jaxou.estimate_noise_cov(loss, out.params, (X, y), jaxou.DenseNoise(), chunk_size=64)
    np.testing.assert_allclose(C.as_matrix(), C_ref, rtol=1e-9, atol=1e-12)


def test_minimum_is_stationary_and_strict(problem):
    X, Y, minimum, H = problem
    assert minimum.params["W"].shape == (P, K)
    assert float(minimum.grad_norm) < 1e-8
    assert np.linalg.eigvalsh(H)[0] >= REG * (1 - 1e-10)  # convex data loss: H ⪰ λI
    assert minimum.losses.shape == (60,)


@pytest.mark.slow
def test_minibatch_training_with_adam(problem, key):
    X, Y, minimum, _ = problem
    p0 = {"W": jnp.zeros((P, K)), "b": jnp.zeros(K)}
    out = jaxou.train_to_minimum(
        _loss, p0, (X, Y), optimizer=optax.adam(0.05), steps=300, batch_size=32, key=key
    )
    assert out.losses.shape == (300,)
    assert float(out.loss) < float(minimum.loss) + 0.05


# ---------------------------------------------------------------------------
# The Hessian.


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


@pytest.mark.slow
def test_chunking_does_not_change_the_estimates(problem, key):
    """Chunks of 7 (the last one padded) against one chunk of all N examples."""
    X, Y, minimum, H = problem
    H7 = jaxou.estimate_hessian(_loss, minimum.params, (X, Y), jaxou.DenseHessian(), chunk_size=7)
    np.testing.assert_allclose(H7.as_matrix(), H, rtol=1e-12, atol=1e-15)
    C = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), jaxou.DenseNoise(), chunk_size=N)
    C7 = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), jaxou.DenseNoise(), chunk_size=7)
    np.testing.assert_allclose(C7.as_matrix(), C.as_matrix(), rtol=1e-12, atol=1e-15)
    sk = jaxou.SketchedNoise(rank=3)
    S7 = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), sk, key=key, chunk_size=7)
    S = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), sk, key=key, chunk_size=N)
    np.testing.assert_allclose(S7.as_matrix(), S.as_matrix(), rtol=1e-10, atol=1e-14)


def test_lanczos_matches_eigh(problem, key):
    X, Y, minimum, H = problem
    k = 5
    est = jaxou.estimate_hessian(
        _loss, minimum.params, (X, Y), jaxou.LanczosHessian(rank=k, floor=REG), key=key
    )
    assert isinstance(est, jaxou.DiagonalPlusLowRank) and est.factor.shape == (H.shape[0], k)
    lam, V = np.linalg.eigh(H)
    lam, V = lam[::-1], V[:, ::-1]
    np.testing.assert_allclose(np.diag(est.core), lam[:k], rtol=1e-9)
    np.testing.assert_array_equal(est.core, np.diag(np.diag(est.core)))
    # Eigenvectors up to sign (the top eigenvalues are simple here).
    assert np.min(np.diff(-lam[: k + 1])) > 1e-4
    overlap = np.abs(np.sum(np.asarray(est.factor) * V[:, :k], 0))
    np.testing.assert_allclose(overlap, 1, atol=1e-7)


def test_stage_of_operators_and_hutchinson_within_standard_error(problem, key):
    """`estimate_stage` at the minimum with a Lanczos Hessian and the exact noise
    factor: an SGDStage of operators, whose noise covariance is the dense one and
    whose Hessian diagonal lies within Hutchinson's reported standard errors:
    z = (estimate - exact)/stderr per entry is close to Student's t with 99 degrees
    of freedom (100 probes; CLT over the probes), P(|z| > 4.5) ~ 2e-5 per entry, so
    over d = 15 entries a false alarm has probability ~3e-4. `floor=None` and every
    entry resolved (h_i > s_i): nothing is floored."""
    X, Y, minimum, H = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no entry may be floored here
        est = jaxou.estimate_stage(
            _loss,
            minimum.params,
            (X, Y),
            jaxou.LanczosHessian(rank=5),
            jaxou.ExactNoise(),
            lr=0.1,
            batch_size=8,
            train_steps=0,
            key=key,
        )
    stage = est.stage
    assert isinstance(stage.hessian, jaxou.DiagonalPlusLowRank)
    assert isinstance(stage.noise_cov, jaxou.DiagonalPlusLowRank)
    np.testing.assert_array_equal(stage.minimum, jaxou.flatten_params(minimum.params)[0])
    C = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), jaxou.DenseNoise())
    np.testing.assert_allclose(stage.noise_cov.as_matrix(), C.as_matrix(), rtol=1e-10, atol=1e-15)
    assert float(est.grad_norm) == pytest.approx(float(minimum.grad_norm), abs=1e-12)
    lam, V = np.linalg.eigh(H)
    np.testing.assert_allclose(np.diag(stage.hessian.core), lam[::-1][:5], rtol=1e-9)
    residual = np.diag(H - (V[:, -5:] * lam[-5:]) @ V[:, -5:].T)
    stderr = np.asarray(est.hessian_stderr)
    z = (np.asarray(stage.hessian.diagonal) - residual) / stderr
    assert np.all(stderr > 0) and est.hessian_floored == 0
    assert np.max(np.abs(z)) < 4.5, z
    # The plain (undeflated) Hutchinson estimator, checked the same way.
    theta, _ = jaxou.flatten_params(minimum.params)
    diag, se = jaxou.hutchinson_diagonal(jnp.asarray(H).__matmul__, theta.size, key=key)
    assert np.max(np.abs((diag - np.diag(H)) / se)) < 4.5


def test_floor_rule_warns_and_counts():
    """Only unresolved entries (h_i < s_i) change: to the floor where they are below
    it, to s_i without a floor; resolved entries stay, even below the floor."""
    h = jnp.array([1.0, 0.2, -0.1, 0.03, 0.5, 0.1])
    s = jnp.array([0.1, 0.3, 0.05, 0.01, 0.0, 0.2])
    with pytest.warns(UserWarning, match=r"2 of 6 entries .* set to floor=0.15 \(1 of them"):
        out, n = _hessian.floor_diagonal(h, s, 0.15)
    np.testing.assert_array_equal(out, [1.0, 0.2, 0.15, 0.03, 0.5, 0.15])
    assert n == 2
    with pytest.warns(UserWarning, match=r"3 of 6 entries .* set to their standard errors"):
        out, n = _hessian.floor_diagonal(h, s, None)
    np.testing.assert_array_equal(out, [1.0, 0.3, 0.05, 0.03, 0.5, 0.2])
    assert n == 3
    with pytest.raises(ValueError, match="no curvature"):
        _hessian.floor_diagonal(jnp.array([1.0, 0.0]), jnp.array([0.1, 0.0]), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, n = _hessian.floor_diagonal(h[:1], s[:1], 0.25)
    assert n == 0


# ---------------------------------------------------------------------------
# The gradient-noise covariance.


def test_noise_cov_against_python_loop(problem, key):
    X, Y, minimum, _ = problem
    theta, unravel = jaxou.flatten_params(minimum.params)
    g = jax.jit(jax.grad(lambda t, x, y: _loss(unravel(t), x, y)))
    G = np.stack([np.asarray(g(theta, X[i], Y[i])) for i in range(N)])
    np.testing.assert_allclose(
        jaxou.per_example_grads(_loss, minimum.params, (X, Y)), G, atol=1e-15
    )
    ref = np.cov(G.T, bias=True)
    C = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), jaxou.DenseNoise())
    assert isinstance(C, jaxou.Dense)
    np.testing.assert_allclose(C.as_matrix(), ref, rtol=1e-10, atol=1e-13)
    exact = jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), jaxou.ExactNoise())
    assert isinstance(exact, jaxou.DiagonalPlusLowRank) and exact.factor.shape == (theta.size, N)
    np.testing.assert_array_equal(exact.diagonal, 0)
    np.testing.assert_allclose(exact.as_matrix(), ref, rtol=1e-10, atol=1e-15)
    sketch = jaxou.estimate_noise_cov(
        _loss, minimum.params, (X, Y), jaxou.SketchedNoise(rank=4), key=key
    )
    lam = np.linalg.eigvalsh(ref)[::-1]
    np.testing.assert_allclose(np.diag(sketch.core), lam[:4], rtol=1e-8)
    np.testing.assert_allclose(sketch.diagonal_values(), np.diag(ref), atol=1e-15)


# ---------------------------------------------------------------------------
# Data as arguments: no recompilation, no constants.


def test_new_data_of_the_same_shape_does_not_recompile(problem, key):
    X, Y, minimum, _ = problem
    rng = np.random.default_rng(3)
    # The estimators and shapes of the tests above: their first calls compiled.
    calls = (
        lambda X, Y: jaxou.estimate_hessian(_loss, minimum.params, (X, Y), jaxou.DenseHessian()),
        lambda X, Y: jaxou.estimate_hessian(
            _loss, minimum.params, (X, Y), jaxou.LanczosHessian(rank=5, floor=REG), key=key
        ),
        lambda X, Y: jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), jaxou.ExactNoise()),
        lambda X, Y: jaxou.estimate_noise_cov(
            _loss, minimum.params, (X, Y), jaxou.SketchedNoise(rank=4), key=key
        ),
        lambda X, Y: jaxou.train_to_minimum(_loss, minimum.params, (X, Y), steps=60),
    )
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(X, Y)
            X2, Y2 = _classes(rng, N, P, K)
            with _count_compiles() as compiles:
                call(X2, Y2)
        assert not compiles, compiles


def test_compiled_programs_do_not_grow_with_the_sample(key):
    """The lowered programs for N = 64 and N = 4096 examples have the same size: the
    data are arguments, never constants folded into the program."""
    sizes = {}
    for n in (64, 4096):
        X, Y = _classes(np.random.default_rng(n), n, P, K)
        theta, unravel = flatten_params({"W": jnp.zeros((P, K)), "b": jnp.zeros(K)})
        obj = make_objective(_loss, unravel, (X, Y), 4096, theta.dtype, theta.size)
        matvec = _hessian._HessianMatvec(obj, theta)
        texts = (
            _hessian._dense_hessian.lower(matvec).as_text(),
            _noise.centred_grads.lower(obj, theta).as_text(),
            _noise._sketch.lower(obj, theta, jnp.ones((theta.size, 3)), 2, 1).as_text(),
            _train._train.lower(obj, optax.lbfgs(), theta, key, 5, None).as_text(),
            _sampling._sample_sgd.lower(
                obj, jnp.zeros((4, theta.size)), 0.1, 8, 10, jax.random.split(key, 4)
            ).as_text(),
        )
        sizes[n] = np.array([len(t) for t in texts])
        # No constant array larger than a few numbers (the data would be written as
        # a dense<"0x..."> literal of 4096 × 4 × 16 hex digits).
        longest = max(len(c) for t in texts for c in re.findall(r"dense<[^>]*>", t))
        assert longest < 400, longest
    # The shapes' digits differ (64 against 4096); 4096 × 4 float64 inputs written as
    # a constant would add > 250,000 characters.
    assert np.all(np.abs(sizes[4096] - sizes[64]) < 5000), sizes


# ---------------------------------------------------------------------------
# The stage.


@pytest.mark.slow
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
    est = jaxou.estimate_stage(
        loss,
        model,
        (X, Y),
        jaxou.DenseHessian(),
        jaxou.DenseNoise(),
        lr=0.1,
        batch_size=8,
        train_steps=60,
    )
    assert isinstance(est.stage, jaxou.SGDStage) and est.stage.dim == theta.size
    assert float(est.grad_norm) < 1e-6
    assert isinstance(est.unravel(est.stage.minimum), eqx.nn.MLP)
    H = np.asarray(est.stage.hessian)
    # The operator path at the same minimum: its top eigenpairs are the dense ones,
    # its noise covariance is the dense one.
    s = jaxou.estimate_stage(
        loss,
        est.params,
        (X, Y),
        jaxou.LanczosHessian(rank=theta.size - 2, probes=50),
        jaxou.ExactNoise(),
        lr=0.1,
        batch_size=8,
        train_steps=0,
        key=key,
    )
    assert isinstance(s.stage.hessian, jaxou.DiagonalPlusLowRank)
    top = np.linalg.eigvalsh(H)[::-1][: theta.size - 2]
    np.testing.assert_allclose(np.diag(s.stage.hessian.core), top, rtol=1e-8)
    np.testing.assert_allclose(
        s.stage.noise_cov.as_matrix(), np.asarray(est.stage.noise_cov), rtol=1e-10, atol=1e-15
    )
    np.testing.assert_array_equal(s.stage.minimum, est.stage.minimum)


def test_errors(problem, key):
    X, Y, minimum, _ = problem
    with pytest.raises(TypeError, match="hessian_estimator must be an instance"):
        jaxou.estimate_hessian(_loss, minimum.params, (X, Y), "lanczos")
    with pytest.raises(TypeError, match="noise_estimator must be an instance"):
        jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), jaxou.DenseHessian())
    with pytest.raises(ValueError, match="needs a key"):
        jaxou.estimate_hessian(_loss, minimum.params, (X, Y), jaxou.LanczosHessian(rank=2))
    with pytest.raises(ValueError, match="rank must be <= d = 15"):
        jaxou.estimate_hessian(
            _loss, minimum.params, (X, Y), jaxou.LanczosHessian(rank=16), key=key
        )
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        jaxou.LanczosHessian(rank=0)
    with pytest.raises(ValueError, match="floor must be > 0"):
        jaxou.LanczosHessian(floor=-1.0)
    with pytest.raises(ValueError, match="leading"):
        jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y[:-1]), jaxou.DenseNoise())
    with pytest.raises(TypeError, match="pair"):
        jaxou.estimate_noise_cov(_loss, minimum.params, X, jaxou.DenseNoise())
    with pytest.raises(ValueError, match=r"rank must be <= min\(d, N\) = 15"):
        jaxou.estimate_noise_cov(
            _loss, minimum.params, (X, Y), jaxou.SketchedNoise(rank=999), key=key
        )
    with pytest.raises(ValueError, match="chunk_size"):
        jaxou.estimate_noise_cov(_loss, minimum.params, (X, Y), jaxou.DenseNoise(), chunk_size=0)
    with pytest.raises(ValueError, match="no floating-point"):
        jaxou.flatten_params({"a": 1})
    with pytest.raises(ValueError, match="needs a key"):  # before any training
        jaxou.estimate_stage(
            _loss,
            minimum.params,
            (X, Y),
            jaxou.LanczosHessian(rank=2),
            jaxou.DenseNoise(),
            lr=0.1,
            batch_size=8,
        )


# ---------------------------------------------------------------------------
# SGD.


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


# ---------------------------------------------------------------------------
# d ≈ 2,000: the operators against the dense estimates.

MLP_P, MLP_H, MLP_K, MLP_N, MLP_REG = 20, 80, 3, 256, 1e-2  # d = 1,923


def _mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["W1"] + p["b1"])
    reg = 0.5 * MLP_REG * sum(jnp.sum(v**2) for v in jax.tree.leaves(p))
    return -jax.nn.log_softmax(h @ p["W2"] + p["b2"])[y] + reg


@pytest.fixture(scope="module")
def mlp2000():
    """A tanh MLP 20 → 80 → 3 (d = 1,923) on 256 synthetic examples, trained to its
    minimum, with the dense Hessian and noise covariance there."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((MLP_N, MLP_P))
    W = rng.standard_normal((MLP_P, MLP_K))
    Y = np.argmax(np.tanh(X @ W) + 0.5 * rng.standard_normal((MLP_N, MLP_K)), 1)
    k1, k2 = jax.random.split(jax.random.key(1))
    p0 = {
        "W1": jax.random.normal(k1, (MLP_P, MLP_H)) / np.sqrt(MLP_P),
        "b1": jnp.zeros(MLP_H),
        "W2": jax.random.normal(k2, (MLP_H, MLP_K)) / np.sqrt(MLP_H),
        "b2": jnp.zeros(MLP_K),
    }
    m = jaxou.train_to_minimum(_mlp_loss, p0, (X, Y), steps=300)
    data = (X, Y)
    H = np.asarray(
        jaxou.estimate_hessian(_mlp_loss, m.params, data, jaxou.DenseHessian()).as_matrix()
    )
    C = np.asarray(
        jaxou.estimate_noise_cov(_mlp_loss, m.params, data, jaxou.DenseNoise()).as_matrix()
    )
    return data, m, H, C


@pytest.mark.slow
def test_d2000_lanczos_hutchinson_against_dense(mlp2000):
    """Top-20 eigenvalues to 1e-9 (the dense spectrum's top gaps are > 1e-3); the
    residual diagonal within Hutchinson's standard errors: with 100 probes each
    z_i is close to Student's t with 99 degrees of freedom, P(|z| > 5.5) ≈ 3e-7 per
    entry (≈ 6e-4 over 1,923 entries); the mean of z² is ≈ 1.02 with a standard
    error ≈ 0.033 for independent entries (the entries share probes, so we allow
    six of those)."""
    data, m, H, _ = mlp2000
    k = 20
    est = jaxou.estimate_stage(
        _mlp_loss,
        m.params,
        data,
        jaxou.LanczosHessian(rank=k, probes=100, floor=MLP_REG),
        jaxou.ExactNoise(),
        lr=0.05,
        batch_size=16,
        train_steps=0,
        key=jax.random.key(2),
    )
    op = est.stage.hessian
    lam, V = np.linalg.eigh(H)
    lam, V = lam[::-1], V[:, ::-1]
    assert np.min(np.diff(-lam[: k + 1])) > 1e-3
    np.testing.assert_allclose(np.diag(op.core), lam[:k], rtol=1e-9)
    residual = np.diag(H - (V[:, :k] * lam[:k]) @ V[:, :k].T)
    z = (np.asarray(op.diagonal) - residual) / np.asarray(est.hessian_stderr)
    assert est.hessian_floored == 0  # every entry resolved: the floor never applied
    assert np.max(np.abs(z)) < 5.5, np.max(np.abs(z))
    assert abs(np.mean(z**2) - 1.02) < 0.2, np.mean(z**2)
    # The factor holds the dense Hessian's top eigenvectors: Uᵀ H U = diag(λ).
    U = np.asarray(op.factor)
    np.testing.assert_allclose(U.T @ H @ U, np.diag(lam[:k]), atol=1e-9 * lam[0])


@pytest.mark.slow
def test_d2000_noise_factor_against_dense(mlp2000):
    """The exact factor reproduces the dense covariance to rounding and has rank at
    most N − 1 (centred gradients); its diagonal part is zero."""
    data, m, _, C = mlp2000
    op = jaxou.estimate_noise_cov(_mlp_loss, m.params, data, jaxou.ExactNoise())
    assert op.factor.shape == (C.shape[0], MLP_N)
    np.testing.assert_array_equal(op.diagonal, 0)
    np.testing.assert_allclose(op.as_matrix(), C, rtol=0, atol=1e-13 * np.abs(C).max())
    sv = np.linalg.svd(np.asarray(op.factor), compute_uv=False)
    assert sv[-1] < 1e-12 * sv[0]
    # Against an independent computation of the per-example gradients (jax.jacrev of
    # the vector of per-example losses) and numpy's covariance.
    theta, unravel = jaxou.flatten_params(m.params)
    X, Y = data
    J = jax.jacrev(lambda t: jax.vmap(lambda x, y: _mlp_loss(unravel(t), x, y))(X, Y))(theta)
    np.testing.assert_allclose(
        C, np.cov(np.asarray(J).T, bias=True), rtol=0, atol=1e-13 * np.abs(C).max()
    )


@pytest.mark.slow
def test_d2000_sketched_noise_converges(mlp2000):
    """Rayleigh–Ritz values are lower bounds of the true eigenvalues (Cauchy
    interlacing), the diagonal is exact, and the error falls with the power
    iterations, to below 1e-5 at q = 8 (spectral decay λ₃₁/λ₂₀ ≈ 0.6 here)."""
    data, m, _, C = mlp2000
    lam = np.linalg.eigvalsh(C)[::-1][:20]
    errors = []
    for q in (1, 4, 8):
        op = jaxou.estimate_noise_cov(
            _mlp_loss,
            m.params,
            data,
            jaxou.SketchedNoise(rank=20, power_iterations=q),
            key=jax.random.key(3),
        )
        rel = (lam - np.diag(op.core)) / lam
        assert np.all(rel > -1e-12), rel
        np.testing.assert_allclose(op.diagonal_values(), np.diag(C), rtol=1e-10, atol=1e-16)
        errors.append(rel.max())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors
