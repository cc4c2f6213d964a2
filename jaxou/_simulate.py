r"""Layer 5: Monte Carlo simulation of OU ensembles through Diffrax, with streamed
statistics, chunking, checkpoints and sharding over devices.

Design (see also `_solvers.py`): every path of a chunk lives in one Diffrax state
`y` of shape `[n_paths, d]`; one `diffrax.diffeqsolve` per interval between
saved times advances them all with a fixed-step Brownian path, inside a
`jax.lax.scan` over the intervals that reduces the state to its sufficient
statistics (count, mean, centred second moment) at each saved time. Memory is
`O(n_paths · d + len(ts) · d²)`, independent of the number of steps.

Randomness: paths are grouped in blocks of `BLOCK` (= 256) consecutive paths;
block `b` draws everything (its initial state, its Brownian increments for each
stage) from `fold_in(key, b)`. A path's draws therefore depend only on the key and
its index, never on `chunk_size` or on the number of devices.

Multi-host use: start every process with `jax.distributed.initialize()` (or the
environment variables your cluster launcher sets), then call `simulate` in every
process with the same arguments; the paths are sharded over `jax.devices()`,
which then spans all hosts, and the statistics are reduced across them by XLA.
For example, on two hosts with one accelerator each:

```
# host 0                                  # host 1
JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 \\   JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 \\
JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\    JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
python -c "import jax; jax.distributed.initialize(); import jaxou; ..."
```

(`jax.distributed.initialize()` reads `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; on Slurm or Cloud TPU it needs no
arguments at all.) Only statistics leave the devices; `keep_paths=True` gathers the
paths to every host and is meant for small runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._gaussian import Gaussian, kl
from ._ou import OUProcess
from ._sgd import SGDStage, TwoStage
from ._solvers import (
    BlockBrownianPath,
    CounterBrownianPath,
    DiagonalNoiseTerm,
    EigenDrift,
    ExactOU,
    FusedEuler,
    PathsControlTerm,
    exact_step_matrices,
    noise_eigenbasis,
    paired_normals,
)
from ._stats import Moments, block_moments, merge_host

__all__ = ["Simulation", "simulate", "analytic_marginals", "monte_carlo_check"]

BLOCK = 256
"""Paths per random-number block (the unit of chunking and sharding)."""

METHODS = ("euler", "exact", "heun", "milstein", "shark", "sra1", "sea")

Model = OUProcess | SGDStage | TwoStage


class Simulation(eqx.Module):
    r"""The result of [`jaxou.simulate`][].

    - `ts`: the saved times, `[s]`.
    - `mean`: the sample mean at each saved time, `[s, d]`.
    - `cov`: the sample covariance (unbiased, divisor `n_paths - 1`), `[s, d, d]`.
    - `paths`: `[n_paths, s, d]` when `keep_paths=True`, else `None`.
    - `n_paths`: the number of paths.
    """

    ts: Float[Array, " s"]
    mean: Float[Array, "s d"]
    cov: Float[Array, "s d d"]
    paths: Float[Array, "n s d"] | None
    n_paths: int = eqx.field(static=True)

    def gaussian(self) -> Gaussian:
        """The Gaussian fit $N(\\hat\\mu_t, \\hat\\Sigma_t)$ at each saved time (batch `[s]`)."""
        return Gaussian(self.mean, self.cov)

    def kl_to(self, laws: Gaussian | Model, *, initial=None) -> Float[Array, " s"]:
        r"""$\mathrm{KL}(N(\hat\mu_t,\hat\Sigma_t)\,\|\,\text{law}_t)$ at each saved time.

        `laws` is a [`jaxou.Gaussian`][] (batch `[s]`, or one law for all times) or
        the simulated model, in which case the analytic marginals at `ts` are used
        (pass `initial` for an `OUProcess`/`SGDStage`). With $n$ paths in $d$
        dimensions, the KL of a perfect sampler is about $(d + d(d+1)/2)/(2n)$
        (the bias of the fit), so compare against that floor, not zero.
        """
        if not isinstance(laws, Gaussian):
            laws = analytic_marginals(laws, self.ts, initial=initial)
        return kl(self.gaussian(), laws)

    def z_scores(self, laws: Gaussian | Model, *, initial=None) -> tuple[Array, Array]:
        r"""Deviations of the sample moments from `laws` in standard errors:
        mean entries $(\hat\mu_i - \mu_i)/\sqrt{\Sigma_{ii}/n}$ and covariance
        entries $(\hat\Sigma_{ij} - \Sigma_{ij})/\sqrt{(\Sigma_{ii}\Sigma_{jj} +
        \Sigma_{ij}^2)/(n-1)}$ (the normal-theory variance of a sample covariance).
        Entries with zero variance in the law (a point mass) give 0. Returns
        `(z_mean [s, d], z_cov [s, d, d])`."""
        if not isinstance(laws, Gaussian):
            laws = analytic_marginals(laws, self.ts, initial=initial)
        n = self.n_paths
        var = jnp.diagonal(laws.cov, axis1=-2, axis2=-1)
        se_mean = jnp.sqrt(var / n)
        z_mean = jnp.where(se_mean > 0, (self.mean - laws.mean) / _nz(se_mean), 0.0)
        se_cov = jnp.sqrt((var[..., :, None] * var[..., None, :] + laws.cov**2) / (n - 1))
        z_cov = jnp.where(se_cov > 0, (self.cov - laws.cov) / _nz(se_cov), 0.0)
        return z_mean, z_cov


def _nz(x):
    return jnp.where(x > 0, x, 1)


# ---------------------------------------------------------------------------
# Analytic marginals of the three model kinds at a batch of times.


def _stage_list(model: Model, t1, initial):
    """[(process, t_start, t_end)], the initial law, and the end time; with the
    checks that need no device work."""
    if isinstance(model, TwoStage):
        if t1 is not None or initial is not None:
            raise ValueError(
                "simulate: a TwoStage carries its own initial law and durations; "
                "do not pass t1 or initial"
            )
        tp, tf = float(model.t_pretrain), float(model.t_finetune)
        for name, t in (("t_pretrain", tp), ("t_finetune", tf)):
            if not math.isfinite(t):
                raise ValueError(
                    f"simulate: TwoStage.{name} is {t}; a simulation needs finite "
                    f"durations (build the TwoStage with a finite {name})"
                )
        stages = [(model.pretrain.process, 0.0, tp), (model.finetune.process, tp, tp + tf)]
        return stages, model.init, tp + tf
    if isinstance(model, SGDStage):
        process = model.process
    elif isinstance(model, OUProcess):
        process = model
    else:
        raise TypeError(
            "simulate: model must be a jaxou.OUProcess, SGDStage or TwoStage, got "
            f"{type(model).__name__}"
        )
    if t1 is None:
        raise ValueError("simulate: t1 (the duration) is required for an OUProcess or SGDStage")
    t1 = float(t1)
    if not math.isfinite(t1) or t1 < 0:
        raise ValueError(f"simulate: t1 must be finite and >= 0, got {t1}")
    if initial is None:
        raise ValueError(
            "simulate: initial (a jaxou.Gaussian or a point) is required for an "
            "OUProcess or SGDStage"
        )
    if not isinstance(initial, Gaussian):
        initial = Gaussian.point(jnp.asarray(initial, process.drift.dtype))
    if initial.dim != process.dim or initial.batch_shape != ():
        raise ValueError(
            f"simulate: initial must be one law of dimension {process.dim}, got dimension "
            f"{initial.dim} and batch shape {initial.batch_shape}"
        )
    return [(process, 0.0, t1)], initial, t1


def analytic_marginals(model: Model, ts: Float[ArrayLike, " s"], *, initial=None) -> Gaussian:
    """The exact law at each time of `ts` (batch `[s]`): `process.marginal` for an
    `OUProcess`/`SGDStage` started at `initial`; for a `TwoStage`, the pre-training
    marginal up to `t_pretrain` (included) and the fine-tuning marginal, from the
    pre-trained law, after it."""
    ts = np.asarray(ts, np.float64).reshape(-1)
    if isinstance(model, TwoStage):
        return model.marginal(ts)
    else:
        proc = model.process if isinstance(model, SGDStage) else model
        if initial is None:
            raise ValueError("analytic_marginals: initial is required for an OUProcess/SGDStage")
        laws = [proc.marginal(initial, t) for t in ts]
    return Gaussian(jnp.stack([g.mean for g in laws]), jnp.stack([g.cov for g in laws]))


# ---------------------------------------------------------------------------
# Planning: intervals between saved times, step counts, validation.


class _Plan(NamedTuple):
    """One run's schedule. The static part (`save_zero`, `saved`: which interval
    ends are saved) keys the compiled program; the times and step counts (`grid`)
    are traced inputs, so another `dt` or other times of the same count reuse it."""

    ts: np.ndarray
    save_zero: bool
    saved: tuple[int, ...]  # interval indices of the saved times > 0
    grid: dict  # numpy arrays, passed to the program as inputs
    total_steps: int


def _plan(stages, t_end: float, ts, dt: float, method: str, max_steps: int) -> _Plan:
    if ts is None:
        ts_arr = np.array([t_end])
    else:
        ts_arr = np.asarray(ts, np.float64).reshape(-1)
        if ts_arr.size == 0:
            raise ValueError("simulate: ts must hold at least one time")
        if not np.all(np.isfinite(ts_arr)):
            raise ValueError("simulate: ts must be finite")
        if np.any(ts_arr < 0) or np.any(ts_arr > t_end * (1 + 1e-12)):
            raise ValueError(
                f"simulate: ts must lie in [0, {t_end:g}] (the end time), got "
                f"[{ts_arr.min():g}, {ts_arr.max():g}]"
            )
        if np.any(np.diff(ts_arr) <= 0):
            raise ValueError("simulate: ts must be strictly increasing (sorted, no repeats)")
        ts_arr = np.minimum(ts_arr, t_end)
    save_zero = bool(ts_arr[0] == 0.0)
    rows, saved, bounds, tols, total = [], [], [], [], 0
    for s, (_, start, end) in enumerate(stages):
        # A saved time exactly at a stage boundary belongs to the earlier stage.
        inside = [float(t) for t in ts_arr if start < t <= end]
        ends = inside if inside and inside[-1] == end else inside + [end]
        prev = start
        for t in ends:
            if t == prev:
                n = 0
            elif method == "exact":
                n = 1
            else:
                n = max(1, math.ceil((t - prev) / dt * (1 - 1e-12)))
            if t in inside:
                saved.append(len(rows))
            rows.append((s, prev, t, n))
            total += n
            prev = t
        # Brownian-tree tolerance: a dyadic fraction of the stage, <= dt/8, so that
        # halving dt refines the same tree (nested step sizes share one path).
        length = max(end - start, np.finfo(np.float64).tiny)
        bounds.append((start, end))
        tols.append(length / 2.0 ** max(0, math.ceil(math.log2(8 * length / dt))))
    if total > max_steps:
        raise ValueError(
            f"simulate: {total} steps of dt={dt:g} exceed max_steps={max_steps}; raise "
            "max_steps or dt"
        )
    grid = dict(
        stage=np.asarray([r[0] for r in rows], np.int32),
        t_a=np.asarray([r[1] for r in rows]),
        t_b=np.asarray([r[2] for r in rows]),
        steps=np.asarray([max(r[3], 1) for r in rows], np.float64),
        empty=np.asarray([r[3] == 0 for r in rows]),
        bounds=np.asarray(bounds),
        tol=np.asarray(tols),
    )
    return _Plan(ts_arr, save_zero, tuple(saved), grid, total)


# ---------------------------------------------------------------------------
# The compiled chunk.


def _solver_for(method):
    if isinstance(method, diffrax.AbstractSolver):
        return method
    return {
        "euler": FusedEuler(),
        # With additive noise the Milstein correction g'g vanishes: Milstein is
        # Euler–Maruyama exactly.
        "milstein": FusedEuler(),
        "heun": diffrax.Heun(),
        "shark": diffrax.ShARK(),
        "sra1": diffrax.SRA1(),
        "sea": diffrax.SEA(),
    }[method]


def _levy_area(solver) -> type:
    if isinstance(solver, diffrax.AbstractSRK):
        return solver.minimal_levy_area
    return diffrax.BrownianIncrement


def _brownian(keys, kind, levy, shape, dtype, start, end, tol):
    struct = jax.ShapeDtypeStruct(shape, dtype)
    levy = _concrete_levy(levy)
    if kind == "fast":
        return CounterBrownianPath(_key_words(keys), shape, jnp.dtype(dtype), levy)
    if kind == "diffrax":
        make = lambda k: diffrax.UnsafeBrownianPath(struct, k, levy_area=levy)
    else:
        make = lambda k: diffrax.VirtualBrownianTree(start, end, tol, struct, k, levy_area=levy)
    return BlockBrownianPath.build(make, keys, levy, start, end)


def _key_words(keys) -> Array:
    """The first two uint32 words of each key of a batch, `[n, 2]`."""
    words = jax.vmap(jax.random.key_data)(keys).reshape(keys.shape[0], -1)[:, :2]
    return words.astype(jnp.uint32)


def _concrete_levy(levy):
    # SRK solvers ask for an abstract Lévy-area type; the paths need a concrete one.
    if issubclass(levy, diffrax.AbstractSpaceTimeTimeLevyArea):
        return diffrax.SpaceTimeTimeLevyArea
    if issubclass(levy, diffrax.AbstractSpaceTimeLevyArea):
        return diffrax.SpaceTimeLevyArea
    return diffrax.BrownianIncrement


_last_report = [0.0]


def _report_interval(i, n_int, _) -> None:
    # Progress inside a chunk (host callback after each interval), at most 1 line/s.
    now = time.perf_counter()
    i = int(i)
    if now - _last_report[0] >= 1.0 or i + 1 == int(n_int):
        _last_report[0] = now
        print(f"jaxou.simulate:   interval {i + 1}/{int(n_int)}", file=sys.stderr, flush=True)


@eqx.filter_jit
def _run_chunk(
    processes: list[OUProcess],
    initial: Gaussian,
    key: PRNGKeyArray,
    first_block: Array,
    n_valid: Array,
    grid: dict,
    *,
    save_zero: bool,
    saved: tuple[int, ...],
    method: Any,
    n_blocks: int,
    brownian: str,
    controller: Any,
    keep_paths: bool,
    sharding: Any,
    max_steps: int,
    exact_steps: tuple[Array, Array] | None = None,
    euler_basis: tuple[Array, Array, Array] | None = None,
    progress: bool = False,
):
    dtype = initial.mean.dtype
    d = initial.dim
    n = n_blocks * BLOCK
    block_ids = first_block + jnp.arange(n_blocks)
    block_keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(block_ids)
    if sharding is not None:
        block_keys = jax.lax.with_sharding_constraint(block_keys, sharding)
    index = block_ids[:, None] * BLOCK + jnp.arange(BLOCK)[None, :]
    mask = index < n_valid  # [n_blocks, BLOCK]

    # Initial states, drawn per block (chunk-independent).
    lam, V = jnp.linalg.eigh(initial.cov)
    root = V * jnp.sqrt(jnp.clip(lam, 0))[None, :]
    # The counter generator of the Brownian paths (one small compiled loop, where
    # `jax.random.normal` over a batch of keys would add its own).
    words = _key_words(jax.vmap(lambda k: jax.random.fold_in(k, 0))(block_keys))
    zc = paired_normals(words[:, 0], words[:, 1], (BLOCK // 2, d), dtype)
    z = jnp.concatenate([jnp.real(zc), jnp.imag(zc)], axis=1)  # [n_blocks, BLOCK, d]
    y = (initial.mean + z @ root.T).reshape(n, d)
    if sharding is not None:
        y = jax.lax.with_sharding_constraint(y, sharding)
    y0 = y

    def stats(y):
        return block_moments(y.reshape(n_blocks, BLOCK, d), mask)

    # All intervals of all stages in one scan, so that one diffeqsolve is compiled
    # (a TwoStage would otherwise compile two); each interval selects its stage.
    n_stages = len(processes)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *processes)
    stage_keys = jnp.stack(
        [jax.vmap(lambda k, s=s: jax.random.fold_in(k, 1 + s))(block_keys) for s in range(n_stages)]
    )
    stage_of = grid["stage"]
    t_a, t_b, steps = (grid[k].astype(dtype) for k in ("t_a", "t_b", "steps"))
    empty = grid["empty"]
    bounds, tols = grid["bounds"].astype(dtype), grid["tol"].astype(dtype)
    n_int = stage_of.shape[0]
    if method == "exact":
        # One exact jump per interval, with the step matrices computed on the host.
        m = d
        solver = None
        levy = diffrax.BrownianIncrement
        flows, roots = exact_steps
    else:
        m = processes[0].diffusion.shape[1]
        solver = _solver_for(method)
        levy = _levy_area(solver)
        flows = roots = jnp.zeros((n_int, 0), dtype)

    def solve_with(terms, step_solver, ta, tb, h, y):
        sol = diffrax.diffeqsolve(
            terms,
            step_solver,
            ta,
            tb,
            h,
            y,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=controller,
            adjoint=diffrax.ForwardMode(),
            max_steps=max_steps,
        )
        return sol.ys[0]

    def solve_eigen(y, s, proc, ta, tb, h):
        # Euler in the noise eigenbasis on a paired state (see `_solvers.EigenDrift`):
        # u = Pᵀ(y - μ), rows r and r + BLOCK/2 of each block as one complex row.
        P, B, sigma = (x[s] for x in euler_basis)
        half = BLOCK // 2
        u = ((y - proc.mean) @ P).reshape(n_blocks, 2, half, d)
        u = jax.lax.complex(u[:, 0], u[:, 1])  # [n_blocks, half, d]
        bm = CounterBrownianPath(
            _key_words(stage_keys[s]), (BLOCK, d), jnp.dtype(dtype), levy, paired=True
        )
        terms = diffrax.MultiTerm(diffrax.ODETerm(EigenDrift(B)), DiagonalNoiseTerm(sigma, bm))
        with warnings.catch_warnings():
            # Diffrax warns about complex states in general; here only our own solver
            # (real-linear: y + h f + noise) and Diffrax's linear bookkeeping touch it,
            # and the paired layout is checked against the Euler chain's exact law.
            warnings.filterwarnings("ignore", message="Complex dtype support in Diffrax")
            u = solve_with(terms, solver, ta, tb, h, u)
        u = jnp.concatenate([jnp.real(u), jnp.imag(u)], axis=1).reshape(n, d)
        return proc.mean + u @ P.T

    def body(y, x):
        i, s, ta, tb, k, skip, flow, root = x
        proc = jax.tree.map(lambda leaf: leaf[s], stacked)
        h = (tb - ta) / k
        if euler_basis is not None:
            solve = lambda y: solve_eigen(y, s, proc, ta, tb, h)
        else:
            start, end = bounds[s, 0], bounds[s, 1]
            bm = _brownian(stage_keys[s], brownian, levy, (BLOCK, m), dtype, start, end, tols[s])
            terms = diffrax.MultiTerm(
                diffrax.ODETerm(proc.drift_field), PathsControlTerm(proc.diffusion_field, bm)
            )
            if method == "exact":
                # One jump per interval: the solver's step itself, without
                # diffeqsolve's loop around it (a loop of one step; leaving it out
                # makes the compiled program smaller and quicker to build).
                exact = ExactOU(proc.mean, flow, root, h)
                solve = lambda y: exact.step(terms, ta, tb, y, None, None, False)[0]
            else:
                solve = lambda y: solve_with(terms, solver, ta, tb, h, y)
        y = jax.lax.cond(skip, lambda y: y, solve, y)
        if progress:
            jax.debug.callback(_report_interval, i, n_int, y[0, 0])
        return y, (stats(y), y if keep_paths else None)

    _, (st, ys) = jax.lax.scan(
        body, y0, (jnp.arange(n_int), stage_of, t_a, t_b, steps, empty, flows, roots)
    )

    # Pick the saved times out of the interval ends.
    index = list(saved)
    moments = jax.tree.map(lambda x: x[jnp.asarray(index, jnp.int32)], st)
    paths = ys[jnp.asarray(index, jnp.int32)] if keep_paths else None
    if save_zero:
        m0 = stats(y0)
        moments = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), m0, moments)
        if keep_paths:
            paths = jnp.concatenate([y0[None], paths])
    if keep_paths:
        paths = jnp.swapaxes(paths, 0, 1)  # [n, s, d]
    return moments, paths


# ---------------------------------------------------------------------------
# Host-side precomputation (outside the compiled chunk: a smaller program).


_exact_step_matrices = eqx.filter_jit(exact_step_matrices)


def _exact_steps(processes, plan: _Plan, symmetric) -> tuple[Array, Array]:
    """`(flows, roots)`, `[n_intervals, d, d]`: the exact transition of each
    interval between saved times (one jump each), computed once per distinct
    (stage, length) by a small compiled function."""
    grid = plan.grid
    cache: dict = {}
    flows, roots = [], []
    for s, ta, tb, empty in zip(grid["stage"], grid["t_a"], grid["t_b"], grid["empty"]):
        h = 1.0 if empty else float(tb - ta)
        k = (int(s), h)
        if k not in cache:
            p = processes[int(s)]
            cache[k] = _exact_step_matrices(
                p.drift, p.diffusion_cov, jnp.asarray(h, p.drift.dtype), symmetric=symmetric[int(s)]
            )
        flows.append(cache[k][0])
        roots.append(cache[k][1])
    return jnp.stack(flows), jnp.stack(roots)


def _euler_basis(processes, dtype) -> tuple[Array, Array, Array]:
    """`(P, B, sigma)` stacked over stages: each stage in its noise eigenbasis
    (`_solvers.noise_eigenbasis`, float64 on the host); `B` is `[stages, d]` when
    every stage's drift is diagonal there, else `[stages, d, d]`."""
    eps = float(np.finfo(dtype).eps)
    parts = [
        noise_eigenbasis(np.asarray(p.drift), np.asarray(p.diffusion_cov), eps=eps)
        for p in processes
    ]
    diagonal = all(b.ndim == 1 for _, b, _ in parts)
    Ps = np.stack([P for P, _, _ in parts])
    Bs = np.stack([b if diagonal or b.ndim == 2 else np.diag(b) for _, b, _ in parts])
    sig = np.stack([x for _, _, x in parts])
    return tuple(jnp.asarray(x, dtype) for x in (Ps, Bs, sig))


# ---------------------------------------------------------------------------
# The driver: validation, chunks, checkpoints, devices, progress.


def _as_key(key) -> PRNGKeyArray:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"simulate: key must be a single PRNG key, got shape {key.shape}")
        return key
    key = jnp.asarray(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise TypeError("simulate: key must be a jax.random.key(...) or a raw uint32[2] key")
    return jax.random.wrap_key_data(key)


def _fingerprint(parts) -> str:
    h = hashlib.sha256()
    for p in jax.tree.leaves(parts):
        a = np.asarray(p)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _save_atomic(path: str, **arrays) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: a chunk file is complete or absent
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def simulate(
    model: Model,
    key: PRNGKeyArray,
    *,
    n_paths: int,
    dt: float,
    t1: float | None = None,
    initial: Gaussian | Float[ArrayLike, " d"] | None = None,
    method: str | diffrax.AbstractSolver = "euler",
    ts: Sequence[float] | Float[ArrayLike, " s"] | None = None,
    keep_paths: bool = False,
    chunk_size: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = False,
    max_steps: int = 10**7,
    brownian: str | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Simulation:
    r"""Simulate `n_paths` independent trajectories of an OU model and return their
    streamed statistics (and, on request, the paths).

    The model is an [`jaxou.OUProcess`][] $dX = -A(X-\mu)dt + G\,dW$, an
    [`jaxou.SGDStage`][] (its `.process`), or a [`jaxou.TwoStage`][]: then the paths
    start from `model.init`, run the pre-training stage on $[0, T_1]$ and continue,
    the same paths, under the fine-tuning stage on $[T_1, T_1 + T_2]$, all in one
    compiled program. A saved time exactly at $T_1$ is the end of pre-training.

    Integration goes through `diffrax.diffeqsolve`, with all the paths of a chunk in
    one state `[n_paths, d]` (see `jaxou._solvers`), fixed steps of at most `dt`
    (each interval between saved times is cut into equal steps), and statistics
    reduced at each saved time so that memory does not grow with the number of
    steps. Each path's randomness depends only on `key` and the path's index, so
    the result does not depend on `chunk_size` or on the devices (up to rounding).

    **Arguments:**

    - `model`: `OUProcess`, `SGDStage` or `TwoStage`.
    - `key`: a JAX PRNG key.
    - `n_paths`: number of paths, $\ge 2$.
    - `dt`: the step (an upper bound: intervals are cut into equal steps $\le$ `dt`).
    - `t1`, `initial`: duration and initial law (a `Gaussian` or a point) for an
      `OUProcess`/`SGDStage`; not allowed for a `TwoStage`.
    - `method`: `"euler"` (Euler–Maruyama, a fused Diffrax solver; strong and weak
      order 1 for additive noise; `"milstein"` is the same scheme, as the Milstein
      correction vanishes for additive noise), `"shark"` / `"sra1"` / `"sea"`
      (Diffrax's additive-noise stochastic Runge–Kutta solvers; ShARK and SRA1 have
      strong order 1.5 and weak order 2 here; they draw a space-time Lévy area too,
      so a step costs about 2-3× Euler), `"heun"` (`diffrax.Heun`), `"exact"` (the
      exact OU transition, one jump per interval between saved times: no
      discretisation error whatever `dt`), or any `diffrax.AbstractSolver`
      instance (used with the terms `MultiTerm(ODETerm(drift), PathsControlTerm)`).
    - `ts`: the saved times in $[0, t_\text{end}]$, strictly increasing; `None`
      saves the final time only.
    - `keep_paths`: also return the paths at `ts` (`[n_paths, len(ts), d]`).
    - `chunk_size`: paths per chunk (rounded up to a multiple of 256 × the number
      of devices); `None` picks chunks of about $2^{24}/d$ paths. Chunk statistics
      are merged exactly (Chan et al.).
    - `checkpoint_dir`: a folder where each finished chunk's statistics are saved
      atomically; a rerun with the same arguments loads them and only runs the
      missing chunks.
    - `progress`: print progress to stderr: one line per finished chunk, and within
      a chunk after the intervals between saved times (at most one line a second).
    - `max_steps`: the step budget; more steps than this is an error before any work.
    - `brownian`: `"fast"` (the default for fixed steps: a counter-based
      fixed-step Brownian path, `jaxou._solvers.CounterBrownianPath`: Threefry-2x32
      with 20 rounds, the hash of `jax.random.normal`, and a Box–Muller transform,
      written so that each step is one vectorised loop; about 5× JAX's default
      normal generation on CPU), `"diffrax"` (a `diffrax.UnsafeBrownianPath` per
      block of paths), or `"tree"` (a `diffrax.VirtualBrownianTree` at a dyadic
      tolerance <= `dt/8`: the same Brownian path whatever the step, for adaptive
      steps and convergence studies; slower). With `"fast"`, `method="euler"`
      integrates each stage in the eigenbasis of its noise covariance $D = GG^\top$:
      $u = P^\top(y-\mu)$, $du = -P^\top AP\,u\,dt + \mathrm{diag}(\sigma)\,dW$
      (`jaxou._solvers.EigenDrift`), the same process in law and the same Euler
      chain, with elementwise noise and, when $A$ and $D$ commute (an SGD stage whose
      noise shares the Hessian's eigenvectors), an elementwise drift; its draws
      therefore differ from those of other methods given the same key.
    - `stepsize_controller`: a Diffrax controller, `ConstantStepSize()` by default;
      an adaptive one (e.g. `PIDController`) needs `brownian="tree"` (chosen
      automatically) and a solver with an error estimate (`"shark"`, `"sra1"`).
    - `devices`: the devices to shard the paths over (default `jax.devices()`,
      all hosts' devices under `jax.distributed`).

    **Returns:** a [`jaxou.Simulation`][].

    **Raises:** `ValueError` before any work for `dt <= 0`, `n_paths < 2`, an
    unknown `method`, infinite durations, `ts` outside $[0, t_\text{end}]$ or not
    strictly increasing, more steps than `max_steps`, or a `checkpoint_dir` holding
    another run; `TypeError` for a model or key of the wrong kind.
    """
    # ---- validation, before any work
    if isinstance(n_paths, bool) or not isinstance(n_paths, (int, np.integer)):
        raise TypeError(f"simulate: n_paths must be an int, got {type(n_paths).__name__}")
    n_paths = int(n_paths)
    if n_paths < 2:
        raise ValueError(f"simulate: n_paths must be >= 2 for statistics, got {n_paths}")
    try:
        dt = float(dt)
    except TypeError:
        raise TypeError("simulate: dt must be a concrete float") from None
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"simulate: dt must be > 0 and finite, got {dt}")
    if not isinstance(method, diffrax.AbstractSolver) and method not in METHODS:
        raise ValueError(
            f"simulate: unknown method {method!r}; use one of {METHODS} or a "
            "diffrax.AbstractSolver instance"
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"simulate: max_steps must be a positive int, got {max_steps!r}")
    if stepsize_controller is None:
        stepsize_controller = diffrax.ConstantStepSize()
    adaptive = not isinstance(stepsize_controller, diffrax.ConstantStepSize)
    if brownian is None:
        brownian = "tree" if adaptive else "fast"
    if brownian not in ("fast", "diffrax", "tree"):
        raise ValueError(
            f"simulate: brownian must be 'fast', 'diffrax' or 'tree', got {brownian!r}"
        )
    if adaptive and (brownian != "tree" or method == "exact"):
        raise ValueError(
            "simulate: an adaptive stepsize_controller needs brownian='tree' and a "
            "numerical method (not 'exact')"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"simulate: chunk_size must be a positive int, got {chunk_size!r}")
    key = _as_key(key)
    stages, init_law, t_end = _stage_list(model, t1, initial)
    plan = _plan(stages, t_end, ts, dt, "exact" if method == "exact" else "numeric", max_steps)
    processes = [p for p, _, _ in stages]
    symmetric = tuple(
        bool(np.allclose(np.asarray(p.drift), np.asarray(p.drift).T, rtol=0, atol=0))
        for p in processes
    )
    dtype = init_law.mean.dtype
    d = init_law.dim
    exact_steps = _exact_steps(processes, plan, symmetric) if method == "exact" else None
    euler_basis = None
    if isinstance(method, str) and method in ("euler", "milstein") and brownian == "fast":
        euler_basis = _euler_basis(processes, dtype)

    # ---- layout: blocks, chunks, devices
    devices = list(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    sharding = None
    if n_dev > 1:
        mesh = Mesh(np.array(devices), ("paths",))
        sharding = NamedSharding(mesh, PartitionSpec("paths"))
    total_blocks = -(-n_paths // BLOCK)
    if chunk_size is None:
        chunk_size = max(BLOCK, (1 << 24) // max(d, 1))
    per_chunk = -(-min(chunk_size, total_blocks * BLOCK) // BLOCK)
    per_chunk = -(-per_chunk // n_dev) * n_dev
    n_chunks = -(-total_blocks // per_chunk)

    # ---- checkpoints
    done: dict[int, Moments] = {}
    done_paths: dict[int, np.ndarray] = {}
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
        os.makedirs(checkpoint_dir, exist_ok=True)
        fingerprint = _fingerprint(
            [
                jax.random.key_data(key),
                jax.tree.leaves(eqx.filter((processes, init_law), eqx.is_array)),
                np.asarray(plan.ts),
                np.asarray([n_paths, per_chunk, BLOCK, int(keep_paths)]),
                np.frombuffer(
                    json.dumps([str(method), dt, brownian, str(stepsize_controller)]).encode(),
                    np.uint8,
                ),
            ]
        )
        manifest = os.path.join(checkpoint_dir, "manifest.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                old = json.load(f)
            if old.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"simulate: checkpoint_dir {checkpoint_dir!r} holds chunks of a different "
                    "run (other arguments, model or key); use an empty folder"
                )
        else:
            fd, tmp = tempfile.mkstemp(dir=checkpoint_dir, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"fingerprint": fingerprint, "n_chunks": n_chunks}, f)
            os.replace(tmp, manifest)
        for c in range(n_chunks):
            path = os.path.join(checkpoint_dir, f"chunk_{c:06d}.npz")
            if os.path.exists(path):
                with np.load(path) as z:
                    done[c] = Moments(z["count"], z["mean"], z["m2"])
                    if keep_paths:
                        done_paths[c] = z["paths"]

    # ---- run
    parts: list[Moments] = []
    kept: list[np.ndarray] = []
    t_start = time.perf_counter()
    for c in range(n_chunks):
        if c in done:
            parts.append(done[c])
            if keep_paths:
                kept.append(done_paths[c])
            if progress:
                print(f"jaxou.simulate: chunk {c + 1}/{n_chunks} loaded", file=sys.stderr)
            continue
        first = c * per_chunk
        moments, paths = _run_chunk(
            processes,
            init_law,
            key,
            jnp.asarray(first, jnp.int32),
            jnp.asarray(n_paths, jnp.int32),
            plan.grid,
            save_zero=plan.save_zero,
            saved=plan.saved,
            method=method,
            n_blocks=per_chunk,
            brownian=brownian,
            controller=stepsize_controller,
            keep_paths=keep_paths,
            sharding=sharding,
            max_steps=max_steps,
            exact_steps=exact_steps,
            euler_basis=euler_basis,
            progress=progress,
        )
        moments = Moments(*(np.asarray(x, np.float64) for x in moments))
        part = Moments(moments.count[0], moments.mean, moments.m2)
        parts.append(part)
        if keep_paths:
            n_here = min(n_paths - first * BLOCK, per_chunk * BLOCK)
            paths = np.asarray(paths)[:n_here]
            kept.append(paths)
        if checkpoint_dir is not None:
            extra = {"paths": paths} if keep_paths else {}
            _save_atomic(
                os.path.join(checkpoint_dir, f"chunk_{c:06d}.npz"),
                count=part.count,
                mean=part.mean,
                m2=part.m2,
                **extra,
            )
        if progress:
            done_paths_n = min(n_paths, (c + 1) * per_chunk * BLOCK)
            elapsed = time.perf_counter() - t_start
            print(
                f"jaxou.simulate: chunk {c + 1}/{n_chunks} ({done_paths_n}/{n_paths} paths, "
                f"{elapsed:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    total = merge_host(parts)
    if int(round(float(total.count))) != n_paths:  # pragma: no cover - internal invariant
        raise RuntimeError(f"simulate: merged {total.count} paths instead of {n_paths}")
    cov = total.m2 / (n_paths - 1)
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    return Simulation(
        ts=jnp.asarray(plan.ts, dtype),
        mean=jnp.asarray(total.mean, dtype),
        cov=jnp.asarray(cov, dtype),
        paths=jnp.asarray(np.concatenate(kept, axis=0), dtype) if keep_paths else None,
        n_paths=n_paths,
    )


# ---------------------------------------------------------------------------
# A quick Monte Carlo cross-check of the analytic laws (for `jaxou run`).


def _digamma(x: float) -> float:
    """ψ(x) for x > 0: recurrence up to x >= 6, then the asymptotic series."""
    acc = 0.0
    while x < 6:
        acc -= 1 / x
        x += 1
    inv = 1 / (x * x)
    return acc + math.log(x) - 0.5 / x - inv * (1 / 12 - inv * (1 / 120 - inv / 252))


def kl_fit_floor(d: int, n: int) -> tuple[float, float]:
    r"""Mean and standard deviation of $\mathrm{KL}(N(\hat\mu,\hat\Sigma)\,\|\,N(\mu,
    \Sigma))$ for the fit (unbiased covariance) to $n$ exact samples in $d$
    dimensions: the KL a perfect sampler shows. With $(n-1)\Sigma^{-1/2}\hat\Sigma
    \Sigma^{-1/2} \sim W_d(n-1, I)$, $E[\mathrm{tr}] = d$ and $E[\ln\det] =
    \sum_{i=1}^d \psi((n-i)/2) + d\ln(2/(n-1))$, and the shift part is
    $\chi^2_d/(2n)$; so $E[\mathrm{KL}] = \frac d{2n} - \frac12 E[\ln\det]$ exactly.
    The standard deviation is the asymptotic $\sqrt{k/2}/n$, $k = d + d(d+1)/2$."""
    e_logdet = sum(_digamma((n - i) / 2) for i in range(1, d + 1)) + d * math.log(2 / (n - 1))
    mean = d / (2 * n) - 0.5 * e_logdet
    k = d + d * (d + 1) / 2
    return mean, math.sqrt(k / 2) / n


def _kl_host(m_p, S_p, m_q, S_q) -> float:
    """KL(N(m_p, S_p) ‖ N(m_q, S_q)) in float64 NumPy, through Cholesky factors:
    ½[‖L_q⁻¹L_p‖²_F − d − 2 Σ ln(diag L_p / diag L_q) + ‖L_q⁻¹(m_p − m_q)‖²]."""
    import scipy.linalg

    Lp = np.linalg.cholesky(S_p)
    Lq = np.linalg.cholesky(S_q)
    M = scipy.linalg.solve_triangular(Lq, Lp, lower=True)
    r = scipy.linalg.solve_triangular(Lq, m_p - m_q, lower=True)
    logdet = 2 * np.sum(np.log(np.diag(Lp)) - np.log(np.diag(Lq)))
    return float(0.5 * (np.sum(M**2) - len(m_p) - logdet + r @ r))


def monte_carlo_check(
    model: TwoStage,
    key: PRNGKeyArray,
    *,
    n_paths: int = 4096,
    dt: float | None = None,
    method: str = "exact",
    alpha: float = 1e-3,
) -> dict:
    r"""Simulate a [`jaxou.TwoStage`][] and compare the empirical laws at the end
    of pre-training and of fine-tuning with the analytic ones (`model.laws()`).

    The default, `method="exact"` with 4096 paths, jumps from $0$ to $T_1$ to
    $T_1+T_2$ with the exact OU transition: it runs in about a second on the default
    problem (d = 50, durations ~200 and ~20) and has no discretisation bias, so any
    failure is a bug in the laws or the sampler. A numerical method needs `dt`
    small enough for the stiffest mode (Euler: `dt · max eig(H) ≲ 0.2` for a
    bias under the noise; that is ~10^4 steps there, tens of seconds); use it
    with fewer paths or shorter durations.

    **Returns** a dict: `method`, `n_paths`, `dt`, `seconds`; `kl` (the KL of the
    empirical Gaussian fit to the analytic law, per stage end, "pretrained" and
    "finetuned"); `kl_floor` (its exact expectation for a perfect sampler, see
    `kl_fit_floor`) and `kl_threshold` (the floor plus a one-sided normal quantile
    at level `alpha/2` times its standard deviation); `max_z_mean` and
    `max_z_var` (the largest deviation of a mean entry or a variance entry in
    standard errors, over both stage ends); `z_threshold` (the two-sided
    Bonferroni critical value at level `alpha`); `passed`.
    """
    from statistics import NormalDist

    if not isinstance(model, TwoStage):
        raise TypeError(f"monte_carlo_check: model must be a TwoStage, got {type(model).__name__}")
    t_end = float(model.t_pretrain) + float(model.t_finetune)
    if dt is None:
        if method != "exact":
            raise ValueError("monte_carlo_check: dt is required for a numerical method")
        dt = max(t_end, 1e-12)
    start = time.perf_counter()
    ts = [float(model.t_pretrain), t_end]
    sim = simulate(model, key, n_paths=n_paths, dt=dt, method=method, ts=ts)
    pre, fine = model.laws()
    # The comparison on the host in float64 (a few d x d factorisations): no
    # compiled programs to build for it.
    mean = np.asarray(sim.mean, np.float64)
    cov = np.asarray(sim.cov, np.float64)
    law_mean = np.stack([np.asarray(pre.mean, np.float64), np.asarray(fine.mean, np.float64)])
    law_cov = np.stack([np.asarray(pre.cov, np.float64), np.asarray(fine.cov, np.float64)])
    kls = np.array([_kl_host(mean[i], cov[i], law_mean[i], law_cov[i]) for i in range(2)])
    var = np.diagonal(law_cov, axis1=-2, axis2=-1)
    z_mean = (mean - law_mean) / np.sqrt(var / n_paths)
    z_var = (np.diagonal(cov, axis1=-2, axis2=-1) - var) / np.sqrt(2 * var**2 / (n_paths - 1))
    d = mean.shape[-1]
    k = 2 * 2 * d  # mean and variance entries, two stage ends
    z_thr = NormalDist().inv_cdf(1 - alpha / (2 * k))
    floor, sd = kl_fit_floor(d, n_paths)
    kl_thr = floor + NormalDist().inv_cdf(1 - alpha / 2) * sd
    max_zm = float(np.max(np.abs(np.asarray(z_mean))))
    max_zv = float(np.max(np.abs(z_var)))
    return {
        "method": str(method),
        "n_paths": int(n_paths),
        "dt": float(dt),
        "kl": {"pretrained": float(kls[0]), "finetuned": float(kls[1])},
        "kl_floor": float(floor),
        "kl_threshold": float(kl_thr),
        "max_z_mean": max_zm,
        "max_z_var": max_zv,
        "z_threshold": float(z_thr),
        "passed": bool(max(max_zm, max_zv) < z_thr and np.all(kls < kl_thr)),
        "seconds": time.perf_counter() - start,
    }
