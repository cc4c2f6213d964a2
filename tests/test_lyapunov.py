import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg
from scipy.linalg import block_diag

import jaxou
from jaxou import AutoLyapunov, Eigh, Kronecker, LyapunovResult, MatrixSign

from helpers import central_diff, random_psd, random_spd, random_stable, rel_err

# Accuracy required by the issue (float64, against SciPy): ≤ 1e-9 up to cond 1e2,
# ≤ 1e-8 up to cond 1e6.
TOL64 = {1e2: 1e-9, 1e6: 1e-8}

# What `lyapunov(throw=True)` says for each failed result.
MESSAGE = {
    LyapunovResult.UNSTABLE: "not stable",
    LyapunovResult.NOT_CONVERGED: "did not converge",
    LyapunovResult.INACCURATE: "relative residual",
}


def _solvers(d, symmetric):
    general = [AutoLyapunov(), MatrixSign()] + ([Kronecker()] if d <= 16 else [])
    return ([Eigh()] + general) if symmetric else general


def _name(solver):
    return type(solver).__name__


@pytest.mark.parametrize("d", [3, 16, 64])
@pytest.mark.parametrize("cond", [1e2, 1e6])
@pytest.mark.parametrize("symmetric", [True, False])
def test_against_scipy(rng, d, cond, symmetric):
    A = random_spd(rng, d, cond) if symmetric else random_stable(rng, d, cond)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    for solver in _solvers(d, symmetric):
        X = jaxou.lyapunov(A, Q, solver=solver)
        assert X.dtype == jnp.float64
        assert rel_err(X, ref) <= TOL64[cond], _name(solver)


@pytest.mark.slow
@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_against_scipy_d256(rng, cond):
    d = 256
    A = random_spd(rng, d, cond)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    for solver in (Eigh(), MatrixSign()):
        assert rel_err(jaxou.lyapunov(A, Q, solver=solver), ref) <= TOL64[cond], _name(solver)
    A = random_stable(rng, d, cond)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    assert rel_err(jaxou.lyapunov(A, Q, solver=MatrixSign()), ref) <= TOL64[cond]


def test_ill_conditioned_nonnormal(rng):
    # Strongly non-normal: a large skew part next to a tiny symmetric part.
    d = 12
    A = random_stable(rng, d, cond=1e4, skew=5.0)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    for solver in (MatrixSign(), Kronecker()):
        assert rel_err(jaxou.lyapunov(A, Q, solver=solver), ref) <= 1e-8


@pytest.mark.parametrize("solver", [Eigh(), MatrixSign(), Kronecker()], ids=_name)
def test_float32(rng, solver):
    d, cond = 8, 1e2
    A = random_spd(rng, d, cond)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    sol = solver.solve(jnp.float32(A), jnp.float32(Q))
    assert sol.value.dtype == sol.residual.dtype == jnp.float32
    assert int(sol.result) == LyapunovResult.SUCCESSFUL
    # As good as float32 allows: a small multiple of cond(A) * eps32.
    assert rel_err(sol.value, ref) <= 10 * cond * np.finfo(np.float32).eps


def test_default_rtol():
    from jaxou._lyapunov.base import default_rtol

    # min(1000 d eps, sqrt(eps)), as documented.
    assert default_rtol(jnp.float64, 10) == pytest.approx(1e4 * 2.0**-52)
    assert default_rtol(jnp.float32, 2) == pytest.approx(2000 * 2.0**-23)
    assert default_rtol(jnp.float32, 64) == pytest.approx(2.0**-11.5)


def test_sign_convention(rng):
    # SciPy's convention: A X + X Aᵀ = Q (python-control's lyap has +Q = 0).
    A = random_stable(rng, 5)
    Q = random_psd(rng, 5)
    X = np.asarray(jaxou.lyapunov(A, Q))
    np.testing.assert_allclose(A @ X + X @ A.T, Q, atol=1e-12)


@pytest.mark.slow
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
    Xv = jax.vmap(lambda a, q: jaxou.lyapunov(a, q, solver=MatrixSign()))(As, Qs)
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
    # One problem through AutoLyapunov.solve under jit: the same choice.
    A = random_stable(rng, d)
    sol = jax.jit(AutoLyapunov().solve)(A, Q)
    assert int(sol.result) == LyapunovResult.SUCCESSFUL
    assert rel_err(sol.value, scipy.linalg.solve_continuous_lyapunov(A, Q)) < 1e-12


def test_no_recompilation(rng):
    traces = []

    @jax.jit
    def f(A, Q):
        traces.append(None)
        return jaxou.lyapunov(A, Q, solver=Eigh())

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


# AutoLyapunov's derivatives (through its lax.cond) are in test_forward_mode_and_jit_grad.
@pytest.mark.parametrize("solver", [Eigh(), MatrixSign(), Kronecker()], ids=_name)
def test_grad_against_finite_differences(rng, solver):
    d = 5
    symmetric = isinstance(solver, Eigh)
    A = random_spd(rng, d, 10) if symmetric else random_stable(rng, d, 10)
    Q = random_psd(rng, d)
    W = rng.standard_normal((d, d))

    def loss_A(a):
        if symmetric:
            a = 0.5 * (a + a.T)  # stay on the symmetric manifold the solver assumes
        return jnp.sum(W * jnp.sin(jaxou.lyapunov(a, Q, solver=solver)))

    def loss_Q(q):
        return jnp.sum(W * jnp.sin(jaxou.lyapunov(A, q, solver=solver)))

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


# ---------------------------------------------------------------------------
# Results, the residual check and the failure paths.


@pytest.mark.parametrize("solver", [Eigh(), MatrixSign(), Kronecker(), AutoLyapunov()], ids=_name)
def test_unstable_raises(solver):
    A = np.diag([1.0, -0.5, 2.0])
    assert int(solver.solve(A, np.eye(3)).result) == LyapunovResult.UNSTABLE
    with pytest.raises(eqx.EquinoxRuntimeError, match="A is not stable"):
        jaxou.lyapunov(A, np.eye(3), solver=solver)
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="not stable"):
        jax.jit(lambda a: jaxou.lyapunov(a, jnp.eye(3), solver=solver))(A)


def test_results_and_nan_without_throw(rng):
    d = 12
    B = random_stable(rng, d)
    A = np.stack([B, -B, B - np.eye(d) * 1e-3])  # stable, unstable, stable
    sols = jax.vmap(MatrixSign().solve, in_axes=(0, None))(A, np.eye(d))
    np.testing.assert_array_equal(sols.result, [0, 1, 0])
    assert sols.result.dtype == jnp.int32
    X = np.asarray(jaxou.lyapunov(A, np.eye(d), throw=False))
    assert np.all(np.isnan(X[1])) and np.all(np.isfinite(X[[0, 2]]))
    np.testing.assert_allclose(X[[0, 2]], np.asarray(sols.value)[[0, 2]], rtol=1e-12)
    # An eigenvalue exactly on the imaginary axis: unstable or not converged, never 0.
    R = np.array([[0.0, 1.0], [-1.0, 0.0]])
    assert int(MatrixSign().solve(R, np.eye(2)).result) != LyapunovResult.SUCCESSFUL
    # A symmetric A that is not positive definite: UNSTABLE for the eigh solver,
    # singular or indefinite alike.
    for A in (np.diag([1.0, 0.0]), random_spd(rng, 4) - 0.5 * np.eye(4)):
        assert np.linalg.eigvalsh(A)[0] <= 0
        sol = Eigh().solve(A, np.eye(len(A)))
        assert int(sol.result) == LyapunovResult.UNSTABLE


def test_residual_is_the_relative_residual(rng):
    # Eigh reads the symmetric part of A; given a non-symmetric A its answer solves
    # another equation, which the residual (against A itself) shows.
    d = 5
    A = random_stable(rng, d)
    Q = random_psd(rng, d)
    sol = Eigh().solve(A, Q)
    X = np.asarray(sol.value)
    r = np.linalg.norm(A @ X + X @ A.T - Q) / (
        2 * np.linalg.norm(A) * np.linalg.norm(X) + np.linalg.norm(Q)
    )
    assert r > 1e-3
    np.testing.assert_allclose(sol.residual, r, rtol=1e-10)
    assert int(sol.result) == LyapunovResult.INACCURATE
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=r"Eigh returned a relative residual .* of 1\.\d\de-01, above"
    ):
        jaxou.lyapunov(A, Q, solver=Eigh())
    # The same A through the general solvers: small residuals, SUCCESSFUL.
    for solver in (MatrixSign(), Kronecker(), AutoLyapunov()):
        sol = solver.solve(A, Q)
        assert int(sol.result) == LyapunovResult.SUCCESSFUL
        assert float(sol.residual) < 10 * np.finfo(np.float64).eps


def test_not_converged(rng):
    A = random_stable(rng, 6, cond=1e3)
    sol = MatrixSign(max_steps=2).solve(A, np.eye(6))
    assert int(sol.result) == LyapunovResult.NOT_CONVERGED
    with pytest.raises(eqx.EquinoxRuntimeError, match="did not converge within max_steps=2"):
        jaxou.lyapunov(A, np.eye(6), solver=MatrixSign(max_steps=2))
    # Under jit the message names the failure too (without the residual).
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="converge"):
        jax.jit(lambda a: jaxou.lyapunov(a, jnp.eye(6), solver=MatrixSign(max_steps=2)))(A)


def test_bad_input_messages():
    with pytest.raises(TypeError, match="solver must be a jaxou.AbstractLyapunovSolver"):
        jaxou.lyapunov(np.eye(2), np.eye(2), solver="sign")
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
    with pytest.raises(ValueError, match="one problem, so A must be"):
        Eigh().solve(np.stack([np.eye(2)] * 3), np.eye(2))
    with pytest.raises(ValueError, match="MatrixSign: rtol must be in"):
        MatrixSign(rtol=0.0)
    with pytest.raises(ValueError, match="Eigh: rtol must be in"):
        Eigh(rtol=-1e-3)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        MatrixSign(max_steps=0)


def test_nonfinite_inputs():
    A = np.eye(3)
    A[1, 2] = np.nan
    with pytest.raises(ValueError, match="lyapunov: A has 1 non-finite entries"):
        jaxou.lyapunov(A, np.eye(3))
    Q = np.eye(3)
    Q[0, 0] = np.inf
    with pytest.raises(ValueError, match="lyapunov: Q has 1 non-finite"):
        jaxou.lyapunov(np.eye(3), Q)
    with pytest.raises(ValueError, match="MatrixSign.solve: A has 1 non-finite"):
        MatrixSign().solve(A, np.eye(3))
    # Under jit the values are unknown at trace time: a run-time error.
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="non-finite"):
        jax.jit(lambda a: jaxou.lyapunov(a, jnp.eye(3)))(A)
    for solver in (Eigh(), MatrixSign(), Kronecker()):
        sol = jax.jit(solver.solve)(np.eye(3), Q)
        assert int(sol.result) != LyapunovResult.SUCCESSFUL, _name(solver)


def test_integer_inputs_promote():
    X = jaxou.lyapunov(np.eye(2, dtype=int), 2 * np.eye(2, dtype=int))
    assert jnp.issubdtype(X.dtype, jnp.floating)
    np.testing.assert_allclose(X, np.eye(2))


# ---------------------------------------------------------------------------
# Test matrices: SciPy's Lyapunov and Riccati test problems (scipy/linalg/tests/
# test_solvers.py; CAREX: P. Benner, A. J. Laub, V. Mehrmann (1995), A collection
# of benchmark examples for the numerical solution of algebraic Riccati equations
# II: continuous-time case, TU Chemnitz-Zwickau SPC 95_23), as stable matrices:
# negated where -A is the stable one, plus eps I where A is singular. For each
# problem and solver, either the result is SUCCESSFUL and the solution is what
# its rtol claims (true residual within rtol, and the distance to SciPy's solution
# within the bound that the two residuals imply), or the result says it is not and
# `lyapunov` raises.


def _carex16(eps):
    # CAREX 16: the periodic second-difference matrix (symmetric, singular); -A16 +
    # eps I has eigenvalues in [eps, 4 + eps], condition number 4 / eps.
    A16 = (
        np.eye(64, k=-1)
        - 2 * np.eye(64)
        + np.rot90(block_diag(1, np.zeros((62, 62)), 1))
        + np.eye(64, k=1)
    )
    return -A16 + eps * np.eye(64), np.eye(64)


def _carex_file(n):
    path = os.path.join(os.path.dirname(scipy.linalg.__file__), "tests", "data", n)
    if not os.path.exists(path):
        pytest.skip(f"SciPy's test data {n} is not installed")
    with np.load(path) as f:
        return f["A"], f["Q"]


def _case(name):
    """(A, Q) of a named test problem, A stable."""
    if name == "scipy-gh4176":
        return -np.array([[0.0, 1.0], [-0.5, -1.0]]), np.array([[0.0, 0.0], [0.0, 9.0]])
    if name == "carex3":
        A = np.array(
            [
                [0, 1, 0, 0],
                [0, -1.89, 0.39, -5.53],
                [0, -0.034, -2.98, 2.43],
                [0.034, -0.0011, -0.99, -0.21],
            ]
        )
        Q = np.array(
            [
                [2.313, 2.727, 0.688, 0.023],
                [2.727, 4.271, 1.148, 0.323],
                [0.688, 1.148, 0.313, 0.102],
                [0.023, 0.323, 0.102, 0.083],
            ]
        )
        return -A, Q
    if name == "carex4":
        main = [-0.991, -1.051, -1.118, -1.548, -1.64, -1.721, -1.823, -1.943]
        sup = [0.529, 0.596, 0.596, 0.718, 0.799, 0.901, 1.021]
        sub = [0.522] * 3 + [0.922] * 4
        A = np.diag(main) + np.diag(sub, -1) + np.diag(sup, 1)
        Q = np.eye(8)
        Q[0, 4] = Q[4, 0] = Q[2, 5] = Q[5, 2] = 0.5
        Q[0, 7] = Q[7, 0] = Q[1, 4] = Q[4, 1] = 0.1
        Q[4, 4] = Q[5, 5] = Q[6, 6] = Q[7, 7] = 0.1
        return -A, Q
    if name == "carex5":
        A = np.array(
            [
                [-4.019, 5.120, 0.0, 0.0, -2.082, 0.0, 0.0, 0.0, 0.870],
                [-0.346, 0.986, 0.0, 0.0, -2.340, 0.0, 0.0, 0.0, 0.970],
                [-7.909, 15.407, -4.069, 0.0, -6.450, 0.0, 0.0, 0.0, 2.680],
                [-21.816, 35.606, -0.339, -3.870, -17.800, 0.0, 0.0, 0.0, 7.390],
                [-60.196, 98.188, -7.907, 0.340, -53.008, 0.0, 0.0, 0.0, 20.400],
                [0, 0, 0, 0, 94.000, -147.200, 0.0, 53.200, 0.0],
                [0, 0, 0, 0, 0, 94.000, -147.200, 0, 0],
                [0, 0, 0, 0, 0, 12.800, 0.000, -31.600, 0],
                [0, 0, 0, 0, 12.800, 0.000, 0.000, 18.800, -31.600],
            ]
        )
        return -A, np.eye(9)
    if name == "carex8":
        return np.diag([0.1, 0.02]), np.array([[100.0, 1000.0], [1000.0, 10000.0]])
    if name == "carex10":  # symmetric, eigenvalues 1e-7 and 2
        return np.array([[1.0000001, 1.0], [1.0, 1.0000001]]), np.eye(2)
    if name == "carex11":  # stable as it is; Q indefinite
        return np.array([[3.0, 1.0], [4.0, 2.0]]), np.array([[-11.0, -5.0], [-5.0, -2.0]])
    if name == "carex12":  # symmetric, eigenvalues 1e6 to 3e6; Q spans 12 decades
        A = np.array([[7e6, 2e6, 0.0], [2e6, 6e6, -2e6], [0.0, -2e6, 5e6]]) / 3
        T = np.array([[1.0, -2.0, -2.0], [-2.0, 1.0, -2.0], [-2.0, -2.0, 1.0]])
        return A, T @ np.diag([1e-6, 1, 1e6]) @ T / 9
    if name.startswith("carex16-"):
        return _carex16(float(name.split("-", 1)[1]))
    if name == "carex6":
        A, Q = _carex_file("carex_6_data.npz")
        return -A, Q
    if name == "carex15":  # singular: eigenvalues in [-1, 0]
        A, Q = _carex_file("carex_15_data.npz")
        return -A + 1e-6 * np.eye(len(A)), Q
    if name == "carex18":
        A, Q = _carex_file("carex_18_data.npz")
        return -A, Q
    raise KeyError(name)


SMALL_CASES = [
    "scipy-gh4176",
    "carex3",
    "carex4",
    "carex5",
    "carex8",
    "carex10",
    "carex11",
    "carex12",
]
LARGE_CASES = ["carex16-1e-8", "carex16-1e-12", "carex6", "carex15", "carex18"]


def _inv_norm(A):
    """‖L⁻¹‖₂ for L(X) = AX + XAᵀ: 1 / (2 λ_min) for symmetric A, else the largest
    singular value of L⁻¹ (exactly for small d; by ARPACK with SciPy's solver
    applying L⁻¹ and L⁻ᵀ otherwise)."""
    d = len(A)
    if np.array_equal(A, A.T):
        return 1 / (2 * np.linalg.eigvalsh(A)[0])
    if d <= 12:
        K = np.kron(A, np.eye(d)) + np.kron(np.eye(d), A)
        return 1 / np.linalg.svd(K, compute_uv=False)[-1]
    solve = scipy.linalg.solve_continuous_lyapunov
    op = scipy.sparse.linalg.LinearOperator(
        (d * d, d * d),
        matvec=lambda v: solve(A, v.reshape(d, d)).ravel(),
        rmatvec=lambda v: solve(A.T, v.reshape(d, d)).ravel(),
    )
    return scipy.sparse.linalg.svds(op, k=1, return_singular_vectors=False, tol=1e-8)[0]


def _check_claim(solver, A, Q, ref, inv_norm):
    """Either SUCCESSFUL and as accurate as its rtol claims, or raising in
    `lyapunov`. Returns the result."""
    from jaxou._lyapunov.base import default_rtol

    d = len(A)
    eps = np.finfo(np.float64).eps
    sol = solver.solve(A, Q)
    result = LyapunovResult(int(sol.result))
    if result != LyapunovResult.SUCCESSFUL:
        with pytest.raises(eqx.EquinoxRuntimeError, match=MESSAGE[result]):
            jaxou.lyapunov(A, Q, solver=solver)
        return result
    X = np.asarray(sol.value)
    rtol = solver.rtol or default_rtol(np.float64, d)

    def residual(X):  # absolute, and the scale it is relative to
        scale = 2 * np.linalg.norm(A) * np.linalg.norm(X) + np.linalg.norm(Q)
        return np.linalg.norm(A @ X + X @ A.T - Q), scale

    # Evaluating the residual in float64 is exact to (d + 2) eps relative to `scale`.
    slack = (d + 2) * eps
    (r, scale), (r_ref, scale_ref) = residual(X), residual(ref)
    assert r <= (rtol + slack) * scale, (r / scale, rtol)
    # X - ref = L⁻¹(R - R_ref), with R, R_ref the exact residuals.
    bound = inv_norm * ((r / scale + slack) * scale + (r_ref / scale_ref + slack) * scale_ref)
    assert np.linalg.norm(X - ref) <= bound, (np.linalg.norm(X - ref), bound)
    return result


def _run_cases(name):
    A, Q = _case(name)
    assert np.all(np.linalg.eigvals(A).real > 0), "the test problem must be stable"
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    inv_norm = _inv_norm(A)
    asym = np.linalg.norm(A - A.T) / (2 * np.linalg.norm(A))
    results = {}
    solvers = [Eigh(), MatrixSign(), AutoLyapunov()] + ([Kronecker()] if len(A) <= 40 else [])
    for solver in solvers:
        results[_name(solver)] = _check_claim(solver, A, Q, ref, inv_norm)
    # The backward-stable solvers succeed wherever they apply (Eigh: A symmetric to
    # rounding); Eigh refuses a clearly non-symmetric A.
    if asym <= 1e-15:
        assert results["Eigh"] == LyapunovResult.SUCCESSFUL
    elif asym > 1e-6:
        assert results["Eigh"] == LyapunovResult.INACCURATE
    if "Kronecker" in results:
        assert results["Kronecker"] == LyapunovResult.SUCCESSFUL
    return results


@pytest.mark.parametrize("name", SMALL_CASES)
def test_scipy_test_matrices(name):
    results = _run_cases(name)
    assert results["AutoLyapunov"] == LyapunovResult.SUCCESSFUL


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE_CASES)
def test_carex_large(name):
    results = _run_cases(name)
    if name == "carex16-1e-12":
        # The bug this guards against: the sign iteration returned a relative
        # residual of 4.7e-6 (‖R‖_F / ‖Q‖_F ≈ 1e7) and called it a success.
        assert results["MatrixSign"] == LyapunovResult.INACCURATE
        with pytest.raises(eqx.EquinoxRuntimeError, match="MatrixSign returned a relative"):
            jaxou.lyapunov(*_case(name), solver=MatrixSign())


def test_carex16_sign_is_checked():
    # The fast version of the CAREX 16 check, at d = 16: the periodic second
    # difference, negated, plus eps I.
    d, eps = 16, 1e-12
    A = 2 * np.eye(d) - np.eye(d, k=1) - np.eye(d, k=-1)
    A[0, -1] = A[-1, 0] = -1.0
    A = A + eps * np.eye(d)
    Q = np.eye(d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    inv_norm = 1 / (2 * np.linalg.eigvalsh(A)[0])
    assert _check_claim(Eigh(), A, Q, ref, inv_norm) == LyapunovResult.SUCCESSFUL
    # The sign iteration's residual is 1.5e-6 here (3.6e-12 allowed by default).
    assert _check_claim(MatrixSign(), A, Q, ref, inv_norm) == LyapunovResult.INACCURATE
    # Asked for less, it succeeds, and its answer is as good as that rtol claims.
    loose = MatrixSign(rtol=1e-3)
    assert _check_claim(loose, A, Q, ref, inv_norm) == LyapunovResult.SUCCESSFUL


# ---------------------------------------------------------------------------
# Transient growth: stable drifts whose symmetric part is indefinite.


def _transient(rng, name):
    if name == "jordan":
        return np.array([[1.0, 50.0], [0.0, 1.0]])
    d = 6  # upper triangular: eigenvalues on the diagonal, large coupling above it
    return np.diag(rng.uniform(0.5, 2.0, d)) + np.triu(8 * rng.standard_normal((d, d)), 1)


@pytest.mark.parametrize("name", ["jordan", "random6"])
def test_transient_growth_drifts(rng, name):
    A = _transient(rng, name)
    d = len(A)
    assert np.linalg.eigvalsh(A + A.T)[0] < 0 < np.min(np.linalg.eigvals(A).real)
    Q = random_psd(rng, d)
    ref = scipy.linalg.solve_continuous_lyapunov(A, Q)
    inv_norm = _inv_norm(A)
    for solver in (MatrixSign(), Kronecker(), AutoLyapunov()):
        assert _check_claim(solver, A, Q, ref, inv_norm) == LyapunovResult.SUCCESSFUL
        X = jaxou.lyapunov(A, Q, solver=solver)
        # ‖L⁻¹‖ (and so the attainable accuracy) is large here: the bound above is
        # the real check; this one says the answer is also close in plain terms.
        assert rel_err(X, ref) <= 1e-10, _name(solver)


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
