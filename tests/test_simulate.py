"""Monte Carlo engine: moments against the exact laws (SciPy and closed forms), the
exact sampler's law (KS), transient growth, weak and strong orders, chunking,
sharding, errors, progress meters, no recompilation; the diagnostics of
`jaxou._diagnostics`; the counter-based generator.

Tolerances come from standard errors with a Bonferroni correction at a family-wise
level ALPHA per test (fixed seeds, so each test is deterministic); slopes are
log-log fits over nested step sizes sharing one Brownian path.
"""

import os
import subprocess
import sys
import textwrap
from typing import ClassVar

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import jaxou
from jaxou._simulate import BLOCK, _run_chunk, merge_chunks, plan_simulation, run_chunk
from jaxou._solvers import PathsControlTerm
from jaxou._stats import block_moments

ALPHA = 1e-3
D = 3
TS = [0.0, 0.5, 1.0, 1.5]  # 1.0 = end of pre-training
N = 4096


def _stage(seed, lr=0.1):
    r = np.random.default_rng(seed)
    Q = np.linalg.qr(r.normal(size=(D, D)))[0]
    H = (Q * r.uniform(0.5, 2.0, D)) @ Q.T
    C = np.eye(D) + 0.3 * np.ones((D, D))
    return jaxou.SGDStage(H, C, r.normal(size=D), lr, 1.0)


@pytest.fixture(scope="module")
def model():
    init = jaxou.Gaussian(np.full(D, 0.5), 0.5 * np.eye(D))
    return jaxou.TwoStage(init, _stage(1), _stage(2), 1.0, 0.5)


def _z_crit(k: int) -> float:
    """Two-sided Bonferroni critical value for k z-scores at level ALPHA."""
    return float(scipy.stats.norm.isf(ALPHA / (2 * k)))


def _assert_moments(sim, laws):
    z_mean, z_cov = sim.z_scores(laws)
    d = sim.mean.shape[-1]
    iu = np.triu_indices(d)
    zs = np.concatenate([np.ravel(z_mean), np.ravel(np.asarray(z_cov)[:, iu[0], iu[1]])])
    assert np.max(np.abs(zs)) < _z_crit(zs.size), np.max(np.abs(zs))


def _chain_laws(model, ts, dt, method="euler"):
    """The exact law of the numerical chain itself, on the same equal-step grid as
    simulate: a reference with no discretisation bias to absorb. For this linear
    SDE (additive noise) each scheme is a linear Gaussian recursion
    x' - θ* = M (x - θ*) + ε, ε ~ N(0, Q), so m' = θ* + M(m-θ*), S' = M S Mᵀ + Q:

    - euler: M = I - hH, Q = hD;
    - heun (Diffrax's: stages y0 and y0 + hf(y0) + GΔW, weights ½, ½): M = I - hH +
      (hH)²/2, Q = h N D Nᵀ with N = I - hH/2;
    - sea (Diffrax's SEA, Foster et al. 2023 eq. 5.8: y1 = y0 + h f(y0 + G(ΔW/2 + H))
      + GΔW, H the space-time Lévy area ~ N(0, h/12)): M = I - hH,
      Q = h N D Nᵀ + (h³/12) H D Hᵀ.
    """
    stages = [(model.pretrain, 0.0, 1.0), (model.finetune, 1.0, 1.5)]
    m, S = np.asarray(model.init.mean), np.asarray(model.init.cov)
    d = m.shape[0]
    out, t = [], 0.0
    if ts[0] == 0.0:
        out.append((m, S))
    for stage, start, end in stages:
        H, Dm = np.asarray(stage.hessian), np.asarray(stage.diffusion_cov)
        mu = np.asarray(stage.minimum)
        ends = [x for x in ts if start < x <= end]
        ends = ends if ends and ends[-1] == end else ends + [end]
        for te in ends:
            k = int(np.ceil((te - t) / dt * (1 - 1e-12)))
            h = (te - t) / k
            eye = np.eye(d)
            N = eye - h * H / 2
            M, Q = {
                "euler": (eye - h * H, h * Dm),
                "heun": (eye - h * H + (h * H) @ (h * H) / 2, h * N @ Dm @ N.T),
                "sea": (eye - h * H, h * N @ Dm @ N.T + h**3 / 12 * H @ Dm @ H.T),
            }[method]
            for _ in range(k):
                m = mu + M @ (m - mu)
                S = M @ S @ M.T + Q
            t = te
            if te in ts:
                out.append((m, S))
    return jaxou.Gaussian(np.stack([o[0] for o in out]), np.stack([o[1] for o in out]))


def _euler_laws(model, ts, dt):
    return _chain_laws(model, ts, dt, "euler")


# ---------------------------------------------------------------------------
# Laws


def test_exact_moments_and_ks(model, key):
    sim = jaxou.simulate(model, key, n_paths=N, solver=jaxou.ExactOU(), ts=TS, keep_paths=True)
    assert sim.paths.shape == (N, len(TS), D)
    assert sim.mean.shape == (len(TS), D) and sim.cov.shape == (len(TS), D, D)
    laws = jaxou.analytic_marginals(model, TS)
    _assert_moments(sim, laws)
    # The streamed statistics are those of the kept paths.
    paths = np.asarray(sim.paths)
    np.testing.assert_allclose(sim.mean, paths.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sim.cov[-1], np.cov(paths[:, -1].T), rtol=0, atol=1e-12)
    # KS on random projections: u·X ~ N(u·m, uᵀΣu) at every saved time.
    r = np.random.default_rng(0)
    U = r.normal(size=(4, D))
    pvals = []
    for i in range(len(TS)):
        m, S = np.asarray(laws.mean[i]), np.asarray(laws.cov[i])
        for u in U:
            proj = paths[:, i] @ u
            pvals.append(scipy.stats.kstest(proj, "norm", args=(u @ m, np.sqrt(u @ S @ u))).pvalue)
    assert min(pvals) > ALPHA / len(pvals), min(pvals)
    # The KL helper agrees with jaxou.kl.
    np.testing.assert_allclose(sim.kl_to(laws), jaxou.kl(sim.gaussian(), laws), rtol=1e-12)


def test_euler_moments_and_no_recompile(model, key):
    sim = jaxou.simulate(model, key, n_paths=N, dt=0.01, ts=TS)
    assert sim.paths is None
    _assert_moments(sim, _euler_laws(model, TS, 0.01))
    # Same shapes, other key and dt: the compiled chunk is reused.
    size = _run_chunk._cached._cache_size()
    sim2 = jaxou.simulate(model, jax.random.key(7), n_paths=N, dt=0.02, ts=TS)
    assert _run_chunk._cached._cache_size() == size
    _assert_moments(sim2, _euler_laws(model, TS, 0.02))


# A stable drift whose symmetric part is indefinite (eigenvalues of A + Aᵀ: -48, 52):
# a Jordan-like block whose mean and covariance grow by a factor ~20 before they
# decay (transient growth), and a non-normal flow e^{-At} = e^{-t}[[1, -50t], [0, 1]].
GROWTH_A = np.array([[1.0, 50.0], [0.0, 1.0]])
GROWTH_G = np.array([[0.3, 0.0], [0.2, 0.5]])
GROWTH_MU = np.array([0.5, -0.5])
GROWTH_INIT = (np.array([1.0, 1.0]), 0.1 * np.eye(2))
GROWTH_TS = [0.25, 1.0, 3.0]


def _scipy_marginals(A, G, mu, m0, S0, ts):
    """The exact marginals from SciPy alone: F = expm(-At), Σ∞ from
    solve_continuous_lyapunov (A Σ + Σ Aᵀ = GGᵀ), cov = F S0 Fᵀ + Σ∞ - F Σ∞ Fᵀ."""
    S_inf = scipy.linalg.solve_continuous_lyapunov(A, G @ G.T)
    means, covs = [], []
    for t in ts:
        F = scipy.linalg.expm(-A * t)
        means.append(mu + F @ (m0 - mu))
        covs.append(F @ S0 @ F.T + S_inf - F @ S_inf @ F.T)
    return np.stack(means), np.stack(covs)


def _growth_z(sim, mean, cov, n):
    var = np.diagonal(cov, axis1=-2, axis2=-1)
    zm = (np.asarray(sim.mean) - mean) / np.sqrt(var / n)
    se = np.sqrt((var[:, :, None] * var[:, None, :] + cov**2) / (n - 1))
    zc = (np.asarray(sim.cov) - cov) / se
    return np.concatenate([zm.ravel(), zc[:, [0, 0, 1], [0, 1, 1]].ravel()])


@pytest.mark.parametrize("solver", ["exact", pytest.param("euler", marks=pytest.mark.slow)])
def test_transient_growth_against_scipy(solver):
    assert np.linalg.eigvalsh(GROWTH_A + GROWTH_A.T)[0] < 0 < np.linalg.eigvals(GROWTH_A).real.min()
    proc = jaxou.OUProcess(GROWTH_A, GROWTH_MU, GROWTH_G)
    initial = jaxou.Gaussian(*GROWTH_INIT)
    mean, cov = _scipy_marginals(GROWTH_A, GROWTH_G, GROWTH_MU, *GROWTH_INIT, GROWTH_TS)
    assert np.max(np.abs(mean)) > 10 * np.max(np.abs(GROWTH_INIT[0]))  # it does grow
    n, dt = 8192, 2.5e-4
    kw = dict(n_paths=n, t1=3.0, initial=initial, ts=GROWTH_TS)
    if solver == "exact":
        sim = jaxou.simulate(proc, jax.random.key(11), solver=jaxou.ExactOU(), **kw)
    else:
        # Euler's own bias at this step, from the exact law of its chain, is a small
        # fraction of a standard error, so the exact marginals are the reference.
        for t, m, S in zip(GROWTH_TS, mean, cov):
            chain = _ou_chain_law(GROWTH_A, GROWTH_MU, GROWTH_G, *GROWTH_INIT, dt, round(t / dt))
            bias = _growth_z(_Moments(chain[0][None], chain[1][None]), m[None], S[None], n)
            assert np.max(np.abs(bias)) < 0.1, (t, bias)
        sim = jaxou.simulate(proc, jax.random.key(12), dt=dt, **kw)
        # The library's analytic laws agree with SciPy's.
        laws = jaxou.analytic_marginals(proc, GROWTH_TS, initial=initial)
        np.testing.assert_allclose(laws.mean, mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(laws.cov, cov, rtol=1e-8, atol=1e-9)
    zs = _growth_z(sim, mean, cov, n)
    assert np.max(np.abs(zs)) < _z_crit(zs.size), zs


class _Moments:
    def __init__(self, mean, cov):
        self.mean, self.cov = mean, cov


@pytest.mark.slow
def test_exact_solver_alone_in_diffeqsolve():
    """ExactOU() without precomputed matrices, as a plain Diffrax solver: it computes
    the transition of each step from the terms; two steps of 0.5 against SciPy."""
    n = 4000
    A = np.array([[1.0, 0.4], [-0.3, 2.0]])  # not symmetric: the general flow
    G = np.array([[0.5, 0.0], [0.2, 0.3]])
    proc = jaxou.OUProcess(A, np.array([1.0, -1.0]), G)
    bm = diffrax.UnsafeBrownianPath(jax.ShapeDtypeStruct((n, 2), jnp.float64), jax.random.key(4))
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(proc.drift_field),
        PathsControlTerm(proc.diffusion_field, bm),
    )
    x0 = jnp.tile(jnp.array([2.0, 0.0]), (n, 1))
    solver = jaxou.ExactOU()
    sol = diffrax.diffeqsolve(terms, solver, 0.0, 1.0, 0.5, x0, adjoint=diffrax.ForwardMode())
    y = np.asarray(sol.ys[-1])
    mean, cov = _scipy_marginals(
        A, G, np.array([1.0, -1.0]), np.array([2.0, 0.0]), np.zeros((2, 2)), [1.0]
    )
    sample = _Moments(y.mean(0)[None], np.cov(y.T)[None])
    zs = _growth_z(sample, mean, cov, n)
    assert np.max(np.abs(zs)) < _z_crit(zs.size), zs


# ---------------------------------------------------------------------------
# Chunks, devices, progress


def test_chunks_merge_exactly_and_do_not_change_draws(model, key):
    """Chunking changes no draw: the merged statistics equal the one-chunk run, and
    `simulate` is `plan_simulation` + `run_chunk` + `merge_chunks`. (The one-chunk
    run has the shapes of test_euler_moments_and_no_recompile: no new compilation.)"""
    kw = dict(n_paths=N - 24, dt=0.05, ts=TS)
    whole = jaxou.simulate(model, key, **kw)
    chunked = jaxou.simulate(model, key, chunk_size=4 * BLOCK, **kw)
    np.testing.assert_allclose(chunked.mean, whole.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(chunked.cov, whole.cov, rtol=0, atol=1e-12)
    plan = plan_simulation(model, key, chunk_size=4 * BLOCK, **kw)
    assert plan.n_chunks == 4
    parts = [run_chunk(plan, i) for i in reversed(range(plan.n_chunks))][::-1]
    assert [int(p.moments.count) for p in parts] == [1024, 1024, 1024, 1000]
    again = merge_chunks(plan, parts)
    np.testing.assert_array_equal(again.mean, chunked.mean)
    np.testing.assert_array_equal(again.cov, chunked.cov)
    with pytest.raises(ValueError, match="parts"):
        merge_chunks(plan, parts[:3])
    with pytest.raises(ValueError, match="index"):
        run_chunk(plan, 4)


def test_progress_meter(capsys):
    """A Diffrax progress meter advances at each saved time, once per chunk."""
    proc = jaxou.OUProcess(np.eye(2), np.zeros(2), 0.5 * np.eye(2))
    jaxou.simulate(
        proc,
        jax.random.key(0),
        n_paths=2 * BLOCK,
        t1=1.0,
        initial=np.zeros(2),
        solver=jaxou.ExactOU(),
        ts=[0.25, 0.5, 0.75, 1.0],
        chunk_size=BLOCK,
        progress_meter=diffrax.TextProgressMeter(minimum_increase=0.1),
    )
    lines = capsys.readouterr().out.split()
    assert lines == ["0.00%", "25.00%", "50.00%", "75.00%", "100.00%"] * 2, lines


_SHARD_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    import jaxou
    assert len(jax.devices()) == 4, jax.devices()
    d = 3
    def stage(s):
        r = np.random.default_rng(s)
        Q = np.linalg.qr(r.normal(size=(d, d)))[0]
        H = (Q * r.uniform(0.5, 2, d)) @ Q.T
        return jaxou.SGDStage(H, np.eye(d), r.normal(size=d), 0.1, 1.0)
    model = jaxou.TwoStage(jaxou.Gaussian.isotropic(np.zeros(d), 1.0), stage(1), stage(2), 1.0, 0.5)
    kw = dict(n_paths=1500, dt=0.05, ts=[0.5, 1.0, 1.5], keep_paths=True)
    many = jaxou.simulate(model, jax.random.key(0), **kw)
    one = jaxou.simulate(model, jax.random.key(0), devices=jax.devices()[:1], **kw)
    print("DIFF", float(np.max(np.abs(many.paths - one.paths))),
          float(np.max(np.abs(many.cov - one.cov))), float(np.max(np.abs(many.mean - one.mean))))
    """
)


@pytest.mark.slow
def test_sharded_equals_single_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", _SHARD_SCRIPT], env=env, capture_output=True, text=True, timeout=280
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("DIFF")][0]
    diffs = [float(x) for x in line.split()[1:]]
    assert max(diffs) < 1e-12, diffs


# ---------------------------------------------------------------------------
# Statistics and errors


def test_block_moments_float32_keeps_digits():
    r = np.random.default_rng(0)
    n, d = 2**20, 4
    x = (1000.0 + r.normal(size=(n, d)) * np.array([1.0, 2.0, 3.0, 0.1])).astype(np.float32)
    m = block_moments(jnp.asarray(x).reshape(-1, BLOCK, d), jnp.ones((n // BLOCK, BLOCK)))
    x64 = x.astype(np.float64)
    mu = x64.mean(0)
    m2 = (x64 - mu).T @ (x64 - mu)
    assert m.mean.dtype == jnp.float32
    # A few float32 ulps, where the raw-moment formula loses every digit.
    assert np.max(np.abs(np.asarray(m.mean) - mu)) / 1000 < 1e-6
    assert np.max(np.abs(np.asarray(m.m2) - m2)) / np.max(np.abs(m2)) < 1e-6


def test_errors(model, key):
    proc = model.pretrain.process
    x0 = np.zeros(D)
    sim = jaxou.simulate
    with pytest.raises(ValueError, match="dt"):
        sim(model, key, n_paths=10, dt=0.0)
    with pytest.raises(ValueError, match="dt"):
        sim(model, key, n_paths=10, dt=-1.0)
    with pytest.raises(ValueError, match="dt is required"):
        sim(model, key, n_paths=10)
    with pytest.raises(ValueError, match="n_paths"):
        sim(model, key, n_paths=1, dt=0.1)
    with pytest.raises(TypeError, match="n_paths"):
        sim(model, key, n_paths=10.0, dt=0.1)
    with pytest.raises(ValueError, match="max_steps"):
        sim(model, key, n_paths=10, dt=1e-3, max_steps=100)
    # Objects, not strings.
    with pytest.raises(TypeError, match="solver"):
        sim(model, key, n_paths=10, dt=0.1, solver="euler")
    with pytest.raises(TypeError, match=r"FusedEuler\(\)"):
        sim(model, key, n_paths=10, dt=0.1, solver=jaxou.FusedEuler)
    with pytest.raises(TypeError, match="brownian"):
        sim(model, key, n_paths=10, dt=0.1, brownian="tree")
    with pytest.raises(ValueError, match="together"):
        jaxou.ExactOU(flow=jnp.eye(D))
    with pytest.raises(ValueError, match="without matrices"):
        sim(model, key, n_paths=10, solver=jaxou.ExactOU(jnp.eye(D), jnp.eye(D), 1.0))
    adaptive = diffrax.PIDController(rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="VirtualBrownianTree"):
        sim(
            model,
            key,
            n_paths=10,
            dt=0.1,
            stepsize_controller=adaptive,
            brownian=jaxou.CounterBrownianPath,
        )
    with pytest.raises(ValueError, match="ts"):
        sim(model, key, n_paths=10, dt=0.1, ts=[0.5, 2.0])
    with pytest.raises(ValueError, match="ts"):
        sim(model, key, n_paths=10, dt=0.1, ts=[-0.1, 0.5])
    with pytest.raises(ValueError, match="ts"):
        sim(model, key, n_paths=10, dt=0.1, ts=[1.0, 0.5])
    inf = jaxou.TwoStage(model.init, model.pretrain, model.finetune, float("inf"), 1.0)
    with pytest.raises(ValueError, match="t_pretrain"):
        sim(inf, key, n_paths=10, dt=0.1)
    with pytest.raises(ValueError, match="t1"):
        sim(proc, key, n_paths=10, dt=0.1, t1=float("inf"), initial=x0)
    with pytest.raises(ValueError, match="t1"):
        sim(proc, key, n_paths=10, dt=0.1, initial=x0)
    with pytest.raises(ValueError, match="initial"):
        sim(proc, key, n_paths=10, dt=0.1, t1=1.0)
    with pytest.raises(ValueError, match="t1 or initial"):
        sim(model, key, n_paths=10, dt=0.1, t1=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        sim(model, key, n_paths=10, dt=0.1, chunk_size=0)
    fake = jaxou.Simulation(jnp.zeros(1), jnp.zeros((1, D)), jnp.eye(D)[None], None, 10)
    with pytest.raises(TypeError, match="analytic_marginals"):
        fake.kl_to(model)


# ---------------------------------------------------------------------------
# Diagnostics


def test_kl_fit_floor_against_monte_carlo():
    """Mean and sd of the KL of Gaussian fits to n exact samples: a Monte Carlo over
    M replications (a random mean and covariance; the KL by Cholesky factors in
    NumPy) within Bonferroni bounds from its own standard errors."""
    r = np.random.default_rng(5)
    d, n, M = 3, 12, 20_000
    mu = r.normal(size=d)
    B = r.normal(size=(d, d))
    S = B @ B.T + 0.5 * np.eye(d)
    L = np.linalg.cholesky(S)
    x = mu + r.normal(size=(M, n, d)) @ L.T
    m = x.mean(1)
    dev = x - m[:, None]
    S_hat = np.einsum("mni,mnj->mij", dev, dev) / (n - 1)
    W = np.linalg.solve(L, np.linalg.solve(L, S_hat).transpose(0, 2, 1))  # L⁻¹ Ŝ L⁻ᵀ
    shift = np.linalg.solve(L, (m - mu).T).T
    kls = 0.5 * (np.trace(W, axis1=1, axis2=2) - d - np.linalg.slogdet(W)[1] + np.sum(shift**2, 1))
    mean, sd = jaxou.kl_fit_floor(d, n)
    z_mean = (kls.mean() - mean) / (kls.std() / np.sqrt(M))
    c = kls - kls.mean()
    z_var = (kls.var() - sd**2) / np.sqrt((np.mean(c**4) - kls.var() ** 2) / M)
    assert max(abs(z_mean), abs(z_var)) < _z_crit(2), (z_mean, z_var)
    # Large n: the chi-square limit, mean k/(2n) and sd sqrt(k/2)/n, k = d + d(d+1)/2.
    k = 3 + 6
    big = jaxou.kl_fit_floor(3, 10**6)
    np.testing.assert_allclose(big, (k / 2e6, np.sqrt(k / 2) / 1e6), rtol=1e-4)
    with pytest.raises(ValueError, match="n_paths > dim"):
        jaxou.kl_fit_floor(3, 3)


def test_monte_carlo_check(model, key):
    check = jaxou.monte_carlo_check(model, key, n_paths=2048)
    assert isinstance(check, jaxou.MonteCarloCheck) and check.passed, check
    assert check.n_paths == 2048
    assert (check.kl_floor, check.kl_floor_std) == jaxou.kl_fit_floor(D, 2048)
    assert 0 < check.kl_finetuned < check.kl_threshold
    assert check.max_z_mean < check.z_threshold and check.max_z_var < check.z_threshold
    with pytest.raises(TypeError, match="TwoStage"):
        jaxou.monte_carlo_check(model.pretrain, key)


@pytest.mark.slow
def test_monte_carlo_check_detects_a_biased_sampler(model, key):
    """Euler with dt = 0.25 has a variance bias of about λ dt / 2 (up to 25% here):
    the check must fail."""
    check = jaxou.monte_carlo_check(model, key, n_paths=4096, solver=jaxou.FusedEuler(), dt=0.25)
    assert not check.passed, check


# ---------------------------------------------------------------------------
# Orders (nested steps sharing one Brownian path: diffrax.VirtualBrownianTree)


def _slope(dts, errs):
    return np.polyfit(np.log(dts), np.log(errs), 1)[0]


@pytest.mark.slow
def test_weak_and_strong_order(key):
    A = np.array([[1.0, 0.5], [0.0, 2.0]])
    proc = jaxou.OUProcess(A, np.zeros(2), 0.5 * np.eye(2))
    x0 = np.array([3.0, -2.0])
    dts = [0.1, 0.05, 0.025, 0.0125]
    run = lambda dt, solver: jaxou.simulate(
        proc,
        key,
        n_paths=2048,
        dt=dt,
        t1=1.0,
        initial=x0,
        solver=solver,
        brownian=diffrax.VirtualBrownianTree,
        keep_paths=not isinstance(solver, diffrax.ShARK),
    )
    all_sims = {}
    cases = (("euler", jaxou.FusedEuler(), 1.0), ("shark", diffrax.ShARK(), 2.0))
    for name, solver, order in cases:
        sims = all_sims[name] = [run(dt, solver) for dt in dts]
        # Weak: successive differences of the moments (the shared path cancels the noise).
        dm = [np.linalg.norm(a.mean - b.mean) for a, b in zip(sims, sims[1:])]
        dc = [np.linalg.norm(a.cov - b.cov) for a, b in zip(sims, sims[1:])]
        assert abs(_slope(dts[:-1], dm) - order) < 0.25, (name, dm)
        assert abs(_slope(dts[:-1], dc) - order) < 0.25, (name, dc)
    # Strong (Euler): RMS distance to the exact solution driven by the same Brownian
    # path, X(T) = e^{-AT}x0 + ∫ e^{-A(T-s)} G dW(s), approximated on a fine grid by
    # composing exact per-step flows with the fine increments (exponential
    # midpoint, `_ExpMidpoint`): its own error is O(δ) with δ = dt_min/16 and a
    # smaller constant than Euler's (measured against δ/4: 1.4e-4, about 70x below
    # the smallest Euler error, 9.7e-3), so it does not bend the fitted slope.
    ref = run(dts[-1] / 16, _ExpMidpoint(jnp.asarray(A), 0.5 * np.eye(2), dts[-1] / 16))
    ref = ref.paths[:, -1]
    errs = [np.sqrt(np.mean(np.sum((s.paths[:, -1] - ref) ** 2, -1))) for s in all_sims["euler"]]
    assert abs(_slope(dts, errs) - 1.0) < 0.2, errs


class _ExpMidpoint(diffrax.AbstractItoSolver):
    r"""Reference integrator for dX = -AX dt + G dW driven by the solver's own
    Brownian increments: $X' = e^{-Ah}X + e^{-Ah/2} G\,\Delta W$ (the exact drift
    flow and the stochastic integral $\int_0^h e^{-A(h-s)}G\,dW(s)$ with its
    integrand frozen at the midpoint; local error variance $|A|^2 h^3/12$ per step,
    so O(h) strongly with a small constant). Zero mean only (μ = 0 here)."""

    term_structure: ClassVar = diffrax.MultiTerm[tuple[diffrax.ODETerm, diffrax.AbstractTerm]]
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation
    flow: jax.Array
    half_flow_g: jax.Array

    def __init__(self, A, G, h):
        A = np.asarray(A, np.float64)
        self.flow = jnp.asarray(scipy.linalg.expm(-A * h))
        self.half_flow_g = jnp.asarray(scipy.linalg.expm(-A * h / 2) @ np.asarray(G))

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 1.0

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        dw = terms.terms[1].contr(t0, t1)
        y1 = y0 @ self.flow.T + dw @ self.half_flow_g.T
        return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


# ---------------------------------------------------------------------------
# Other solvers and Brownian paths, each against the exact law of its own chain


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, brownian",
    [
        ("heun", jaxou.CounterBrownianPath),
        ("sea", jaxou.CounterBrownianPath),  # draws the space-time Lévy area H too
        ("euler", diffrax.UnsafeBrownianPath),  # one per block of paths
        ("euler", diffrax.VirtualBrownianTree),
        ("heun", diffrax.VirtualBrownianTree),
    ],
)
def test_solver_and_brownian_path_moments(model, key, name, brownian):
    dt = 0.05
    solver = {"heun": diffrax.Heun(), "sea": diffrax.SEA(), "euler": jaxou.FusedEuler()}[name]
    sim = jaxou.simulate(model, key, n_paths=N, dt=dt, ts=TS, solver=solver, brownian=brownian)
    _assert_moments(sim, _chain_laws(model, TS, dt, name))


# ---------------------------------------------------------------------------
# Euler in the noise eigenbasis (the default fast path), float32 as benchmarked


def _ou_chain_law(A, mu, G, m0, S0, dt, steps):
    """The exact law of the Euler chain x' = x - dt A(x - μ) + G ΔW from N(m0, S0)."""
    M = np.eye(len(mu)) - dt * A
    m, S = np.asarray(m0, np.float64) - mu, np.asarray(S0, np.float64)
    for _ in range(steps):
        m, S = M @ m, M @ S @ M.T + dt * G @ G.T
    return m + mu, S


def _assert_moments_any(sim, mean, cov, n):
    var = np.diag(cov)
    zm = (np.asarray(sim.mean[-1], np.float64) - mean) / np.sqrt(var / n)
    zc = (np.asarray(sim.cov[-1], np.float64) - cov) / np.sqrt(
        (np.outer(var, var) + cov**2) / (n - 1)
    )
    iu = np.triu_indices(len(mean))
    zs = np.concatenate([zm, zc[iu]])
    assert np.max(np.abs(zs)) < _z_crit(zs.size), np.max(np.abs(zs))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("commuting", marks=pytest.mark.slow),
        pytest.param("isotropic", marks=pytest.mark.slow),
        pytest.param("dense_unrolled", marks=pytest.mark.slow),  # also the growth test
        pytest.param("dense_matmul", marks=pytest.mark.slow),
    ],
)
def test_euler_eigenbasis_float32(case):
    from jaxou._solvers import noise_eigenbasis

    r = np.random.default_rng(11)
    d = 10 if case == "dense_matmul" else 4
    Q = np.linalg.qr(r.normal(size=(d, d)))[0]
    A = (Q * np.linspace(0.5, 3.0, d)) @ Q.T
    if case == "commuting":  # noise shares the drift's eigenvectors (the SGD case)
        G = (Q * np.sqrt(np.linspace(0.2, 1.0, d)[::-1])) @ Q.T
    elif case == "isotropic":  # a repeated noise eigenvalue: the basis must follow A
        G = 0.7 * np.eye(d)
    else:
        G = 0.5 * np.eye(d) + 0.2 * r.normal(size=(d, d))
    mu = r.normal(size=d)
    P, B, sigma = noise_eigenbasis(A, G @ G.T)
    assert (B.ndim == 1) == (case in ("commuting", "isotropic"))
    np.testing.assert_allclose(P @ np.diag(sigma**2) @ P.T, G @ G.T, atol=1e-12)
    np.testing.assert_allclose(P @ (np.diag(B) if B.ndim == 1 else B) @ P.T, A, atol=1e-12)
    f32 = lambda x: np.asarray(x, np.float32)
    proc = jaxou.OUProcess(f32(A), f32(mu), f32(G))
    x0 = np.zeros(d, np.float32)
    n, dt, steps = 4096, 0.05, 20
    sim = jaxou.simulate(proc, jax.random.key(5), n_paths=n, dt=dt, t1=dt * steps, initial=x0)
    assert sim.mean.dtype == jnp.float32
    A64, mu64, G64 = (np.asarray(x, np.float64) for x in (f32(A), f32(mu), f32(G)))
    _assert_moments_any(sim, *_ou_chain_law(A64, mu64, G64, x0, np.zeros((d, d)), dt, steps), n)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.slow)])
def test_counter_brownian_increments_are_normal(dtype):
    """The fast generator: increments N(0, h), independent across steps and blocks."""
    keys = jax.random.key_data(jax.random.split(jax.random.key(3), 8)).astype(jnp.uint32)
    bm = jaxou.CounterBrownianPath(keys, (BLOCK, 4), jnp.dtype(dtype), diffrax.SpaceTimeLevyArea)
    h = 0.01
    a = bm.evaluate(jnp.asarray(0.0, dtype), jnp.asarray(h, dtype), use_levy=True)
    b = bm.evaluate(jnp.asarray(h, dtype), jnp.asarray(2 * h, dtype))
    assert a.W.dtype == dtype and a.W.shape == (8 * BLOCK, 4)
    samples = {
        "W": np.ravel(a.W) / np.sqrt(h),
        "H": np.ravel(a.H) / np.sqrt(h / 12),
        "W'": np.ravel(b) / np.sqrt(h),
    }
    pvals = [scipy.stats.kstest(x, "norm").pvalue for x in samples.values()]
    assert min(pvals) > ALPHA / len(pvals), pvals
    # Uncorrelated across steps and between W and H: |r| within the Bonferroni bound.
    n = samples["W"].size
    for x, y in (("W", "W'"), ("W", "H")):
        r = np.corrcoef(samples[x], samples[y])[0, 1]
        assert abs(r) * np.sqrt(n) < _z_crit(2), (x, y, r)


# ---------------------------------------------------------------------------
# The counter generator: Threefry-2x32 + Box–Muller


def test_box_muller_f32_matches_float64_formula():
    """The polynomial sin/cos and float32 log against the float64 formula on the
    same words, including the quadrant edges and the extreme radii."""
    from jaxou._solvers import box_muller_f32

    r = np.random.default_rng(0)
    w0 = np.concatenate(
        [r.integers(0, 2**32, 4000, dtype=np.uint64), [0, 1, 2**31, 2**32 - 1]]
    ).astype(np.uint32)
    edges = np.array([0, 2**30 - 1, 2**30, 2**31 - 1, 2**31, 3 * 2**30, 2**32 - 1], np.uint64)
    w1 = np.concatenate([r.integers(0, 2**32, 4000 - 3, dtype=np.uint64), edges]).astype(np.uint32)
    a, b = (np.asarray(x, np.float64) for x in box_muller_f32(jnp.asarray(w0), jnp.asarray(w1)))
    u = (np.float32(w0.astype(np.float32)) + 0.5) * 2.0**-32  # the same rounding of w0
    rad = np.sqrt(-2 * np.log(u.astype(np.float64)))
    q = (w1 >> 30).astype(np.float64)
    frac = ((w1 >> 6) & 0xFFFFFF).astype(np.float64) * 2.0**-24
    theta = np.pi / 2 * (q + frac - 0.5)
    # float32 evaluation: a few roundings of size eps·r each (log, sqrt, the
    # polynomials and the product), far below any statistical resolution.
    tol = 8 * np.finfo(np.float32).eps * np.maximum(rad, 1)
    assert np.all(np.abs(a - rad * np.cos(theta)) <= tol)
    assert np.all(np.abs(b - rad * np.sin(theta)) <= tol)
    assert np.max(rad) < 6.8  # the largest radius: sqrt(-2 ln 2^-33)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.slow)])
def test_paired_normals_law(dtype):
    """2^19 normals: KS, the first four moments, tail frequencies, the radius and
    angle laws of the pairs, and correlations between the two parts of a pair,
    neighbouring counters, steps and keys; each within a Bonferroni bound."""
    from jaxou._solvers import paired_normals

    keys = jnp.asarray(r_keys := np.arange(8, dtype=np.uint32) * 7919 + 13)
    k1 = jnp.asarray(r_keys[::-1] * 31)
    z = np.asarray(paired_normals(keys, k1, (128, 32), dtype, step=3))  # [8, 128, 32]
    z2 = np.asarray(paired_normals(keys, k1, (128, 32), dtype, step=4))
    re, im = np.real(z).ravel().astype(np.float64), np.imag(z).ravel().astype(np.float64)
    x = np.concatenate([re, im])
    n = x.size
    zs, names = [], []
    # Moments: mean, variance, skewness, excess kurtosis (normal-theory SEs).
    for val, se, name in (
        (x.mean(), 1 / np.sqrt(n), "mean"),
        (x.var() - 1, np.sqrt(2 / n), "var"),
        (np.mean(x**3), np.sqrt(15 / n), "skew"),
        (np.mean(x**4) - 3, np.sqrt(96 / n), "kurt"),
    ):
        zs.append(val / se)
        names.append(name)
    # Tails: P(|z| > c) against its binomial SE.
    for c in (2.0, 3.0, 4.0):
        p = 2 * scipy.stats.norm.sf(c)
        zs.append((np.mean(np.abs(x) > c) - p) / np.sqrt(p * (1 - p) / n))
        names.append(f"tail{c}")
    # Correlations (each r·sqrt(n) ~ N(0, 1)).
    pairs = {
        "re-im": (re, im),
        "neighbour": (re[:-1], re[1:]),
        "step": (re, np.real(z2).ravel()),
        "key": (np.real(z[0]).ravel(), np.real(z[1]).ravel()),
    }
    for name, (u, v) in pairs.items():
        zs.append(np.corrcoef(u, v)[0, 1] * np.sqrt(u.size))
        names.append(name)
    crit = _z_crit(len(zs) + 4)
    assert np.max(np.abs(zs)) < crit, dict(zip(names, np.round(zs, 2)))
    # Laws: each normal, the squared radius of a pair ~ Exp(mean 2), its angle uniform.
    pvals = [
        scipy.stats.kstest(x, "norm").pvalue,
        scipy.stats.kstest(re**2 + im**2, "expon", args=(0, 2)).pvalue,
        scipy.stats.kstest(np.arctan2(im, re), "uniform", args=(-np.pi, 2 * np.pi)).pvalue,
        scipy.stats.kstest(np.real(z2).ravel(), "norm").pvalue,
    ]
    assert min(pvals) > ALPHA / (len(zs) + 4), pvals
