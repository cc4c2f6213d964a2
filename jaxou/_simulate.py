r"""Layer 5: Monte Carlo simulation of OU ensembles through Diffrax: a pure compiled
core that returns streamed statistics.

Design (see also `_solvers.py`): every path of a chunk lives in one Diffrax state
`y` of shape `[n_paths, d]`; one `diffrax.diffeqsolve` per interval between
saved times advances them all with a fixed-step Brownian path, inside a
`jax.lax.scan` over the intervals that reduces the state to its sufficient
statistics (count, mean, centred second moment) at each saved time. Memory is
`O(n_paths · d + len(ts) · d²)`, independent of the number of steps.

A run has three steps, each a function of this module: `plan_simulation`
(validation, the schedule of intervals and steps, host-side precomputation, the
layout in chunks and devices; no device work), `run_chunk` (one chunk of paths as
one compiled program, returning its statistics) and `merge_chunks` (the exact
merge of the chunks' statistics into a `Simulation`). `simulate` is those three
steps in a loop; the command line drives the same steps itself so that it can save
each finished chunk (`jaxou._resume`). Nothing here touches files, prints, or keeps
state between calls; progress goes through a Diffrax progress meter.

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

import math
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
from ._operator import psd_factor
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

__all__ = [
    "Simulation",
    "SimulationPlan",
    "ChunkResult",
    "simulate",
    "plan_simulation",
    "run_chunk",
    "merge_chunks",
]

BLOCK = 256
"""Paths per random-number block (the unit of chunking and sharding)."""

BROWNIAN_PATHS = (CounterBrownianPath, diffrax.UnsafeBrownianPath, diffrax.VirtualBrownianTree)
"""The values `brownian=` takes: the class of Brownian path to build per block."""

Model = OUProcess | SGDStage | TwoStage


class Simulation(eqx.Module):
    r"""The result of [`jaxou.simulate`][].

    - `ts`: the saved times, `[s]`.
    - `mean`: the sample mean at each saved time, `[s, d]`.
    - `cov`: the sample covariance (unbiased, divisor `n_paths - 1`), `[s, d, d]`.
    - `paths`: `[n_paths, s, d]` when `keep_paths=True`, else `None`.
    - `n_paths`: the number of paths.

    Compare with the exact laws through [`jaxou.analytic_marginals`][]:
    `sim.kl_to(jaxou.analytic_marginals(model, sim.ts))`.
    """

    ts: Float[Array, " s"]
    mean: Float[Array, "s d"]
    cov: Float[Array, "s d d"]
    paths: Float[Array, "n s d"] | None
    n_paths: int = eqx.field(static=True)

    def gaussian(self) -> Gaussian:
        r"""The Gaussian fit $N(\hat\mu_t, \hat\Sigma_t)$ at each saved time (batch `[s]`)."""
        return Gaussian(self.mean, self.cov)

    def kl_to(self, laws: Gaussian) -> Float[Array, " s"]:
        r"""$\mathrm{KL}(N(\hat\mu_t,\hat\Sigma_t)\,\|\,\text{law}_t)$ at each saved time.

        `laws`: a [`jaxou.Gaussian`][] with batch `[s]` (one law per saved time, e.g.
        [`jaxou.analytic_marginals`][]) or one law for all times. With $n$ paths in $d$
        dimensions a perfect sampler shows a KL of about $(d + d(d+1)/2)/(2n)$ (the
        bias of the fit; exactly [`jaxou.kl_fit_floor`][]), so compare against that
        floor, not zero.
        """
        return kl(self.gaussian(), _as_laws(laws, "kl_to"))

    def z_scores(self, laws: Gaussian) -> tuple[Float[Array, "s d"], Float[Array, "s d d"]]:
        r"""Deviations of the sample moments from `laws` (as in `kl_to`) in standard
        errors: mean entries $(\hat\mu_i - \mu_i)/\sqrt{\Sigma_{ii}/n}$ and covariance
        entries $(\hat\Sigma_{ij} - \Sigma_{ij})/\sqrt{(\Sigma_{ii}\Sigma_{jj} +
        \Sigma_{ij}^2)/(n-1)}$ (the normal-theory variance of a sample covariance).
        Entries with zero variance in the law (a point mass) give 0.

        **Returns:** `(z_mean [s, d], z_cov [s, d, d])`.
        """
        laws = _as_laws(laws, "z_scores")
        return _z_scores(self.mean, self.cov, laws.mean, laws.cov, self.n_paths)


@eqx.filter_jit
def _z_scores(mean, cov, law_mean, law_cov, n: int):
    # One compiled program (a dozen eager operations would each compile).
    var = jnp.diagonal(law_cov, axis1=-2, axis2=-1)
    se_mean = jnp.sqrt(var / n)
    z_mean = jnp.where(se_mean > 0, (mean - law_mean) / _nz(se_mean), 0.0)
    se_cov = jnp.sqrt((var[..., :, None] * var[..., None, :] + law_cov**2) / (n - 1))
    z_cov = jnp.where(se_cov > 0, (cov - law_cov) / _nz(se_cov), 0.0)
    return z_mean, z_cov


def _as_laws(laws, where: str) -> Gaussian:
    if not isinstance(laws, Gaussian):
        raise TypeError(
            f"Simulation.{where}: laws must be a jaxou.Gaussian, got {type(laws).__name__}; "
            f"for a model use sim.{where}(jaxou.analytic_marginals(model, sim.ts))"
        )
    return laws


def _nz(x):
    return jnp.where(x > 0, x, 1)


# ---------------------------------------------------------------------------
# Checks that need no device work.


def _as_key(key) -> PRNGKeyArray:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"simulate: key must be a single PRNG key, got shape {key.shape}")
        return key
    key = jnp.asarray(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise TypeError("simulate: key must be a jax.random.key(...) or a raw uint32[2] key")
    return jax.random.wrap_key_data(key)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"simulate: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"simulate: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_solver(solver) -> None:
    if isinstance(solver, type) and issubclass(solver, diffrax.AbstractSolver):
        raise TypeError(f"simulate: solver must be an instance: pass {solver.__name__}()")
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(
            "simulate: solver must be a diffrax.AbstractSolver instance, such as "
            "jaxou.FusedEuler(), jaxou.ExactOU() or diffrax.ShARK(); got "
            f"{solver!r}"
        )
    if isinstance(solver, ExactOU) and solver.flow is not None:
        raise ValueError(
            "simulate: pass solver=jaxou.ExactOU() without matrices; simulate computes "
            "the transition of each interval itself"
        )


def _check_dt(dt, solver) -> float | None:
    if dt is None:
        if not isinstance(solver, ExactOU):
            raise ValueError(f"simulate: dt is required for solver {type(solver).__name__}")
        return None
    try:
        dt = float(dt)
    except TypeError:
        raise TypeError("simulate: dt must be a concrete float") from None
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"simulate: dt must be > 0 and finite, got {dt}")
    return dt


def _check_brownian(brownian, controller, solver) -> tuple[type, Any]:
    """The Brownian path class and the step-size controller, defaults filled in."""
    if controller is None:
        controller = diffrax.ConstantStepSize()
    adaptive = not isinstance(controller, diffrax.ConstantStepSize)
    if brownian is None:
        brownian = diffrax.VirtualBrownianTree if adaptive else CounterBrownianPath
    if not any(brownian is b for b in BROWNIAN_PATHS):
        raise TypeError(
            "simulate: brownian must be one of the classes jaxou.CounterBrownianPath, "
            f"diffrax.UnsafeBrownianPath, diffrax.VirtualBrownianTree; got {brownian!r}"
        )
    if adaptive and (brownian is not diffrax.VirtualBrownianTree or isinstance(solver, ExactOU)):
        raise ValueError(
            "simulate: an adaptive stepsize_controller needs "
            "brownian=diffrax.VirtualBrownianTree and a numerical solver (not ExactOU)"
        )
    return brownian, controller


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


def _saved_times(ts, t_end: float) -> np.ndarray:
    if ts is None:
        return np.array([t_end])
    ts = np.asarray(ts, np.float64).reshape(-1)
    if ts.size == 0:
        raise ValueError("simulate: ts must hold at least one time")
    if not np.all(np.isfinite(ts)):
        raise ValueError("simulate: ts must be finite")
    if np.any(ts < 0) or np.any(ts > t_end * (1 + 1e-12)):
        raise ValueError(
            f"simulate: ts must lie in [0, {t_end:g}] (the end time), got "
            f"[{ts.min():g}, {ts.max():g}]"
        )
    if np.any(np.diff(ts) <= 0):
        raise ValueError("simulate: ts must be strictly increasing (sorted, no repeats)")
    return np.minimum(ts, t_end)


# ---------------------------------------------------------------------------
# The schedule: intervals between saved times and their step counts.


class _Schedule(NamedTuple):
    """One run's intervals. The static part (`save_zero`, `saved`: which interval
    ends are saved) keys the compiled program; the times and step counts (`grid`)
    are traced inputs, so another `dt` or other times of the same count reuse it."""

    ts: np.ndarray
    save_zero: bool
    saved: tuple[int, ...]  # interval indices of the saved times > 0
    grid: dict  # numpy arrays, passed to the program as inputs
    total_steps: int


def _tree_tolerance(length: float, dt: float) -> float:
    # A dyadic fraction of the stage, <= dt/8, so that halving dt refines the same
    # Brownian tree (nested step sizes share one path).
    length = max(length, np.finfo(np.float64).tiny)
    return length / 2.0 ** max(0, math.ceil(math.log2(8 * length / dt)))


def _schedule(stages, ts: np.ndarray, dt: float | None, max_steps: int) -> _Schedule:
    """Cut each stage at the saved times inside it; each interval gets equal steps of
    at most `dt` (one exact jump when `dt` is None)."""
    rows, saved, bounds, tols, total = [], [], [], [], 0
    for s, (_, start, end) in enumerate(stages):
        # A saved time exactly at a stage boundary belongs to the earlier stage.
        inside = [float(t) for t in ts if start < t <= end]
        ends = inside if inside and inside[-1] == end else inside + [end]
        prev = start
        for t in ends:
            if t == prev:
                n = 0
            elif dt is None:
                n = 1
            else:
                n = max(1, math.ceil((t - prev) / dt * (1 - 1e-12)))
            if t in inside:
                saved.append(len(rows))
            rows.append((s, prev, t, n))
            total += n
            prev = t
        bounds.append((start, end))
        tols.append(_tree_tolerance(end - start, end - start if dt is None else dt))
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
    return _Schedule(ts, bool(ts[0] == 0.0), tuple(saved), grid, total)


# ---------------------------------------------------------------------------
# The compiled chunk.


def _levy_area(solver) -> type:
    if isinstance(solver, diffrax.AbstractSRK):
        return solver.minimal_levy_area
    return diffrax.BrownianIncrement


def _concrete_levy(levy):
    # SRK solvers ask for an abstract Lévy-area type; the paths need a concrete one.
    if issubclass(levy, diffrax.AbstractSpaceTimeTimeLevyArea):
        return diffrax.SpaceTimeTimeLevyArea
    if issubclass(levy, diffrax.AbstractSpaceTimeLevyArea):
        return diffrax.SpaceTimeLevyArea
    return diffrax.BrownianIncrement


def _key_words(keys) -> Array:
    """The first two uint32 words of each key of a batch, `[n, 2]`."""
    words = jax.vmap(jax.random.key_data)(keys).reshape(keys.shape[0], -1)[:, :2]
    return words.astype(jnp.uint32)


def _brownian(keys, kind, levy, shape, dtype, start, end, tol):
    """One Brownian path of class `kind` over `[n_blocks * shape[0], shape[1]]`."""
    levy = _concrete_levy(levy)
    if kind is CounterBrownianPath:
        return CounterBrownianPath(_key_words(keys), shape, jnp.dtype(dtype), levy)
    struct = jax.ShapeDtypeStruct(shape, dtype)
    if kind is diffrax.UnsafeBrownianPath:
        make = lambda k: diffrax.UnsafeBrownianPath(struct, k, levy_area=levy)
    else:
        make = lambda k: diffrax.VirtualBrownianTree(start, end, tol, struct, k, levy_area=levy)
    return BlockBrownianPath.build(make, keys, levy, start, end)


def _initial_states(initial: Gaussian, block_keys, sharding) -> Array:
    """`[n_blocks * BLOCK, d]` draws from `initial`, block `b` from `fold_in(key_b, 0)`
    through the counter generator (one small compiled loop, where
    `jax.random.normal` over a batch of keys would add its own)."""
    dtype, d = initial.mean.dtype, initial.dim
    words = _key_words(jax.vmap(lambda k: jax.random.fold_in(k, 0))(block_keys))
    zc = paired_normals(words[:, 0], words[:, 1], (BLOCK // 2, d), dtype)
    z = jnp.concatenate([jnp.real(zc), jnp.imag(zc)], axis=1)  # [n_blocks, BLOCK, d]
    y = (initial.mean + z @ psd_factor(initial.cov)[0].T).reshape(-1, d)
    if sharding is not None:
        y = jax.lax.with_sharding_constraint(y, sharding)
    return y


class _Advance(eqx.Module):
    """Advance every path of a chunk over one interval between saved times; built
    inside the compiled chunk. All intervals of all stages run in one scan, so that
    one `diffeqsolve` is compiled (a TwoStage would otherwise compile two); each
    interval selects its stage from the stacked processes."""

    stacked: OUProcess  # the stages' processes, stacked on a leading axis
    stage_keys: Array  # [stages, n_blocks] keys
    bounds: Array  # [stages, 2]
    tols: Array  # [stages]
    euler_basis: tuple[Array, Array, Array] | None
    solver: diffrax.AbstractSolver  # may hold arrays: not static
    controller: Any
    brownian: type = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __call__(self, y, s, ta, tb, k, flow, root):
        proc = jax.tree.map(lambda leaf: leaf[s], self.stacked)
        h = (tb - ta) / k
        if self.euler_basis is not None:
            return self._eigen(y, s, proc, ta, tb, h)
        m = proc.dim if isinstance(self.solver, ExactOU) else proc.diffusion.shape[1]
        shape, dtype = (BLOCK, m), y.dtype
        start, end = self.bounds[s, 0], self.bounds[s, 1]
        levy = _levy_area(self.solver)
        keys, tol = self.stage_keys[s], self.tols[s]
        bm = _brownian(keys, self.brownian, levy, shape, dtype, start, end, tol)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(proc.drift_field), PathsControlTerm(proc.diffusion_field, bm)
        )
        if isinstance(self.solver, ExactOU):
            # One jump per interval: the solver's step itself, without diffeqsolve's
            # loop around it (a loop of one step; leaving it out makes the compiled
            # program smaller and quicker to build).
            return ExactOU(flow, root, h).step(terms, ta, tb, y, None, None, False)[0]
        return self._solve(terms, ta, tb, h, y)

    def _solve(self, terms, ta, tb, h, y):
        sol = diffrax.diffeqsolve(
            terms,
            self.solver,
            ta,
            tb,
            h,
            y,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=self.controller,
            adjoint=diffrax.ForwardMode(),
            max_steps=self.max_steps,
        )
        return sol.ys[0]

    def _eigen(self, y, s, proc, ta, tb, h):
        # Euler in the noise eigenbasis on a paired state (see `_solvers.EigenDrift`):
        # u = Pᵀ(y - μ), rows r and r + BLOCK/2 of each block as one complex row.
        P, B, sigma = (x[s] for x in self.euler_basis)
        n, d = y.shape
        n_blocks, half = n // BLOCK, BLOCK // 2
        u = ((y - proc.mean) @ P).reshape(n_blocks, 2, half, d)
        u = jax.lax.complex(u[:, 0], u[:, 1])  # [n_blocks, half, d]
        words = _key_words(self.stage_keys[s])
        levy = diffrax.BrownianIncrement
        bm = CounterBrownianPath(words, (BLOCK, d), jnp.dtype(y.dtype), levy, paired=True)
        terms = diffrax.MultiTerm(diffrax.ODETerm(EigenDrift(B)), DiagonalNoiseTerm(sigma, bm))
        with warnings.catch_warnings():
            # Diffrax warns about complex states in general; here only our own solver
            # (real-linear: y + h f + noise) and Diffrax's linear bookkeeping touch it,
            # and the paired layout is checked against the Euler chain's exact law.
            warnings.filterwarnings("ignore", message="Complex dtype support in Diffrax")
            u = self._solve(terms, ta, tb, h, u)
        u = jnp.concatenate([jnp.real(u), jnp.imag(u)], axis=1).reshape(n, d)
        return proc.mean + u @ P.T


def _saved_outputs(st, ys, y0, stats, schedule_static, keep_paths):
    """Pick the saved times out of the interval ends (and t = 0 when saved)."""
    save_zero, saved = schedule_static
    index = jnp.asarray(saved, jnp.int32)
    moments = jax.tree.map(lambda x: x[index], st)
    paths = ys[index] if keep_paths else None
    if save_zero:
        moments = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), stats(y0), moments)
        if keep_paths:
            paths = jnp.concatenate([y0[None], paths])
    if keep_paths:
        paths = jnp.swapaxes(paths, 0, 1)  # [n, s, d]
    return moments, paths


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
    solver: diffrax.AbstractSolver,
    n_blocks: int,
    brownian: type,
    controller: Any,
    keep_paths: bool,
    sharding: Any,
    max_steps: int,
    exact_steps: tuple[Array, Array] | None,
    euler_basis: tuple[Array, Array, Array] | None,
    progress_meter: diffrax.AbstractProgressMeter,
):
    d = initial.dim
    block_ids = first_block + jnp.arange(n_blocks)
    block_keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(block_ids)
    if sharding is not None:
        block_keys = jax.lax.with_sharding_constraint(block_keys, sharding)
    mask = block_ids[:, None] * BLOCK + jnp.arange(BLOCK)[None, :] < n_valid
    y0 = _initial_states(initial, block_keys, sharding)
    stats = lambda y: block_moments(y.reshape(n_blocks, BLOCK, d), mask)
    dtype = initial.mean.dtype
    stage_keys = jnp.stack(
        [
            jax.vmap(lambda k, s=s: jax.random.fold_in(k, 1 + s))(block_keys)
            for s in range(len(processes))
        ]
    )
    advance = _Advance(
        jax.tree.map(lambda *x: jnp.stack(x), *processes),
        stage_keys,
        grid["bounds"].astype(dtype),
        grid["tol"].astype(dtype),
        euler_basis,
        solver,
        controller,
        brownian,
        max_steps,
    )
    n_int = grid["stage"].shape[0]
    flows, roots = exact_steps if exact_steps is not None else (jnp.zeros((n_int, 0), dtype),) * 2

    def body(carry, x):
        y, meter = carry
        i, skip, interval = x[0], x[1], x[2:]
        y = jax.lax.cond(skip, lambda y: y, lambda y: advance(y, *interval), y)
        meter = progress_meter.step(meter, (i + 1) / n_int)
        return (y, meter), (stats(y), y if keep_paths else None)

    t_a, t_b, steps = (grid[k].astype(dtype) for k in ("t_a", "t_b", "steps"))
    xs = (jnp.arange(n_int), grid["empty"], grid["stage"], t_a, t_b, steps, flows, roots)
    (_, meter), (st, ys) = jax.lax.scan(body, (y0, progress_meter.init()), xs)
    progress_meter.close(meter)
    return _saved_outputs(st, ys, y0, stats, (save_zero, saved), keep_paths)


# ---------------------------------------------------------------------------
# Host-side precomputation (outside the compiled chunk: a smaller program).


_exact_step_matrices = eqx.filter_jit(exact_step_matrices)


def _exact_steps(processes, schedule: _Schedule) -> tuple[Array, Array]:
    """`(flows, roots)`, `[n_intervals, d, d]`: the exact transition of each
    interval between saved times (one jump each), computed once per distinct
    (stage, length) by a small compiled function."""
    symmetric = [
        bool(np.allclose(np.asarray(p.drift), np.asarray(p.drift).T, rtol=0, atol=0))
        for p in processes
    ]
    grid = schedule.grid
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


def _layout(n_paths: int, d: int, chunk_size: int | None, devices) -> tuple[int, int, Any]:
    """`(blocks per chunk, number of chunks, sharding)`: chunks of whole blocks, a
    multiple of the number of devices, about 2^24/d paths each by default."""
    devices = list(jax.devices() if devices is None else devices)
    sharding = None
    if len(devices) > 1:
        sharding = NamedSharding(Mesh(np.array(devices), ("paths",)), PartitionSpec("paths"))
    total_blocks = -(-n_paths // BLOCK)
    if chunk_size is None:
        chunk_size = max(BLOCK, (1 << 24) // max(d, 1))
    per_chunk = -(-min(chunk_size, total_blocks * BLOCK) // BLOCK)
    per_chunk = -(-per_chunk // len(devices)) * len(devices)
    return per_chunk, -(-total_blocks // per_chunk), sharding


# ---------------------------------------------------------------------------
# The three steps of a run: plan, chunks, merge.


class SimulationPlan(eqx.Module):
    """Everything a run needs, checked and precomputed on the host; chunk `i` runs
    with `run_chunk(plan, i)`. Built by `plan_simulation`."""

    processes: list[OUProcess]
    initial: Gaussian
    key: PRNGKeyArray
    schedule: _Schedule
    n_paths: int
    blocks_per_chunk: int
    n_chunks: int
    solver: diffrax.AbstractSolver
    brownian: type
    controller: Any
    keep_paths: bool
    max_steps: int
    sharding: Any
    exact_steps: tuple[Array, Array] | None
    euler_basis: tuple[Array, Array, Array] | None


class ChunkResult(NamedTuple):
    """One chunk's statistics (float64, on the host) and, with `keep_paths`, its
    paths `[n, s, d]`."""

    moments: Moments
    paths: np.ndarray | None


def plan_simulation(
    model: Model,
    key: PRNGKeyArray,
    *,
    n_paths: int,
    dt: float | None = None,
    t1: float | None = None,
    initial: Gaussian | Float[ArrayLike, " d"] | None = None,
    solver: diffrax.AbstractSolver = FusedEuler(),
    ts: Sequence[float] | Float[ArrayLike, " s"] | None = None,
    keep_paths: bool = False,
    chunk_size: int | None = None,
    max_steps: int = 10**7,
    brownian: type | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> SimulationPlan:
    """Check the arguments of [`jaxou.simulate`][] (the same ones, less
    `progress_meter`) and plan the run; no device work beyond the small host-side
    precomputations (exact transitions, noise eigenbases)."""
    n_paths = _positive_int("n_paths", n_paths, 2)
    max_steps = _positive_int("max_steps", max_steps)
    if chunk_size is not None:
        chunk_size = _positive_int("chunk_size", chunk_size)
    _check_solver(solver)
    dt = _check_dt(dt, solver)
    brownian, controller = _check_brownian(brownian, stepsize_controller, solver)
    key = _as_key(key)
    stages, init_law, t_end = _stage_list(model, t1, initial)
    exact = isinstance(solver, ExactOU)
    schedule = _schedule(stages, _saved_times(ts, t_end), None if exact else dt, max_steps)
    processes = [p for p, _, _ in stages]
    fast_euler = isinstance(solver, FusedEuler) and brownian is CounterBrownianPath
    per_chunk, n_chunks, sharding = _layout(n_paths, init_law.dim, chunk_size, devices)
    return SimulationPlan(
        processes=processes,
        initial=init_law,
        key=key,
        schedule=schedule,
        n_paths=n_paths,
        blocks_per_chunk=per_chunk,
        n_chunks=n_chunks,
        solver=solver,
        brownian=brownian,
        controller=controller,
        keep_paths=bool(keep_paths),
        max_steps=max_steps,
        sharding=sharding,
        exact_steps=_exact_steps(processes, schedule) if exact else None,
        euler_basis=_euler_basis(processes, init_law.mean.dtype) if fast_euler else None,
    )


def run_chunk(
    plan: SimulationPlan,
    index: int,
    *,
    progress_meter: diffrax.AbstractProgressMeter = diffrax.NoProgressMeter(),
) -> ChunkResult:
    """Run chunk `index` (of `plan.n_chunks`) as one compiled program; its paths are
    those of blocks `index * plan.blocks_per_chunk` onwards. `progress_meter`
    advances at each interval between saved times of the chunk."""
    if not 0 <= index < plan.n_chunks:
        raise ValueError(f"run_chunk: index must lie in [0, {plan.n_chunks}), got {index}")
    first = index * plan.blocks_per_chunk
    moments, paths = _run_chunk(
        plan.processes,
        plan.initial,
        plan.key,
        jnp.asarray(first, jnp.int32),
        jnp.asarray(plan.n_paths, jnp.int32),
        plan.schedule.grid,
        save_zero=plan.schedule.save_zero,
        saved=plan.schedule.saved,
        solver=plan.solver,
        n_blocks=plan.blocks_per_chunk,
        brownian=plan.brownian,
        controller=plan.controller,
        keep_paths=plan.keep_paths,
        sharding=plan.sharding,
        max_steps=plan.max_steps,
        exact_steps=plan.exact_steps,
        euler_basis=plan.euler_basis,
        progress_meter=progress_meter,
    )
    count, mean, m2 = (np.asarray(x, np.float64) for x in moments)
    if plan.keep_paths:
        n_here = min(plan.n_paths - first * BLOCK, plan.blocks_per_chunk * BLOCK)
        paths = np.asarray(paths)[:n_here]
    return ChunkResult(Moments(count[0], mean, m2), paths)


def merge_chunks(plan: SimulationPlan, parts: Sequence[ChunkResult]) -> Simulation:
    """Merge the chunks' statistics exactly (Chan et al., in float64) into a
    [`jaxou.Simulation`][]; `parts` must be every chunk of `plan`, in order."""
    if len(parts) != plan.n_chunks:
        raise ValueError(f"merge_chunks: {len(parts)} parts for a plan of {plan.n_chunks} chunks")
    total = merge_host([p.moments for p in parts])
    n = plan.n_paths
    if int(round(float(total.count))) != n:
        raise ValueError(f"merge_chunks: the parts hold {float(total.count):g} paths, not {n}")
    cov = total.m2 / (n - 1)
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    dtype = plan.initial.mean.dtype
    paths = None
    if plan.keep_paths:
        paths = jnp.asarray(np.concatenate([p.paths for p in parts], axis=0), dtype)
    return Simulation(
        ts=jnp.asarray(plan.schedule.ts, dtype),
        mean=jnp.asarray(total.mean, dtype),
        cov=jnp.asarray(cov, dtype),
        paths=paths,
        n_paths=n,
    )


def simulate(
    model: Model,
    key: PRNGKeyArray,
    *,
    n_paths: int,
    dt: float | None = None,
    t1: float | None = None,
    initial: Gaussian | Float[ArrayLike, " d"] | None = None,
    solver: diffrax.AbstractSolver = FusedEuler(),
    ts: Sequence[float] | Float[ArrayLike, " s"] | None = None,
    keep_paths: bool = False,
    chunk_size: int | None = None,
    max_steps: int = 10**7,
    brownian: type | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress_meter: diffrax.AbstractProgressMeter = diffrax.NoProgressMeter(),
) -> Simulation:
    r"""Simulate `n_paths` independent trajectories of an OU model and return their
    streamed statistics (and, on request, the paths).

    The model is an [`jaxou.OUProcess`][] $dX = -A(X-\mu)dt + G\,dW$, an
    [`jaxou.SGDStage`][] (its `.process`), or a [`jaxou.TwoStage`][]: then the paths
    start from `model.init`, run the pre-training stage on $[0, T_1]$ and continue,
    the same paths, under the fine-tuning stage on $[T_1, T_1 + T_2]$, all in one
    compiled program. A saved time exactly at $T_1$ is the end of pre-training.

    Integration goes through `diffrax.diffeqsolve`, with all the paths of a chunk in
    one state `[n_paths, d]`, fixed steps of at most `dt` (each interval between
    saved times is cut into equal steps), and statistics reduced at each saved time
    so that memory does not grow with the number of steps. Each path's randomness
    depends only on `key` and the path's index, so the result does not depend on
    `chunk_size` or on the devices (up to rounding). Chunk statistics are merged
    exactly (Chan, Golub & LeVeque 1979). The function is pure: it writes no files
    and prints nothing but what `progress_meter` shows (`jaxou simulate` on the
    command line saves each chunk and resumes an interrupted run).

    **Arguments:**

    - `model`: `OUProcess`, `SGDStage` or `TwoStage`.
    - `key`: a JAX PRNG key.
    - `n_paths`: number of paths, $\ge 2$.
    - `dt`: the step (an upper bound: intervals are cut into equal steps $\le$ `dt`);
      not needed by [`jaxou.ExactOU`][].
    - `t1`, `initial`: duration and initial law (a `Gaussian` or a point) for an
      `OUProcess`/`SGDStage`; not allowed for a `TwoStage`.
    - `solver`: a `diffrax.AbstractSolver` instance, used with the terms
      `MultiTerm(ODETerm(drift), PathsControlTerm(diffusion, brownian))`:
      [`jaxou.FusedEuler`][]`()` (the default: Euler–Maruyama, strong and weak order 1
      for additive noise, with the fast path described under `brownian`),
      [`jaxou.ExactOU`][]`()` (the exact OU transition, one jump per interval between
      saved times: no discretisation error whatever `dt`), `diffrax.ShARK()`,
      `diffrax.SRA1()`, `diffrax.SEA()` (additive-noise stochastic Runge–Kutta
      solvers; ShARK and SRA1 have strong order 1.5 and weak order 2 here and draw a
      space-time Lévy area too, so a step costs about 2-3× Euler), `diffrax.Heun()`,
      `diffrax.Euler()`, or your own.
    - `ts`: the saved times in $[0, t_\text{end}]$, strictly increasing; `None`
      saves the final time only.
    - `keep_paths`: also return the paths at `ts` (`[n_paths, len(ts), d]`).
    - `chunk_size`: paths per chunk (rounded up to a multiple of 256 × the number
      of devices); `None` picks chunks of about $2^{24}/d$ paths.
    - `max_steps`: the step budget; more steps than this is an error before any work.
    - `brownian`: the class of Brownian path, built by `simulate` for each block of
      256 paths (as `levy_area=` takes a class in Diffrax):
      [`jaxou.CounterBrownianPath`][] (the default for fixed steps: Threefry-2x32
      with 20 rounds, the hash of `jax.random.normal`, and a Box–Muller transform,
      one vectorised loop per step; about 5× JAX's default normal generation on
      CPU), `diffrax.UnsafeBrownianPath`, or `diffrax.VirtualBrownianTree` (at a
      dyadic tolerance $\le$ `dt/8`: the same Brownian path whatever the step, for
      adaptive steps and convergence studies; slower). With `CounterBrownianPath`,
      `FusedEuler` integrates each stage in the eigenbasis of its noise covariance
      $D = GG^\top$: $u = P^\top(y-\mu)$, $du = -P^\top AP\,u\,dt +
      \mathrm{diag}(\sigma)\,dW$, the same process in law and the same Euler chain,
      with elementwise noise and, when $A$ and $D$ commute (an SGD stage whose noise
      shares the Hessian's eigenvectors), an elementwise drift; its draws therefore
      differ from those of other solvers given the same key.
    - `stepsize_controller`: a Diffrax controller, `ConstantStepSize()` by default;
      an adaptive one (e.g. `PIDController`) needs `diffrax.VirtualBrownianTree`
      (chosen automatically) and a solver with an error estimate (`ShARK`, `SRA1`).
    - `devices`: the devices to shard the paths over (default `jax.devices()`,
      all hosts' devices under `jax.distributed`).
    - `progress_meter`: a Diffrax progress meter (`diffrax.TqdmProgressMeter()`,
      `diffrax.TextProgressMeter()`; none by default), advanced at each saved time;
      one meter per chunk.

    **Returns:** a [`jaxou.Simulation`][].

    **Raises:** `ValueError` before any work for `dt <= 0`, `n_paths < 2`, infinite
    durations, `ts` outside $[0, t_\text{end}]$ or not strictly increasing, more
    steps than `max_steps`, or an adaptive controller without
    `diffrax.VirtualBrownianTree`; `TypeError` for a model, key, solver or
    `brownian` of the wrong kind (strings such as `"euler"` are not accepted).
    """
    plan = plan_simulation(
        model,
        key,
        n_paths=n_paths,
        dt=dt,
        t1=t1,
        initial=initial,
        solver=solver,
        ts=ts,
        keep_paths=keep_paths,
        chunk_size=chunk_size,
        max_steps=max_steps,
        brownian=brownian,
        stepsize_controller=stepsize_controller,
        devices=devices,
    )
    parts = [run_chunk(plan, i, progress_meter=progress_meter) for i in range(plan.n_chunks)]
    return merge_chunks(plan, parts)
