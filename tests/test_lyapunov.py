import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import jaxou

from helpers import central_diff, random_psd, random_spd, random_stable, rel_err

# Accuracy required by the issue (float64, against SciPy): ≤ 1e-9 up to cond 1e2,
# ≤ 1e-8 up to cond 1e6.
TOL64 = {1e2: 1e-9, 1e6: 1e-8}


def _methods(d, symmetric):
    methods = ["sign"] + (["kron"] if d <= 16 else [])
    return (["eigh", "auto"] + methods) if symmetric else (["auto"] + methods)


@pytest.mark.parametrize("d", [3, 16, 64])
@pytest.mark.parametrize("cond", [1e2, 1e6])
@pytest.mark.parametrize("symmetric", [True, False])
def test_against_scipy(rng, d, cond, symmetric):
    A = random_spd(rng, d, cond) if symmetric else random_stable(rng, d, cond)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    for method in _methods(d, symmetric):
        X = jaxou.lyapunov(A, Q, method=method)
        assert X.dtype == jnp.float64
        assert rel_err(X, ref) <= TOL64[cond], method


@pytest.mark.slow
@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_against_scipy_d256(rng, cond):
    d = 256
    A = random_spd(rng, d, cond)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    for method in ("eigh", "sign"):
        assert rel_err(jaxou.lyapunov(A, Q, method=method), ref) <= TOL64[cond], method
    A = random_stable(rng, d, cond)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    assert rel_err(jaxou.lyapunov(A, Q, method="sign"), ref) <= TOL64[cond]


def test_ill_conditioned_nonnormal(rng):
    # Strongly non-normal: a large skew part next to a tiny symmetric part.
    d = 12
    A = random_stable(rng, d, cond=1e4, skew=5.0)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    for method in ("sign", "kron"):
        assert rel_err(jaxou.lyapunov(A, Q, method=method), ref) <= 1e-8


@pytest.mark.parametrize("method", ["eigh", "sign", "kron"])
def test_float32(rng, method):
    d, cond = 8, 1e2
    A = random_spd(rng, d, cond)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    X = jaxou.lyapunov(jnp.float32(A), jnp.float32(Q), method=method)
    assert X.dtype == jnp.float32
    # As good as float32 allows: a small multiple of cond(A) * eps32.
    assert rel_err(X, ref) <= 10 * cond * np.finfo(np.float32).eps


def test_sign_convention(rng):
    # SciPy's convention: A X + X Aᵀ = Q (python-control's lyap has +Q = 0).
    A = random_stable(rng, 5)
    Q = random_psd(rng, 5)
    X = np.asarray(jaxou.lyapunov(A, Q))
    np.testing.assert_allclose(A @ X + X @ A.T, Q, atol=1e-12)


def test_batch_broadcast_and_vmap(rng):
    d = 6
    A = np.stack([[random_spd(rng, d) for _ in range(3)] for _ in range(2)])
    Q = random_psd(rng, d)
    X = jaxou.lyapunov(A, Q)
    assert X.shape == (2, 3, d, d)
    loop = np.stack([[jaxou.lyapunov(a, Q) for a in row] for row in A])
    np.testing.assert_allclose(X, loop, rtol=1e-12, atol=1e-14)
    # vmap over the batch equals the loop too, for the general path.
    As = np.stack([random_stable(rng, d) for _ in range(4)])
    Qs = np.stack([random_psd(rng, d) for _ in range(4)])
    Xv = jax.vmap(lambda a, q: jaxou.lyapunov(a, q, method="sign"))(As, Qs)
    for i in range(4):
        ref = scipy.linalg.solve_continuous_lyapunov(As[i], Qs[i])
        assert rel_err(Xv[i], ref) < 1e-12


def test_auto_under_jit_picks_by_symmetry(rng):
    d = 10
    f = jax.jit(lambda A, Q: jaxou.lyapunov(A, Q))
    for A in (random_spd(rng, d), random_stable(rng, d)):
        Q = random_psd(rng, d)
        ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
        assert rel_err(f(A, Q), ref) < 1e-12


def test_no_recompilation(rng):
    traces = []

    @jax.jit
    def f(A, Q):
        traces.append(None)
        return jaxou.lyapunov(A, Q, method="eigh")

    d = 5
    f(random_spd(rng, d), random_psd(rng, d)).block_until_ready()
    f(random_spd(rng, d), random_psd(rng, d)).block_until_ready()
    assert len(traces) == 1


def _fd_check(f, x, rng, rtol=1e-6):
    f = jax.jit(f)
    g = np.asarray(jax.jit(jax.grad(f))(x))
    for _ in range(3):
        direction = rng.standard_normal(x.shape)
        fd = central_diff(f, x, direction)
        an = float(np.sum(g * direction))
        assert abs(an - fd) <= rtol * max(abs(fd), 1e-8), (an, fd)


@pytest.mark.parametrize("method", ["eigh", "sign", "kron"])
def test_grad_against_finite_differences(rng, method):
    d = 5
    A = random_spd(rng, d, 10) if method == "eigh" else random_stable(rng, d, 10)
    Q = random_psd(rng, d)
    W = rng.standard_normal((d, d))

    def loss_A(a):
        if method == "eigh":
            a = 0.5 * (a + a.T)  # stay on the symmetric manifold the method assumes
        return jnp.sum(W * jnp.sin(jaxou.lyapunov(a, Q, method=method)))

    def loss_Q(q):
        return jnp.sum(W * jnp.sin(jaxou.lyapunov(A, q, method=method)))

    _fd_check(loss_A, A, rng)
    _fd_check(loss_Q, Q, rng)


def test_grad_isotropic_is_finite_and_correct(rng):
    # Repeated eigenvalues: differentiating through eigh would give NaN.
    d = 4
    Q = random_psd(rng, d)
    W = rng.standard_normal((d, d))

    def loss(c):
        return jnp.sum(W * jaxou.lyapunov(c * jnp.eye(d), Q))

    g = jax.grad(loss)(2.0)
    # Closed form: X = Q / (2c), dX/dc = -Q / (2c²).
    np.testing.assert_allclose(g, np.sum(W * -Q / 8.0), rtol=1e-12)

    def loss_matrix(A):
        A = 0.5 * (A + A.T)
        return jnp.sum(W * jaxou.lyapunov(A, Q))

    A = 2.0 * np.eye(d)
    assert np.all(np.isfinite(jax.grad(loss_matrix)(A)))
    _fd_check(loss_matrix, A, rng)


def test_forward_mode_and_jit_grad(rng):
    d = 4
    A = random_stable(rng, d)
    Q = random_psd(rng, d)
    dA = rng.standard_normal((d, d))
    _, tangent = jax.jvp(lambda a: jaxou.lyapunov(a, Q), (A,), (dA,))
    fd = central_diff(lambda a: np.asarray(jaxou.lyapunov(a, Q)), A, dA)
    np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-9)
    g1 = jax.grad(lambda a: jnp.sum(jaxou.lyapunov(a, Q)))(A)
    g2 = jax.jit(jax.grad(lambda a: jnp.sum(jaxou.lyapunov(a, Q))))(A)
    np.testing.assert_allclose(g1, g2, rtol=1e-12)


@pytest.mark.parametrize("method", ["eigh", "sign", "kron", "auto"])
def test_unstable_raises(method):
    A = np.diag([1.0, -0.5, 2.0])
    with pytest.raises(eqx.EquinoxRuntimeError, match="not stable"):
        jaxou.lyapunov(A, np.eye(3), method=method)
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="not stable"):
        jax.jit(lambda a: jaxou.lyapunov(a, jnp.eye(3), method=method))(A)


def test_status_without_throw(rng):
    d = 12
    B = random_stable(rng, d)
    A = np.stack([B, -B, B - np.eye(d) * 1e-3 + 0 * B])  # stable, unstable, stable
    X, status = jaxou.lyapunov(A, np.eye(d), throw=False)
    np.testing.assert_array_equal(status, [0, 1, 0])
    # An eigenvalue exactly on the imaginary axis: unstable or not converged, never 0.
    R = np.array([[0.0, 1.0], [-1.0, 0.0]])
    _, s = jaxou.lyapunov(R, np.eye(2), method="sign", throw=False)
    assert int(s) != 0
    _, s = jaxou.lyapunov(np.diag([1.0, 0.0]), np.eye(2), method="eigh", throw=False)
    assert int(s) == int(jaxou.LyapunovStatus.UNSTABLE)
    assert np.all(np.isfinite(X[0]))


def test_bad_input_messages():
    with pytest.raises(ValueError, match="unknown method"):
        jaxou.lyapunov(np.eye(2), np.eye(2), method="schur")
    with pytest.raises(ValueError, match="A must be"):
        jaxou.lyapunov(np.ones((2, 3)), np.eye(2))
    with pytest.raises(ValueError, match="Q is"):
        jaxou.lyapunov(np.eye(2), np.eye(3))
    with pytest.raises(ValueError, match="do not broadcast"):
        jaxou.lyapunov(np.ones((2, 3, 3)) * np.eye(3), np.ones((4, 3, 3)))
    with pytest.raises(TypeError, match="complex"):
        jaxou.lyapunov(np.eye(2) * (1 + 1j), np.eye(2))
    with pytest.raises(TypeError, match="dtype"):
        jaxou.lyapunov(jnp.eye(2, dtype=jnp.float32), jnp.eye(2, dtype=jnp.float64))


def test_integer_inputs_promote():
    X = jaxou.lyapunov(np.eye(2, dtype=int), 2 * np.eye(2, dtype=int))
    assert jnp.issubdtype(X.dtype, jnp.floating)
    np.testing.assert_allclose(X, np.eye(2))


# ---------------------------------------------------------------------------
# The matrix-product Cholesky and triangular solves (used per grid point by
# jaxou.evaluate): against SciPy's LAPACK, their derivatives against finite
# differences and JAX's own Cholesky derivative.


@pytest.mark.parametrize("d", [1, 5, 37])
def test_matmul_cholesky_and_solves_against_scipy(rng, d):
    from jaxou import _cholesky as _linalg

    matmul_cholesky = jax.jit(_linalg.matmul_cholesky)
    matmul_solve_lower = jax.jit(_linalg.matmul_solve_lower)
    matmul_solve_lower_tri = jax.jit(_linalg.matmul_solve_lower_tri)
    A = random_spd(rng, d, 1e6)
    L = np.asarray(matmul_cholesky(jnp.asarray(A)))
    ref = scipy.linalg.cholesky(A, lower=True)
    assert np.all(np.triu(L, 1) == 0)
    # Cholesky's forward error is bounded by cond(A)·eps; backward error to eps.
    assert rel_err(L, ref) <= 1e-10
    assert rel_err(L @ L.T, A) <= 1e-14
    B = rng.standard_normal((d, 3))
    R = np.tril(rng.standard_normal((d, d)))
    X = matmul_solve_lower(jnp.asarray(ref), jnp.asarray(B))
    assert rel_err(X, scipy.linalg.solve_triangular(ref, B, lower=True)) <= 1e-12
    T, Y = matmul_solve_lower_tri(jnp.asarray(ref), jnp.asarray(R), jnp.asarray(B))
    assert np.all(np.triu(np.asarray(T), 1) == 0)
    assert rel_err(T, scipy.linalg.solve_triangular(ref, R, lower=True)) <= 1e-12
    assert rel_err(Y, scipy.linalg.solve_triangular(ref, B, lower=True)) <= 1e-12
    # Batched (vmapped, compiled) equals one at a time, to the forward error
    # bound (compiled code fuses multiply-adds, so the roundings differ).
    batch = jnp.stack([jnp.asarray(A), 2 * jnp.asarray(A)])
    Lb = jax.jit(jax.vmap(matmul_cholesky))(batch)
    assert rel_err(Lb[0], L) <= 1e-10
    assert rel_err(Lb[1], matmul_cholesky(batch[1])) <= 1e-10


@pytest.mark.parametrize("d", [5, 20])
def test_matmul_cholesky_derivatives(rng, d):
    from jaxou._cholesky import matmul_cholesky, matmul_solve_lower_tri

    A = random_spd(rng, d, 1e2)
    W = rng.standard_normal((d, d))
    R = np.tril(rng.standard_normal((d, d))) + 3 * np.eye(d)
    e = rng.standard_normal((d, 1))

    def f(A):
        L = matmul_cholesky(A)
        X, y = matmul_solve_lower_tri(L, jnp.asarray(R), jnp.asarray(e))
        return jnp.sum(W * L) + jnp.sum(jnp.log(jnp.diagonal(L))) + jnp.sum(X**2) + jnp.sum(y)

    def f_ref(A):
        L = jnp.linalg.cholesky(A)
        X = jax.scipy.linalg.solve_triangular(L, jnp.asarray(R), lower=True)
        y = jax.scipy.linalg.solve_triangular(L, jnp.asarray(e), lower=True)
        return jnp.sum(W * L) + jnp.sum(jnp.log(jnp.diagonal(L))) + jnp.sum(X**2) + jnp.sum(y)

    dA = random_psd(rng, d) - random_psd(rng, d)  # a symmetric direction
    jvp = jax.jit(lambda a, da: jax.jvp(f, (a,), (da,))[1])(A, dA)
    jvp_ref = jax.jit(lambda a, da: jax.jvp(f_ref, (a,), (da,))[1])(A, dA)
    f_jit = jax.jit(f)
    fd = central_diff(lambda x: float(f_jit(jnp.asarray(x))), A, dA)
    assert abs(jvp - jvp_ref) <= 1e-12 * abs(jvp_ref)
    assert abs(jvp - fd) <= 1e-6 * abs(jvp)
    grad = jax.jit(jax.grad(f))(jnp.asarray(A))
    assert abs(jnp.sum(grad * dA) - jvp) <= 1e-12 * abs(jvp)
