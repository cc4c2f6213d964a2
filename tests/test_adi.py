"""The large-scale Lyapunov solver (LowRankADI) and the finite-time laws at scale
(flow_operator, finite_time_cov), against SciPy's dense solutions and expm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl
import scipy.special

from jaxou._lyapunov.adi import LowRankADI, zolotarev_error, zolotarev_shifts
from jaxou._lyapunov.base import LyapunovResult
from jaxou._lyapunov.expm import cf_rational, finite_time_cov, flow_operator
from jaxou._operator import Dense, Diagonal, DiagonalPlusLowRank


def make_problem(rng, d, k, m, spread, *, zeros=0.1, dtype=np.float64):
    """H = diag(h) + UΛUᵀ (h log-spread over `spread`, Λ positive, U not
    orthonormal) and C = diag(c) + Z S Zᵀ PSD with a fraction `zeros` of c = 0 and
    an indefinite core S (the negative block lives where c > 0 and is dominated by
    it). Returns the operators and their dense matrices."""
    h = np.exp(rng.uniform(np.log(1 / spread), 0, d))
    h[:2] = 1 / spread, 1.0
    U = rng.standard_normal((d, k)) / np.sqrt(d)
    lam = np.diag(rng.uniform(0.5, 5, k))
    c = rng.uniform(0.5, 1.5, d)
    c[rng.random(d) < zeros] = 0
    m1, m2 = m - m // 4, m // 4
    Z1 = rng.standard_normal((d, m1)) / np.sqrt(m1)
    Z2 = rng.standard_normal((d, m2)) * (c > 0)[:, None]
    delta = 0.5 * c[c > 0].min() / np.linalg.norm(Z2, 2) ** 2
    Z = np.concatenate([Z1, Z2], axis=1)
    S = sl.block_diag(np.eye(m1), -delta * np.eye(m2))
    Hd, Cd = np.diag(h) + U @ lam @ U.T, np.diag(c) + Z @ S @ Z.T
    assert np.linalg.eigvalsh(Cd).min() > -1e-10 and np.linalg.eigvalsh(S).min() < 0
    H = DiagonalPlusLowRank(*(x.astype(dtype) for x in (h, U, lam)))
    C = DiagonalPlusLowRank(*(x.astype(dtype) for x in (c, Z, S)))
    return H, C, Hd, Cd


def true_residual(X, Hd, Cd):
    return np.linalg.norm(Hd @ X + X @ Hd - Cd) / np.linalg.norm(Cd)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(12)
    H, C, Hd, Cd = make_problem(rng, 300, 8, 16, 1e4)
    return H, C, Hd, Cd, sl.solve_continuous_lyapunov(Hd, Cd)


@pytest.fixture(scope="module")
def solved(problem):
    """LowRankADI solutions of `problem`, by rtol (each solved once)."""
    H, C = problem[:2]
    return {rtol: LowRankADI(rtol=rtol).solve_with_stats(H, C) for rtol in (1e-5, 1e-9)}


def test_matches_scipy(problem, solved):
    """Singular c, an h spread of 10^4, an indefinite core: the solution against
    SciPy's dense solve, within what its own residual guarantees:
    ‖X - X*‖_F ≤ ‖R‖_F / (2 λ_min(H))."""
    H, C, Hd, Cd, X_ref = problem
    sol, stats = solved[1e-9]
    assert LyapunovResult(int(sol.result)) == LyapunovResult.SUCCESSFUL
    assert isinstance(sol.value, DiagonalPlusLowRank)
    X = np.asarray(sol.value.as_matrix())
    err = np.linalg.norm(X - X_ref)
    bound = float(sol.residual) * np.linalg.norm(Cd) / (2 * np.linalg.eigvalsh(Hd).min())
    assert err <= bound
    assert err / np.linalg.norm(X_ref) < 1e-7
    # The diagonal part is the exact split D0 = q / 2h, the core diagonal.
    np.testing.assert_allclose(sol.value.diagonal, C.diagonal / (2 * H.diagonal), rtol=1e-15)
    assert np.count_nonzero(np.asarray(sol.value.core - jnp.diag(jnp.diag(sol.value.core)))) == 0
    assert stats.rank == sol.value.rank and stats.interval[0] <= np.linalg.eigvalsh(Hd).min()
    assert stats.interval[1] >= np.linalg.eigvalsh(Hd).max()


@pytest.mark.parametrize("rtol", [1e-5, 1e-9])
def test_reported_residual_bounds_true_residual(problem, solved, rtol):
    """The reported residual (ADI residual + compression bounds) is an upper bound of
    the true relative residual computed densely, within a factor of it, and below
    rtol."""
    H, C, Hd, Cd, _ = problem
    sol, stats = solved[rtol]
    reported = float(sol.residual)
    true = true_residual(np.asarray(sol.value.as_matrix()), Hd, Cd)
    assert reported <= rtol
    assert true <= reported * (1 + 1e-6)
    assert true >= reported / 10
    bound = stats.adi_residual + stats.truncation_residual
    assert reported == pytest.approx(max(bound, stats.probe_residual))
    # The probe: a lower confidence bound, not far below the truth.
    assert true / 3 <= stats.probe_residual <= true


def test_convergence_in_steps(problem):
    """Error against the number of ADI steps: one full Zolotarev cycle of J shifts,
    no compression, for J = 2..10. The true residual is below the a-priori bound
    ε_J² ‖F‖ and decays geometrically (log-linear fit), and within each run the
    ADI residual never increases (every factor of r_J(H) has norm < 1)."""
    H, C, Hd, Cd, X_ref = problem
    Js = np.arange(2, 11, 2)
    residuals, errors = [], []
    for J in Js:
        solver = LowRankADI(rtol=1e-15, num_shifts=int(J), max_steps=int(J))
        sol, stats = solver.solve_with_stats(H, C)
        assert LyapunovResult(int(sol.result)) == LyapunovResult.NOT_CONVERGED
        X = np.asarray(sol.value.as_matrix())
        residuals.append(true_residual(X, Hd, Cd))
        errors.append(np.linalg.norm(X - X_ref) / np.linalg.norm(X_ref))
        assert residuals[-1] <= stats.predicted * (1 + 1e-6)
        assert residuals[-1] == pytest.approx(stats.history[-1], rel=1e-6)
        assert np.all(np.diff(stats.history) <= 1e-12 * stats.history[0])
    slope_res, _ = np.polyfit(Js, np.log(residuals), 1)
    slope_err, _ = np.polyfit(Js, np.log(errors), 1)
    a, b = stats.interval
    rate = np.log(zolotarev_error(a, b, zolotarev_shifts(a, b, 10))) * 2 / 10
    assert slope_res < 0.5 * rate < 0 and slope_err < 0.5 * rate
    assert np.all(np.diff(errors) < 0)


@pytest.mark.parametrize("spread", [1e2, 1e4])
def test_float32(spread):
    """float32 operators: float32 result. At κ(H) ≈ 10^2 it meets the float32
    default tolerance; at 10^4 float32 cannot (the rounding floor is above it), and
    the probed residual says so instead of the iteration's optimistic bound: the
    reported residual is never far below the true one."""
    H, C, Hd, Cd = make_problem(np.random.default_rng(32), 200, 6, 12, spread, dtype=np.float32)
    sol, stats = LowRankADI().solve_with_stats(H, C)
    assert sol.value.dtype == jnp.float32 and sol.residual.dtype == jnp.float32
    true = true_residual(np.asarray(sol.value.as_matrix(), np.float64), Hd, Cd)
    rtol = float(np.sqrt(np.finfo(np.float32).eps))
    result = LyapunovResult(int(sol.result))
    assert float(sol.residual) >= true / 3
    if spread == 1e2:
        assert result == LyapunovResult.SUCCESSFUL and true <= rtol
    else:
        assert result == LyapunovResult.INACCURATE
        assert stats.adi_residual + stats.truncation_residual <= rtol < stats.probe_residual


def test_max_rank_compresses_in_the_loop(problem):
    """A memory bound that forces compressions during the iteration: the factor
    never exceeds it and the reported residual still bounds the true one."""
    H, C, Hd, Cd, _ = problem
    n_rhs = 16 + 2 * 8
    sol, stats = LowRankADI(rtol=1e-6, max_rank=5 * n_rhs).solve_with_stats(H, C)
    assert stats.rank <= 5 * n_rhs and stats.steps > 5
    true = true_residual(np.asarray(sol.value.as_matrix()), Hd, Cd)
    assert true <= float(sol.residual) * (1 + 1e-6)
    if LyapunovResult(int(sol.result)) == LyapunovResult.SUCCESSFUL:
        assert float(sol.residual) <= 1e-6
    else:
        assert LyapunovResult(int(sol.result)) == LyapunovResult.INACCURATE


def test_without_max_rank_a_wide_iteration_compresses_in_the_loop(monkeypatch):
    """No `max_rank`: once the blocks pass `auto_width` (here lowered from 2,048 to
    128 columns, so that d = 1,000 shows it) the iteration compresses in the loop,
    at widths of at most d/2 (beyond, it holds its blocks to the end), and meets
    its tolerance (the true residual); without the rule it compresses once, at the
    end, and gives the same X within the two tolerances. Where 2,048 columns
    exceed d/2 the rule stays off."""
    from jaxou._lyapunov import lowrank

    H, C, Hd, Cd = make_problem(np.random.default_rng(5), 1000, 8, 16, 1e4)
    n = 16 + 2 * 8
    widths, original = [], lowrank.LowRankAccumulator.compress

    def recorded(self, budget, **kwargs):
        if kwargs.get("gram2") is not None:  # the iteration's (not the right-hand side's)
            widths.append(self.width)
        return original(self, budget, **kwargs)

    monkeypatch.setattr(lowrank.LowRankAccumulator, "compress", recorded)
    monkeypatch.setattr(lowrank, "AUTO_COLUMNS", 128)
    sol, stats = LowRankADI(rtol=1e-8).solve_with_stats(H, C)
    in_loop = widths[:-1]
    assert len(in_loop) >= 2 and max(in_loop) <= 500 < stats.steps * n
    assert LyapunovResult(int(sol.result)) == LyapunovResult.SUCCESSFUL
    X = np.asarray(sol.value.as_matrix())
    assert true_residual(X, Hd, Cd) <= float(sol.residual) <= 1e-8
    monkeypatch.setattr(lowrank, "AUTO_COLUMNS", 10**9)
    widths.clear()
    ref = LowRankADI(rtol=1e-8).solve(H, C)
    assert len(widths) == 1 and widths[0] > 500
    Xr = np.asarray(ref.value.as_matrix())
    # Both within their residual of the exact solution: ‖X - X*‖ ≤ ‖R‖ / 2λ_min(H).
    bound = 2e-8 * np.linalg.norm(Cd) / (2 * np.linalg.eigvalsh(Hd).min())
    assert np.linalg.norm(X - Xr) <= bound
    monkeypatch.undo()
    assert lowrank.auto_width(0, 64, 1000) is None  # 2,048 columns: off below d = 4,096
    assert lowrank.auto_width(500, 180, 10**6) == 2048
    assert lowrank.auto_width(1000, 180, 10**6) == 2360


@pytest.mark.parametrize("max_rank", [None, 4 * 32])
def test_residual_gram_recurrence(problem, monkeypatch, max_rank):
    """The G₂ = (HZ)ᵀ(HZ) that scores each compression comes from the ADI
    recurrence, not from H: at every compression (in the loop, after a rebase, and
    the last) it matches the product formed densely from the panels, to rounding,
    where it is used (the scores θ_i θ_j G₂_ij; the core is diagonal here). Entries
    of directions with a negligible θ, carried through the shifted rotation of a
    compression, are not reproduced to rounding, and need not be."""
    from jaxou._lyapunov import lowrank

    H, C, Hd, _, _ = problem
    seen, original = [], lowrank.LowRankAccumulator.compress

    def checked(self, budget, *, gram2=None, max_width=None):
        if gram2 is not None:
            Z = np.concatenate([np.asarray(p) for p in self.panels], axis=1)
            explicit = (Hd @ Z).T @ (Hd @ Z)
            theta = np.abs(np.diag(self.core))
            np.testing.assert_array_equal(self.core, np.diag(np.diag(self.core)))
            weight = np.outer(theta, theta)
            seen.append(np.abs(weight * (gram2 - explicit)).max() / (weight * explicit).max())
        return original(self, budget, gram2=gram2, max_width=max_width)

    monkeypatch.setattr(lowrank.LowRankAccumulator, "compress", checked)
    LowRankADI(rtol=1e-8, max_rank=max_rank).solve(H, C)
    assert len(seen) >= (3 if max_rank else 1)
    assert max(seen) < 1e-12


def test_diagonal_cases(rng):
    """Diagonal H and Q: X = Q / 2h exactly (rank 0). Diagonal H, low-rank Q
    (k = 0, an indefinite core): against SciPy."""
    d = 60
    h, q = rng.uniform(0.1, 2, d), rng.uniform(-1, 1, d)
    sol = LowRankADI().solve(Diagonal(h), Diagonal(q))
    assert sol.value.rank == 0 and float(sol.residual) <= 1e-15
    np.testing.assert_allclose(sol.value.diagonal, q / (2 * h), rtol=1e-15)
    Z, S = rng.standard_normal((d, 4)), np.diag([1.0, -2.0, 0.5, 3.0])
    Q = DiagonalPlusLowRank(q, Z, S)
    sol = LowRankADI(rtol=1e-12).solve(Diagonal(h), Q)
    ref = sl.solve_continuous_lyapunov(np.diag(h), np.asarray(Q.as_matrix()))
    np.testing.assert_allclose(sol.value.as_matrix(), ref, atol=1e-10 * np.abs(ref).max())


def test_zolotarev_shifts():
    """Shifts against SciPy's Jacobi elliptic functions (an independent dn), the
    closed form √(ab) for one shift, and more shifts giving a smaller bound."""
    a, b = 0.01, 3.0
    k2 = 1 - (a / b) ** 2
    K = scipy.special.ellipk(k2)
    J = 5
    ref = [b * scipy.special.ellipj((2 * i - 1) * K / (2 * J), k2)[2] for i in range(1, J + 1)]
    np.testing.assert_allclose(zolotarev_shifts(a, b, J), ref, rtol=1e-9)
    assert zolotarev_shifts(a, b, 1)[0] == pytest.approx(np.sqrt(a * b), rel=1e-12)
    # Optimality: |r| equioscillates, so it peaks at both ends of [a, b]; and the
    # error follows Zolotarev's asymptotic 2 exp(-π² J / (2 ln 4κ)).
    for kappa in (1e2, 1e6):
        for J in (4, 8, 16):
            p = zolotarev_shifts(1 / kappa, 1.0, J)
            err = zolotarev_error(1 / kappa, 1.0, p)
            ends = [np.prod(np.abs((x - p) / (x + p))) for x in (1 / kappa, 1.0)]
            np.testing.assert_allclose(ends, err, rtol=1e-6)
            asymptotic = 2 * np.exp(-(np.pi**2) * J / (2 * np.log(4 * kappa)))
            assert 0.9 * asymptotic < err < 1.1 * asymptotic


def test_unstable_and_bad_input(rng):
    d = 20
    h = rng.uniform(0.5, 1, d)
    U = rng.standard_normal((d, 2))
    Q = DiagonalPlusLowRank(np.ones(d), rng.standard_normal((d, 3)))
    solver = LowRankADI()
    # Not positive definite: a non-positive diagonal with k = 0; an indefinite Λ.
    h_bad = h.copy()
    h_bad[3] = -0.1
    assert int(solver.solve(Diagonal(h_bad), Q).result) == LyapunovResult.UNSTABLE
    H_indef = DiagonalPlusLowRank(h, U, np.diag([1.0, -100.0]))
    assert int(solver.solve(H_indef, Q).result) == LyapunovResult.UNSTABLE
    # Positive definite but with a zero in the diagonal part: the split needs h > 0.
    e = np.zeros((d, 1))
    e[3] = 1
    H_zero = DiagonalPlusLowRank(np.where(np.arange(d) == 3, 0.0, h), e, np.eye(1))
    with pytest.raises(ValueError, match="diagonal part of A must be positive"):
        solver.solve(H_zero, Q)
    H = DiagonalPlusLowRank(h, U)
    with pytest.raises(ValueError, match="non-finite entries in its factor"):
        solver.solve(H, DiagonalPlusLowRank(np.ones(d), np.full((d, 3), np.nan)))
    with pytest.raises(ValueError, match="non-finite entries in its diagonal"):
        solver.solve(DiagonalPlusLowRank(np.where(np.arange(d) == 0, np.inf, h), U), Q)
    with pytest.raises(ValueError, match="A is 20 x 20 but Q is 21 x 21"):
        solver.solve(H, Diagonal(np.ones(d + 1)))
    with pytest.raises(TypeError, match="dtype"):
        solver.solve(H, Diagonal(np.ones(d, np.float32)))
    with pytest.raises(TypeError, match="must be a jaxou.DiagonalPlusLowRank"):
        solver.solve(Dense(np.eye(d)), Q)
    with pytest.raises(ValueError, match="not symmetric"):
        solver.solve(DiagonalPlusLowRank(h, U, np.array([[1.0, 2.0], [0.0, 1.0]])), Q)
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda hh: solver.solve(DiagonalPlusLowRank(hh, U), Q).residual)(h)
    with pytest.raises(ValueError, match="max_rank=8 is below twice"):
        LowRankADI(max_rank=8).solve(H, Q)
    for kwargs in ({"max_steps": 0}, {"max_rank": -1}, {"num_shifts": 1.5}):
        with pytest.raises(ValueError, match="must be a positive int"):
            LowRankADI(**kwargs)
    with pytest.raises(ValueError, match="rtol"):
        LowRankADI(rtol=2.0)


# ---------------------------------------------------------------------------
# Finite-time laws


def test_cf_rational_error():
    """The CF approximation of e^{-x} on [0, ∞): the error `cf_rational` reports,
    checked on points it did not use (including huge x), near 9.3^-n."""
    for n, bound in ((8, 1e-7), (14, 5e-13)):
        poles, residues, err = cf_rational(n)
        x = np.concatenate([np.random.default_rng(n).uniform(0, 50, 2000), [1e6, 1e9]])
        approx = 2 * np.real(np.sum(residues / (x[:, None] - poles), axis=1))
        assert np.max(np.abs(approx - np.exp(-x))) <= 1.01 * err <= bound


@pytest.mark.parametrize("t", [0.0, 0.03, 2.0, 500.0, np.inf])
def test_flow_operator(problem, t):
    """e^{-tH} as diagonal plus low rank against the eigendecomposition of the dense
    H (spectral norm: the documented 2 ε_n, plus rounding of the sum over the
    poles, 10 ε_mach Σ|c_k|)."""
    H, _, Hd, _, _ = problem
    F = flow_operator(H, t)
    lam, V = np.linalg.eigh(Hd)
    ref = (V * np.exp(-t * lam)) @ V.T
    err = np.linalg.norm(np.asarray(F.as_matrix()) - ref, 2)
    poles, residues, eps_n = cf_rational(14)
    rounding = 10 * np.finfo(np.float64).eps * 2 * np.sum(np.abs(residues))
    assert err <= 2 * eps_n + rounding
    assert F.rank == (0 if t in (0.0, np.inf) else 14 * 8)


@pytest.fixture(scope="module")
def small():
    """A smaller problem (d = 160) for the finite-time laws, its stationary law by
    LowRankADI and that law's error against SciPy."""
    rng = np.random.default_rng(160)
    H, C, Hd, Cd = make_problem(rng, 160, 5, 8, 1e3)
    X_ref = sl.solve_continuous_lyapunov(Hd, Cd)
    value = LowRankADI(rtol=1e-9).solve(H, C).value
    return H, Hd, X_ref, value, np.linalg.norm(np.asarray(value.as_matrix()) - X_ref)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "lowrank"])
def test_finite_time_cov(small, kind):
    """Σ(t) = Σ∞ + e^{-Ht}(Σ₀ - Σ∞)e^{-Ht} at three times against the dense
    expm-based reference, within the documented accuracy: rtol‖L‖_F (compression)
    + 4 ε_n ‖Σ₀ - Σ∞‖_F (the flow) + 2‖E∞‖_F (the error of Σ∞)."""
    H, Hd, X_ref, Sinf, err_inf = small
    d = Hd.shape[0]
    rng = np.random.default_rng(7)
    if kind == "isotropic":
        S0 = Diagonal(jnp.full(d, 0.3))
    elif kind == "diagonal":
        S0 = Diagonal(rng.uniform(0, 2, d))
    else:
        S0 = DiagonalPlusLowRank(rng.uniform(0.1, 2, d), rng.standard_normal((d, 3)))
    S0d = np.asarray(S0.as_matrix())
    rtol = 1e-9
    for t in (0.05, 3.0, 300.0):
        St = finite_time_cov(H, Sinf, S0, t, rtol=rtol)
        E = sl.expm(-t * Hd)
        ref = X_ref + E @ (S0d - X_ref) @ E
        low = np.asarray(St.as_matrix()) - np.diag(St.diagonal)
        bound = (
            rtol * np.linalg.norm(low)
            + 4 * cf_rational(14)[2] * np.linalg.norm(S0d - X_ref)
            + 2 * err_inf
        )
        err = np.linalg.norm(np.asarray(St.as_matrix()) - ref)
        assert err <= bound
        assert err / np.linalg.norm(ref) < 1e-8
        decay = np.exp(-2 * t * np.asarray(H.diagonal))
        expected = Sinf.diagonal + (np.asarray(S0.diagonal) - Sinf.diagonal) * decay
        np.testing.assert_allclose(St.diagonal, expected, rtol=1e-10)
    assert finite_time_cov(H, Sinf, S0, np.inf) is not None


def test_finite_time_cov_bad_input(small):
    H, _, _, Sinf, _ = small
    S0 = Diagonal(jnp.ones(H.dim))
    with pytest.raises(ValueError, match="t must be >= 0"):
        finite_time_cov(H, Sinf, S0, -1.0)
    with pytest.raises(ValueError, match="t must be >= 0"):
        finite_time_cov(H, Sinf, S0, np.nan)
    with pytest.raises(ValueError, match="initial is 159 x 159"):
        finite_time_cov(H, Sinf, Diagonal(jnp.ones(H.dim - 1)), 1.0)
    with pytest.raises(TypeError, match="initial must be"):
        finite_time_cov(H, Sinf, np.eye(H.dim), 1.0)
    with pytest.raises(ValueError, match="not positive definite"):
        bad = DiagonalPlusLowRank(H.diagonal, H.factor, -100 * H.core)
        flow_operator(bad, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        finite_time_cov(H, Sinf, Diagonal(jnp.full(H.dim, jnp.nan)), 1.0)


# ---------------------------------------------------------------------------
# d = 2,000 (slow)


@pytest.mark.slow
def test_d2000_against_scipy():
    """The benchmark case: d = 2,000, h spread over 10^3, k = 20, m = 50, 10 % of c
    zero: Σ∞ and Σ(t) at three times to 1e-8 relative (Frobenius)."""
    rng = np.random.default_rng(2000)
    H, C, Hd, Cd = make_problem(rng, 2000, 20, 50, 1e3)
    X_ref = sl.solve_continuous_lyapunov(Hd, Cd)
    sol = LowRankADI(rtol=1e-8).solve(H, C)
    X = np.asarray(sol.value.as_matrix())
    assert LyapunovResult(int(sol.result)) == LyapunovResult.SUCCESSFUL
    assert np.linalg.norm(X - X_ref) / np.linalg.norm(X_ref) < 1e-8
    assert true_residual(X, Hd, Cd) <= float(sol.residual) * (1 + 1e-6)
    S0 = Diagonal(jnp.full(2000, 0.5))
    for t in (0.1, 10.0, 1000.0):
        E = sl.expm(-t * Hd)
        ref = X_ref + E @ (0.5 * np.eye(2000) - X_ref) @ E
        St = finite_time_cov(H, sol.value, S0, t, rtol=1e-10)
        assert np.linalg.norm(np.asarray(St.as_matrix()) - ref) / np.linalg.norm(ref) < 1e-8
