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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def _euler_laws(model, ts, dt):
    """The exact law of the Euler–Maruyama chain itself (a linear Gaussian recursion:
    m' = θ* + M(m-θ*), S' = M S Mᵀ + h D with M = I - hH), on the same equal-step grid
    as simulate: a reference with no discretisation bias to absorb."""
    stages = [(model.pretrain, 0.0, 1.0), (model.finetune, 1.0, 1.5)]
    m, S = np.asarray(model.init.mean), np.asarray(model.init.cov)
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
            M = np.eye(D) - h * H
            for _ in range(k):
                m = mu + M @ (m - mu)
                S = M @ S @ M.T + h * Dm
            t = te
            if te in ts:
                out.append((m, S))
    return jaxou.Gaussian(np.stack([o[0] for o in out]), np.stack([o[1] for o in out]))


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
        keep_paths=method == "euler",
    )
    all_sims = {}
    for method, order in (("euler", 1.0), ("shark", 2.0)):
        sims = all_sims[method] = [run(dt, method) for dt in dts]
        # Weak: successive differences of the moments (the shared path cancels the noise).
        dm = [np.linalg.norm(a.mean - b.mean) for a, b in zip(sims, sims[1:])]
        dc = [np.linalg.norm(a.cov - b.cov) for a, b in zip(sims, sims[1:])]
        assert abs(_slope(dts[:-1], dm) - order) < 0.25, (method, dm)
        assert abs(_slope(dts[:-1], dc) - order) < 0.25, (method, dc)
    # Strong (Euler): RMS distance to a fine reference on the same Brownian path; for
    # additive noise Euler–Maruyama has strong order 1.
    ref = run(dts[-1] / 8, "euler").paths[:, -1]
    errs = [np.sqrt(np.mean(np.sum((s.paths[:, -1] - ref) ** 2, -1))) for s in all_sims["euler"]]
    assert abs(_slope(dts, errs) - 1.0) < 0.2, errs


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
    import diffrax

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
