"""Monte Carlo engine: moments against the exact laws, the exact sampler's law (KS),
weak and strong orders, chunking, checkpoints, sharding, errors, no recompilation.

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
from jaxou._simulate import BLOCK, _run_chunk, analytic_marginals, simulate
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
    iu = np.triu_indices(D)
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
    sim = simulate(model, key, n_paths=N, dt=0.1, method="exact", ts=TS, keep_paths=True)
    assert sim.paths.shape == (N, len(TS), D)
    assert sim.mean.shape == (len(TS), D) and sim.cov.shape == (len(TS), D, D)
    laws = analytic_marginals(model, TS)
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
    # The KL helper agrees with jaxou.kl and is near the finite-sample floor.
    kls = sim.kl_to(model)
    np.testing.assert_allclose(kls, jaxou.kl(sim.gaussian(), laws), rtol=1e-12)
    assert np.all(np.asarray(kls) < 20 * (D + D * (D + 1) / 2) / (2 * N))


def test_euler_moments_and_no_recompile(model, key):
    sim = simulate(model, key, n_paths=N, dt=0.01, ts=TS)
    assert sim.paths is None
    _assert_moments(sim, _euler_laws(model, TS, 0.01))
    # Same shapes, other key and dt: the compiled chunk is reused.
    size = _run_chunk._cached._cache_size()
    sim2 = simulate(model, jax.random.key(7), n_paths=N, dt=0.02, ts=TS)
    assert _run_chunk._cached._cache_size() == size
    _assert_moments(sim2, _euler_laws(model, TS, 0.02))


def test_ou_process_point_initial(key):
    A = np.array([[1.0, 0.4], [-0.3, 2.0]])  # not symmetric: the general flow
    proc = jaxou.OUProcess(A, np.array([1.0, -1.0]), np.array([[0.5, 0.0], [0.2, 0.3]]))
    x0 = np.array([2.0, 0.0])
    sim = simulate(proc, key, n_paths=2000, dt=0.5, t1=1.0, initial=x0, method="exact")
    assert sim.ts.shape == (1,) and float(sim.ts[0]) == 1.0
    laws = analytic_marginals(proc, sim.ts, initial=x0)
    z_mean, z_cov = sim.z_scores(laws)
    zs = np.concatenate([np.ravel(z_mean), np.ravel(z_cov)])
    assert np.max(np.abs(zs)) < _z_crit(zs.size)


# ---------------------------------------------------------------------------
# Orders (nested steps sharing one Brownian path: brownian="tree")


def _slope(dts, errs):
    return np.polyfit(np.log(dts), np.log(errs), 1)[0]


@pytest.mark.slow
def test_weak_and_strong_order(key):
    A = np.array([[1.0, 0.5], [0.0, 2.0]])
    proc = jaxou.OUProcess(A, np.zeros(2), 0.5 * np.eye(2))
    x0 = np.array([3.0, -2.0])
    dts = [0.1, 0.05, 0.025, 0.0125]
    run = lambda dt, method: simulate(
        proc,
        key,
        n_paths=2048,
        dt=dt,
        t1=1.0,
        initial=x0,
        method=method,
        brownian="tree",
        keep_paths=not isinstance(method, str) or method == "euler",
    )
    all_sims = {}
    for method, order in (("euler", 1.0), ("shark", 2.0)):
        sims = all_sims[method] = [run(dt, method) for dt in dts]
        # Weak: successive differences of the moments (the shared path cancels the noise).
        dm = [np.linalg.norm(a.mean - b.mean) for a, b in zip(sims, sims[1:])]
        dc = [np.linalg.norm(a.cov - b.cov) for a, b in zip(sims, sims[1:])]
        assert abs(_slope(dts[:-1], dm) - order) < 0.25, (method, dm)
        assert abs(_slope(dts[:-1], dc) - order) < 0.25, (method, dc)
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
# Chunks, checkpoints, devices


def test_chunked_equals_unchunked_and_resume(model, key, tmp_path, capsys):
    kw = dict(n_paths=1000, dt=0.05, ts=TS)
    whole = simulate(model, key, **kw)
    chunked = simulate(model, key, chunk_size=BLOCK, **kw)
    np.testing.assert_allclose(chunked.mean, whole.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(chunked.cov, whole.cov, rtol=0, atol=1e-12)
    # Resume: finished chunks are loaded, only the missing one runs again.
    ck = tmp_path / "ck"
    first = simulate(model, key, chunk_size=BLOCK, checkpoint_dir=ck, **kw)
    assert sorted(os.listdir(ck)) == [
        "chunk_000000.npz",
        "chunk_000001.npz",
        "chunk_000002.npz",
        "chunk_000003.npz",
        "manifest.json",
    ]
    os.remove(ck / "chunk_000002.npz")
    capsys.readouterr()
    again = simulate(model, key, chunk_size=BLOCK, checkpoint_dir=ck, progress=True, **kw)
    err = capsys.readouterr().err
    assert err.count("loaded") == 3 and err.count("paths,") == 1
    np.testing.assert_allclose(again.cov, first.cov, rtol=0, atol=1e-12)
    np.testing.assert_allclose(again.mean, chunked.mean, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        simulate(model, jax.random.key(3), chunk_size=BLOCK, checkpoint_dir=ck, **kw)


_SHARD_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    import jaxou
    from jaxou._simulate import simulate
    assert len(jax.devices()) == 4, jax.devices()
    r = np.random.default_rng(1)
    d = 3
    def stage(s):
        r = np.random.default_rng(s)
        Q = np.linalg.qr(r.normal(size=(d, d)))[0]
        H = (Q * r.uniform(0.5, 2, d)) @ Q.T
        return jaxou.SGDStage(H, np.eye(d), r.normal(size=d), 0.1, 1.0)
    model = jaxou.TwoStage(jaxou.Gaussian.isotropic(np.zeros(d), 1.0), stage(1), stage(2), 1.0, 0.5)
    kw = dict(n_paths=1500, dt=0.05, ts=[0.5, 1.0, 1.5], keep_paths=True)
    many = simulate(model, jax.random.key(0), **kw)
    one = simulate(model, jax.random.key(0), devices=jax.devices()[:1], **kw)
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
    with pytest.raises(ValueError, match="dt"):
        simulate(model, key, n_paths=10, dt=0.0)
    with pytest.raises(ValueError, match="dt"):
        simulate(model, key, n_paths=10, dt=-1.0)
    with pytest.raises(ValueError, match="n_paths"):
        simulate(model, key, n_paths=1, dt=0.1)
    with pytest.raises(ValueError, match="max_steps"):
        simulate(model, key, n_paths=10, dt=1e-3, max_steps=100)
    with pytest.raises(ValueError, match="method"):
        simulate(model, key, n_paths=10, dt=0.1, method="rk4")
    with pytest.raises(ValueError, match="ts"):
        simulate(model, key, n_paths=10, dt=0.1, ts=[0.5, 2.0])
    with pytest.raises(ValueError, match="ts"):
        simulate(model, key, n_paths=10, dt=0.1, ts=[-0.1, 0.5])
    with pytest.raises(ValueError, match="ts"):
        simulate(model, key, n_paths=10, dt=0.1, ts=[1.0, 0.5])
    inf = jaxou.TwoStage(model.init, model.pretrain, model.finetune, float("inf"), 1.0)
    with pytest.raises(ValueError, match="t_pretrain"):
        simulate(inf, key, n_paths=10, dt=0.1)
    with pytest.raises(ValueError, match="t1"):
        simulate(proc, key, n_paths=10, dt=0.1, t1=float("inf"), initial=x0)
    with pytest.raises(ValueError, match="t1"):
        simulate(proc, key, n_paths=10, dt=0.1, initial=x0)
    with pytest.raises(ValueError, match="initial"):
        simulate(proc, key, n_paths=10, dt=0.1, t1=1.0)
    with pytest.raises(ValueError, match="t1 or initial"):
        simulate(model, key, n_paths=10, dt=0.1, t1=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        simulate(model, key, n_paths=10, dt=0.1, chunk_size=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_counter_brownian_increments_are_normal(dtype):
    """The fast generator: increments N(0, h), independent across steps and blocks."""
    from jaxou._solvers import CounterBrownianPath

    keys = jax.random.key_data(jax.random.split(jax.random.key(3), 8)).astype(jnp.uint32)
    bm = CounterBrownianPath(keys, (BLOCK, 4), jnp.dtype(dtype), diffrax.SpaceTimeLevyArea)
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


def test_monte_carlo_check_small(model, key):
    from jaxou._simulate import monte_carlo_check

    out = monte_carlo_check(model, key, n_paths=2048)
    assert out["passed"], out
    assert set(out["kl"]) == {"pretrained", "finetuned"}
    assert out["kl"]["finetuned"] < out["kl_threshold"]


# ---------------------------------------------------------------------------
# Other solvers and Brownian paths, each against the exact law of its own chain


@pytest.mark.parametrize(
    "method, brownian",
    [
        ("heun", "fast"),
        ("sea", "fast"),  # draws the space-time Lévy area H too
        ("euler", "diffrax"),  # diffrax.UnsafeBrownianPath per block of paths
        pytest.param("euler", "tree", marks=pytest.mark.slow),  # VirtualBrownianTree
        pytest.param("heun", "tree", marks=pytest.mark.slow),
    ],
)
def test_solver_and_brownian_path_moments(model, key, method, brownian):
    dt = 0.05
    sim = simulate(model, key, n_paths=N, dt=dt, ts=TS, method=method, brownian=brownian)
    _assert_moments(sim, _chain_laws(model, TS, dt, method))


# ---------------------------------------------------------------------------
# Euler in the noise eigenbasis (the default fast path), float32 as benchmarked


def _ou_chain_law(A, mu, G, x0, dt, steps):
    d = len(mu)
    M = np.eye(d) - dt * A
    m, S = np.asarray(x0, np.float64) - mu, np.zeros((d, d))
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


@pytest.mark.parametrize("case", ["commuting", "isotropic", "dense_unrolled", "dense_matmul"])
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
    sim = simulate(proc, jax.random.key(5), n_paths=n, dt=dt, t1=dt * steps, initial=x0)
    assert sim.mean.dtype == jnp.float32
    A64, mu64, G64 = (np.asarray(x, np.float64) for x in (f32(A), f32(mu), f32(G)))
    _assert_moments_any(sim, *_ou_chain_law(A64, mu64, G64, x0, dt, steps), n)


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
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
