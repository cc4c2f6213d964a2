"""Every operator representation against its dense matrix, on the same random problems:
the operator algebra, Gaussians (KL and its parts, log-density, sampling), SGD stages
(stationary and finite-time laws), two-stage bounds and their gradients in lr and B."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl
import scipy.stats

import jaxou

from helpers import random_orthogonal

D = 12  # one size for every fast test: one compilation per function


def _dplr(rng, m, *, zeros=(), psd=True, lo=0.2, hi=2.0):
    g = rng.uniform(lo, hi, D)
    g[list(zeros)] = 0.0
    Z = rng.standard_normal((D, m))
    S = rng.standard_normal((m, m))
    S = S @ S.T / m if psd else 0.5 * (S + S.T)
    return jaxou.DiagonalPlusLowRank(g, Z, S)


def _representations(rng):
    """(name, operator) pairs covering each representation, all positive definite."""
    return [
        ("dense", jaxou.Dense(_dplr(rng, 3).as_matrix())),
        ("diagonal", jaxou.Diagonal(rng.uniform(0.2, 2.0, D))),
        ("dplr", _dplr(rng, 3)),
        ("dplr-rank-deficient", _dplr(rng, 4)),
    ]


def _rank_deficient(rng):
    M = _dplr(rng, 3)
    return jaxou.DiagonalPlusLowRank(
        M.diagonal, jnp.concatenate([M.factor, M.factor[:, :1]], 1), jnp.eye(4)
    )


def test_operator_algebra_against_dense(rng):
    ops = [op for _, op in _representations(rng)] + [_rank_deficient(rng)]
    # An indefinite core that leaves the matrix positive definite (a difference).
    M = _dplr(rng, 2)
    ops.append(jaxou.DiagonalPlusLowRank(M.diagonal + 3.0, M.factor, -0.2 * M.core))
    x = rng.standard_normal(D)
    X = rng.standard_normal((D, 3))
    for op in ops:
        A = np.asarray(op.as_matrix())
        assert np.allclose(op.mv(x), A @ x, rtol=1e-12, atol=1e-12)
        assert np.allclose(op.mv(X), A @ X, rtol=1e-12, atol=1e-12)
        assert np.allclose(op.solve(X), np.linalg.solve(A, X), rtol=1e-10, atol=1e-12)
        assert np.isclose(op.logdet(), np.linalg.slogdet(A)[1], rtol=1e-12, atol=1e-12)
        assert np.isclose(op.trace(), np.trace(A), rtol=1e-12)
        assert np.allclose(op.diagonal_values(), np.diag(A), rtol=1e-12)
        R = np.asarray(op.root_mv(jnp.eye(op.root_width)))  # rows: R e_i, so Rᵀ R... = M
        assert np.allclose(R.T @ R, A, rtol=1e-10, atol=1e-12)
        assert np.allclose(op.scale(2.5).as_matrix(), 2.5 * A, rtol=1e-14)


def test_products_over_row_blocks(rng):
    """The row-blocked products behind whitening, solves and the KL (d above two
    blocks, with a remainder) against NumPy, and their gradient against the
    product formed at once."""
    from jaxou._operator.lowrank import weighted_gram, weighted_sq_norms

    d = 2 * 8192 + 1001
    X, Y = rng.standard_normal((d, 4)), rng.standard_normal((d, 3))
    w = rng.uniform(0.5, 2, d)
    np.testing.assert_allclose(weighted_gram(X, w, Y), X.T @ (w[:, None] * Y), rtol=1e-12)
    np.testing.assert_allclose(weighted_sq_norms(X, w), w @ X**2, rtol=1e-12)
    f = lambda v: jnp.sum(weighted_gram(jnp.asarray(X), v, jnp.asarray(Y)) ** 2)
    g = lambda v: jnp.sum((X.T @ (v[:, None] * Y)) ** 2)
    ref = jax.grad(g)(jnp.asarray(w))  # entries that cancel get absolute rounding
    np.testing.assert_allclose(
        jax.grad(f)(jnp.asarray(w)), ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max()
    )
    # the symmetric Gram by column blocks on and above the diagonal (3 blocks here)
    from jaxou._operator.lowrank import weighted_sym_gram

    Xw = rng.standard_normal((d, 530))
    ref = Xw.T @ (w[:, None] * Xw)
    np.testing.assert_allclose(weighted_sym_gram(Xw, w), ref, rtol=1e-12, atol=1e-13 * ref.max())
    fs = lambda v: jnp.sum(jnp.sin(weighted_sym_gram(jnp.asarray(Xw[:, :300]), v)))
    gs = lambda v: jnp.sum(jnp.sin(Xw[:, :300].T @ (v[:, None] * Xw[:, :300])))
    ref = jax.grad(gs)(jnp.asarray(w))
    np.testing.assert_allclose(
        jax.grad(fs)(jnp.asarray(w)), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max()
    )
    M = jaxou.DiagonalPlusLowRank(w, X, jnp.diag(jnp.asarray([1.0, 2.0, 0.5, 3.0])))
    x = rng.standard_normal(d)
    # M⁻¹x by Woodbury in NumPy (an m × m system)
    A = X / w[:, None]
    K = np.linalg.inv(np.diag([1.0, 1 / 2, 2.0, 1 / 3]) + X.T @ A)
    ref = x / w - A @ (K @ (A.T @ x))
    np.testing.assert_allclose(M.solve(x), ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


def test_zero_diagonal_entries_move_into_the_factor(rng):
    M = _dplr(rng, 3, zeros=(0, 5))
    P = M.with_positive_diagonal()
    assert P.rank == M.rank + 2 and np.all(np.asarray(P.diagonal) > 0)
    assert np.allclose(P.as_matrix(), M.as_matrix(), atol=1e-14)
    # An all-zero diagonal at large d (an exact per-example noise factor) is refused
    # with the reason, not turned into a d x d allocation.
    big = jaxou.DiagonalPlusLowRank(jnp.zeros(20_000), jnp.ones((20_000, 1)))
    with pytest.raises(ValueError, match="diagonal entries are zero"):
        big.with_positive_diagonal()


def test_gaussian_kl_logpdf_against_dense(rng):
    reps = _representations(rng)
    means = [rng.standard_normal(D) for _ in reps]
    x = rng.standard_normal((5, D))
    for (name_p, P), mp in zip(reps, means):
        p, p_dense = jaxou.Gaussian(mp, P), jaxou.Gaussian(mp, P.as_matrix())
        ref = scipy.stats.multivariate_normal(mp, np.asarray(P.as_matrix())).logpdf(x)
        assert np.allclose(p.log_prob(x), ref, rtol=1e-11), name_p
        for (name_q, Q), mq in zip(reps, means[::-1]):
            q, q_dense = jaxou.Gaussian(mq, Q), jaxou.Gaussian(mq, Q.as_matrix())
            got, want = jaxou.kl_parts(p, q), jaxou.kl_parts(p_dense, q_dense)
            # The Woodbury form sums O(d) terms of size ~1 that cancel for p = q: its
            # absolute error is a few hundred ulps times d (1e-13 seen), where the
            # dense Cholesky form sums non-negative terms.
            for a, b in zip(got, want):
                assert np.isclose(a, b, rtol=1e-10, atol=1e-12 * D), (name_p, name_q)


def test_kl_with_zero_diagonal_entries_matches_dense(rng):
    """A posterior covariance whose diagonal part has zeros (a singular noise
    diagonal): still positive definite, and the structured KL agrees with dense."""
    P = _dplr(rng, 6, zeros=(1, 7), lo=0.5)
    P = jaxou.DiagonalPlusLowRank(P.diagonal, P.factor, P.core + 0.5 * jnp.eye(6))
    A = np.asarray(P.as_matrix())
    assert np.linalg.eigvalsh(A)[0] > 0
    Q = _dplr(rng, 2)
    mp, mq = rng.standard_normal(D), rng.standard_normal(D)
    got = jaxou.kl_parts(jaxou.Gaussian(mp, P), jaxou.Gaussian(mq, Q))
    want = jaxou.kl_parts(jaxou.Gaussian(mp, A), jaxou.Gaussian(mq, Q.as_matrix()))
    assert np.allclose(got, want, rtol=1e-10)


def test_w2_closed_form_and_dense_fallback(rng):
    a, b = rng.uniform(0.1, 2, D), rng.uniform(0.1, 2, D)
    mp, mq = rng.standard_normal(D), rng.standard_normal(D)
    got = jaxou.w2(jaxou.Gaussian(mp, jaxou.Diagonal(a)), jaxou.Gaussian(mq, jaxou.Diagonal(b)))
    want = np.sqrt(np.sum((mp - mq) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert np.isclose(got, want, rtol=1e-12)
    P = _dplr(rng, 3)
    dense = jaxou.w2(jaxou.Gaussian(mp, P.as_matrix()), jaxou.Gaussian(mq, np.diag(b)))
    assert np.isclose(jaxou.w2(jaxou.Gaussian(mp, P), jaxou.Gaussian(mq, jaxou.Diagonal(b))), dense)


@pytest.mark.slow
def test_sampling_moments_within_standard_errors(rng):
    n = 40_000
    for name, op in _representations(rng)[1:]:
        mean = rng.standard_normal(D)
        x = np.asarray(jaxou.Gaussian(mean, op).sample(jax.random.key(3), (n,)))
        A = np.asarray(op.as_matrix())
        se_mean = np.sqrt(np.diag(A) / n)
        assert np.all(np.abs(x.mean(0) - mean) < 5 * se_mean), name
        # Var of a sample covariance entry: (A_ij² + A_ii A_jj) / n.
        se_cov = np.sqrt((A**2 + np.outer(np.diag(A), np.diag(A))) / n)
        assert np.all(np.abs(np.cov(x.T) - A) < 5 * se_cov), name


def _stage_pair(rng, *, constant_diagonal):
    U = random_orthogonal(rng, D)[:, :3]
    lam = np.array([3.0, 1.5, 0.8])
    h = np.full(D, 0.4) if constant_diagonal else rng.uniform(0.3, 1.0, D)
    H = jaxou.DiagonalPlusLowRank(h, U, np.diag(lam))
    C = _dplr(rng, 2)
    return H, C


@pytest.mark.parametrize("constant_diagonal", [True, False])
def test_stationary_law_against_scipy(rng, constant_diagonal):
    """A constant diagonal part: the exact structured solution; otherwise the
    low-rank ADI solver (asked for a relative residual of 1e-12)."""
    H, C = _stage_pair(rng, constant_diagonal=constant_diagonal)
    solver = None if constant_diagonal else jaxou.LowRankADI(rtol=1e-12)
    stage = jaxou.SGDStage(H, C, jnp.ones(D), 0.05, 8.0, solver=solver)
    law = stage.stationary()
    assert isinstance(law.cov, jaxou.DiagonalPlusLowRank)  # never a dense fallback
    ref = sl.solve_continuous_lyapunov(np.asarray(H.as_matrix()), 0.05 / 8 * C.as_matrix())
    assert np.allclose(law.cov_matrix(), ref, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_finite_time_laws_and_bound_with_a_non_constant_diagonal(rng):
    """Operator stages whose Hessian has a non-constant diagonal part and whose
    noise has a zero diagonal entry: the low-rank solver, the flow e^{-tH} and the
    structured KL, against the same model held densely. The default tolerances
    (√ε ≈ 1.5e-8 relative residual, √ε compression) bound the errors here by about
    1e-8 relative."""
    H_s, C = _stage_pair(rng, constant_diagonal=False)
    C = jaxou.DiagonalPlusLowRank(C.diagonal.at[3].set(0.0), C.factor, C.core)
    H_t = jaxou.DiagonalPlusLowRank(1.3 * H_s.diagonal, H_s.factor, 0.6 * H_s.core)
    theta = 0.1 * rng.standard_normal(D)
    init_op = jaxou.Gaussian(jnp.zeros(D), jaxou.Diagonal(jnp.full(D, 0.5)))
    init_dense = jaxou.Gaussian(jnp.zeros(D), 0.5 * jnp.eye(D))
    op = jaxou.TwoStage(
        init_op,
        jaxou.SGDStage(H_s, C, jnp.zeros(D), 0.05, 8.0),
        jaxou.SGDStage(H_t, C, theta, 0.01, 4.0),
        2.0,
        3.0,
    )
    dense = jaxou.TwoStage(
        init_dense,
        jaxou.SGDStage(H_s.as_matrix(), C.as_matrix(), jnp.zeros(D), 0.05, 8.0),
        jaxou.SGDStage(H_t.as_matrix(), C.as_matrix(), theta, 0.01, 4.0),
        2.0,
        3.0,
    )
    for t in (1e-3, 1.0, 40.0):
        a, b = op.pretrain.marginal(init_op, t), dense.pretrain.marginal(init_dense, t)
        assert isinstance(a.cov, jaxou.DiagonalPlusLowRank)
        assert np.allclose(a.mean, b.mean, rtol=1e-12, atol=1e-14)
        assert np.linalg.norm(a.cov_matrix() - b.cov) <= 1e-8 * np.linalg.norm(b.cov)
    got, want = jaxou.two_stage_bound(op, 1e6, 1e3), jaxou.two_stage_bound(dense, 1e6, 1e3)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.allclose(a, b, rtol=1e-7), (a, b)
    disc = jaxou.domain_discrepancy(op.pretrain, op.finetune)
    assert np.allclose(disc, jaxou.domain_discrepancy(dense.pretrain, dense.finetune), rtol=1e-7)


def test_diagonal_stage_is_exact_and_finite_time_matches_dense(rng):
    h, c, s0 = rng.uniform(0.2, 2, D), rng.uniform(0.1, 1, D), rng.uniform(0.5, 2, D)
    stage = jaxou.SGDStage(jaxou.Diagonal(h), jaxou.Diagonal(c), jnp.ones(D), 0.1, 4.0)
    dense = jaxou.SGDStage(np.diag(h), np.diag(c), jnp.ones(D), 0.1, 4.0)
    assert np.allclose(stage.stationary().cov.diagonal, 0.1 / 4 * c / (2 * h), rtol=1e-14)
    init = jaxou.Gaussian(np.zeros(D), jaxou.Diagonal(s0))
    init_dense = jaxou.Gaussian(np.zeros(D), np.diag(s0))
    for t in (1e-6, 0.7, 30.0):
        law, ref = stage.marginal(init, t), dense.marginal(init_dense, t)
        assert isinstance(law.cov, jaxou.Diagonal)
        assert np.allclose(law.mean, ref.mean, rtol=1e-12)
        assert np.allclose(law.cov_matrix(), ref.cov, rtol=1e-11, atol=1e-16)


def _models(rng):
    H_s, C_s = _stage_pair(rng, constant_diagonal=True)
    H_t = jaxou.DiagonalPlusLowRank(H_s.diagonal * 1.5, H_s.factor, 0.7 * H_s.core)
    theta = 0.1 * rng.standard_normal(D)

    def build(lr_t, b_t, dense):
        conv = (lambda M: M.as_matrix()) if dense else (lambda M: M)
        init = jaxou.Gaussian(jnp.zeros(D), jnp.eye(D) if dense else jaxou.Diagonal(jnp.ones(D)))
        src = jaxou.SGDStage(conv(H_s), conv(C_s), jnp.zeros(D), 0.05, 16.0)
        tgt = jaxou.SGDStage(conv(H_t), conv(C_s), theta, lr_t, b_t)
        return jaxou.TwoStage(init, src, tgt)

    return build


def test_two_stage_bound_and_discrepancy_against_dense(rng):
    build = _models(rng)
    op, dense = build(0.02, 8.0, False), build(0.02, 8.0, True)
    got = jaxou.two_stage_bound(op, 1e6, 1e3, kind="kl")
    want = jaxou.two_stage_bound(dense, 1e6, 1e3, kind="kl")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.allclose(a, b, rtol=1e-9), (a, b)
    disc = jaxou.domain_discrepancy(op.pretrain, op.finetune)
    ref = jaxou.domain_discrepancy(dense.pretrain, dense.finetune)
    assert np.allclose(disc, ref, rtol=1e-9)


def test_gradients_in_lr_and_batch_size_against_dense(rng):
    build = _models(rng)

    def bound(lr_t, b_t, dense):
        return jaxou.two_stage_bound(build(lr_t, b_t, dense), 1e6, 1e3).finetune_bound

    g_op = jax.grad(bound, argnums=(0, 1))(0.02, 8.0, False)
    g_dense = jax.grad(bound, argnums=(0, 1))(0.02, 8.0, True)
    assert np.allclose(g_op, g_dense, rtol=1e-8)
    h = 1e-6  # and against central differences
    fd = (bound(0.02 + h, 8.0, False) - bound(0.02 - h, 8.0, False)) / (2 * h)
    assert np.isclose(g_op[0], fd, rtol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: jaxou.Gaussian(np.zeros(3), jaxou.Diagonal([1.0, np.nan, 1.0])), "non-finite"),
        (lambda: jaxou.Gaussian(np.zeros(3), jaxou.Diagonal([1.0, -1.0, 1.0])), "semi-definite"),
        (lambda: jaxou.Gaussian(np.zeros(4), jaxou.Diagonal(np.ones(3))), "mean of shape"),
        (lambda: jaxou.Gaussian([0.0, np.inf], np.eye(2)), "mean has non-finite"),
        (lambda: jaxou.Gaussian(np.zeros(2), [[1.0, 0.0], [0.0, np.nan]]), "non-finite"),
        (lambda: jaxou.Gaussian(np.zeros(2), [[1.0, 2.0], [2.0, 1.0]]), "semi-definite"),
        (lambda: jaxou.Gaussian(np.zeros(2), [[1.0, 0.5], [0.0, 1.0]]), "not symmetric"),
        (
            lambda: jaxou.DiagonalPlusLowRank(np.ones(3), np.ones((3, 2)), -np.eye(2)).check(
                "C", definite=False
            ),
            "C is not positive semi-definite",
        ),
        (lambda: jaxou.DiagonalPlusLowRank(np.ones(3), np.ones((4, 2))), "factor must be"),
        (
            lambda: jaxou.SGDStage(
                jaxou.Diagonal(np.ones(3)), jaxou.Diagonal(np.ones(3)), [0, 0, np.inf], 0.1, 1
            ),
            "minimum has non-finite",
        ),
        (
            lambda: jaxou.SGDStage(
                jaxou.Diagonal([1.0, 0.0, 1.0]), jaxou.Diagonal(np.ones(3)), np.zeros(3), 0.1, 1
            ),
            "hessian is not positive definite",
        ),
    ],
)
def test_bad_operator_input_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.slow
def test_kl_between_large_scale_laws_against_dense(rng):
    """The issue's d = 2,000 problem, scaled down to d = 400 (h spread 10³, k = 20,
    m = 50, 10 % of c zero): the KL between two stationary laws from LowRankADI
    against the dense computation. The KL weighs errors by Σ⁻¹ (condition ~10⁶), so
    the solver is asked for a relative residual of 1e-10; measured at d = 2,000 with
    the default √ε: 1.5e-6, with 1e-10: 5e-9."""
    d, k, m = 400, 20, 50
    c = rng.uniform(0.5, 1.0, d)
    c[rng.choice(d, d // 10, replace=False)] = 0.0
    C = jaxou.DiagonalPlusLowRank(c, rng.standard_normal((d, m)) / np.sqrt(m))

    def hessian(scale):
        h = np.exp(rng.uniform(np.log(1e-3), 0.0, d))
        U = np.linalg.qr(rng.standard_normal((d, k)))[0]
        return jaxou.DiagonalPlusLowRank(h, U, np.diag(scale * np.logspace(0, -2, k)))

    H1, H2 = hessian(1.0), hessian(2.0)
    solver = jaxou.LowRankADI(rtol=1e-10)
    s1 = jaxou.SGDStage(H1, C, np.zeros(d), 0.05, 32.0, solver=solver)
    s2 = jaxou.SGDStage(H2, C, 0.01 * np.ones(d), 0.02, 16.0, solver=solver)
    got = jaxou.domain_discrepancy(s1, s2)
    X1 = sl.solve_continuous_lyapunov(np.asarray(H1.as_matrix()), 0.05 / 32 * C.as_matrix())
    X2 = sl.solve_continuous_lyapunov(np.asarray(H2.as_matrix()), 0.02 / 16 * C.as_matrix())
    want = jaxou.kl_parts(
        jaxou.Gaussian(0.01 * np.ones(d), 0.5 * (X2 + X2.T)),
        jaxou.Gaussian(np.zeros(d), 0.5 * (X1 + X1.T)),
    )
    assert np.allclose(got, want, rtol=1e-6), (got, want)
