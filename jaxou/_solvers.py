"""Diffrax pieces for integrating a whole ensemble of OU paths as one state.

The fast layout keeps every path of a chunk in one state `y` of shape
`[n_paths, d]`: one `diffrax.diffeqsolve` then advances all paths per step, so
Diffrax's per-step bookkeeping is paid once per step instead of once per path
(vmapping `diffeqsolve` over paths pays it `n_paths` times and is 40-90x slower
on CPU). Three pieces make that layout work with Diffrax's own solvers:

- [`PathsControlTerm`][]: the diffusion term, contracting a Brownian increment of
  shape `[n_paths, m]` with the `[d, m]` diffusion matrix as `dW @ Gᵀ`.
- [`BlockBrownianPath`][]: any Diffrax Brownian path (`UnsafeBrownianPath`,
  `VirtualBrownianTree`) batched over fixed-size blocks of paths, each block with
  its own key, so that a path's noise depends only on the key and its block
  index, never on how the paths are chunked or sharded.
- [`ExactOU`][]: a `diffrax.AbstractSolver` taking the exact OU transition as its
  step (no discretisation error), driven by the Brownian increments of the path.

And the fast path of Euler–Maruyama (`simulate(..., solver=FusedEuler())`, the
default, with the default Brownian path `CounterBrownianPath`):

- [`CounterBrownianPath`][]: counter-based increments (Threefry-2x32, 20 rounds;
  Box–Muller with polynomial sin/cos), one hash per pair of normals.
- [`FusedEuler`][] on a *paired* state: paths `r` and `r + 128` of each block of
  256 are the real and imaginary parts of one complex entry, so that XLA's CPU
  backend, which emits a fused loop output by output, computes each hash once and
  keeps the whole step (hash, transform, drift, update) in one vectorised loop.
- [`EigenDrift`][] and [`DiagonalNoiseTerm`][]: the process in the eigenbasis of
  its noise covariance, where the noise is elementwise (and the drift too when it
  commutes with the noise); see [`noise_eigenbasis`][].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._flow import ou_flow
from ._operator import psd_factor
from ._ou import OUDiffusion, OUDrift

__all__ = [
    "PathsControlTerm",
    "BlockBrownianPath",
    "ExactOU",
    "FusedEuler",
    "CounterBrownianPath",
    "EigenDrift",
    "DiagonalNoiseTerm",
]


class PathsControlTerm(diffrax.AbstractTerm):
    r"""The diffusion term $G\,dW$ for a state holding many paths: `y` is
    `[n_paths, d]`, the control (a Brownian increment) is `[n_paths, m]` and the
    vector field returns the constant `[d, m]` matrix $G$; the product is
    $dW\,G^\top$ (one matrix product for all paths). With Lévy areas (for
    ShARK/SRA1) `contr` passes `use_levy` on to the Brownian path, and `prod` is
    applied by the solver to `W` and `H` alike.

    **Arguments:**

    - `diffusion`: the vector field, e.g. `OUProcess.diffusion_field`.
    - `control`: a Brownian path of shape `[n_paths, m]`.
    """

    diffusion: OUDiffusion
    control: diffrax.AbstractBrownianPath

    def vf(self, t, y, args) -> Float[Array, "d m"]:
        return self.diffusion(t, y, args)

    def contr(self, t0, t1, **kwargs):
        return self.control.evaluate(t0, t1, **kwargs)

    def prod(self, vf: Float[Array, "d m"], control: Float[Array, "n m"]) -> Float[Array, "n d"]:
        return control @ vf.T


def _unbatch(x: Array) -> Array:
    # Increments come back as [n_blocks, block, m]; their `dt` as [n_blocks].
    return x.reshape((-1,) + x.shape[2:]) if x.ndim >= 2 else x[0]


class BlockBrownianPath(diffrax.AbstractBrownianPath):
    r"""A Diffrax Brownian path over `[n_blocks * block, m]`, made of `n_blocks`
    independent Brownian paths of shape `[block, m]` (batched with `eqx.filter_vmap`
    over their keys). Paths are numbered globally and block `b` always gets the
    same key, `fold_in(key, b)`, so chunking and sharding do not change any draw.

    Build with [`BlockBrownianPath.build`][].
    """

    paths: diffrax.AbstractBrownianPath  # batched over blocks (leading axis of leaves)
    levy_area: type = eqx.field(static=True)
    start: Float[Array, ""]
    end: Float[Array, ""]

    @classmethod
    def build(
        cls,
        make: Callable[[Array], diffrax.AbstractBrownianPath],
        keys: PyTree[Array],
        levy_area: type,
        start,
        end,
    ) -> BlockBrownianPath:
        """`make(key)` builds one block's path; `keys` is the `[n_blocks]` batch of
        block keys."""
        return cls(eqx.filter_vmap(make)(keys), levy_area, jnp.asarray(start), jnp.asarray(end))

    @property
    def t0(self):
        return self.start

    @property
    def t1(self):
        return self.end

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        out = eqx.filter_vmap(
            lambda p: p.evaluate(t0, t1, left=left, use_levy=use_levy),
        )(self.paths)
        return jtu.tree_map(_unbatch, out)


class ExactOU(diffrax.AbstractItoSolver):
    r"""The exact Ornstein–Uhlenbeck step as a Diffrax solver:

    $$y_1 = \mu + F(y_0-\mu) + L\,\xi,\qquad F = e^{-Ah},\ LL^\top = \Sigma_h,\
    \xi = \Delta W/\sqrt h \sim N(0, I_d),$$

    with $\Sigma_h = \int_0^h e^{-As}De^{-A^\top s}ds$ (DESIGN.md, "exact
    transition"). Exact in law for any step $h$, so an integrator can jump straight
    from one saved time to the next: `jaxou.simulate(..., solver=jaxou.ExactOU())`
    takes one step per interval between saved times, whatever `dt`.

    Use it with the terms `MultiTerm(ODETerm(OUDrift(A, mu)), diffusion)`, where the
    diffusion term's vector field is $G$ and its Brownian path has `d` columns (the
    step draws $\xi$ from it). `ExactOU()` computes $F$ and $L$ from the terms at
    every step; [`jaxou.simulate`][] precomputes them once per interval length and
    passes them as `flow`, `noise_root` and `dt` (then every step must have length
    `dt`, checked at run time).

    **Arguments:**

    - `flow`, `noise_root`, `dt`: optional precomputed $F$, $L$ (`[d, d]`) for steps
      of length `dt` (see `jaxou._solvers.exact_step_matrices`); all three or
      none.

    Reference: e.g. Gardiner, *Stochastic Methods* (2009), §4.5.6.
    """

    term_structure: ClassVar = diffrax.MultiTerm[tuple[diffrax.ODETerm, diffrax.AbstractTerm]]
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    flow: Float[Array, "d d"] | None = None
    noise_root: Float[Array, "d d"] | None = None
    dt: Float[Array, ""] | None = None

    def __check_init__(self):
        given = [x is not None for x in (self.flow, self.noise_root, self.dt)]
        if any(given) and not all(given):
            raise ValueError("ExactOU: pass flow, noise_root and dt together, or none of them")

    def order(self, terms):
        return None

    def strong_order(self, terms):
        return None

    def init(self, terms, t0, t1, y0, args):
        return None

    def _matrices(self, drift: OUDrift, diffusion, t0, y0, args, h):
        if self.flow is not None:
            h = eqx.error_if(
                h,
                jnp.abs(h - self.dt) > 1e-5 * self.dt,
                "ExactOU: the step differs from the dt its transition was built for",
            )
            return self.flow, self.noise_root, h
        G = diffusion.vf(t0, y0, args)
        return (*exact_step_matrices(drift.matrix, G @ G.T, h, symmetric=None), h)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        drift_term, diffusion = terms.terms
        # The drift term's vector field (diffeqsolve may have wrapped the term).
        is_drift = lambda x: isinstance(x, OUDrift)
        drifts = [x for x in jtu.tree_leaves(drift_term, is_leaf=is_drift) if is_drift(x)]
        if len(drifts) != 1:
            raise TypeError("ExactOU: the drift term's vector field must be a jaxou.OUDrift")
        drift = drifts[0]
        h = jnp.asarray(t1 - t0, y0.dtype)
        flow, root, h = self._matrices(drift, diffusion, t0, y0, args, h)
        dw = diffusion.contr(t0, t1)
        if dw.shape[-1] != root.shape[-1]:
            raise ValueError(
                f"ExactOU: the Brownian path must have d = {root.shape[-1]} columns, got "
                f"{dw.shape[-1]}"
            )
        xi = dw / jnp.sqrt(h)
        y1 = drift.mean + (y0 - drift.mean) @ flow.T + xi @ root.T
        return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def exact_step_matrices(
    drift: Float[Array, "d d"], diffusion_cov: Float[Array, "d d"], dt, *, symmetric: bool | None
) -> tuple[Float[Array, "d d"], Float[Array, "d d"]]:
    """`(F, L)` with `F = e^{-A dt}` and `L Lᵀ = Σ_dt` (`psd_factor`, so that
    degenerate noise works); `symmetric` as in `ou_flow`."""
    F, S = ou_flow(drift, diffusion_cov, dt, symmetric=symmetric)
    return F, psd_factor(S)[0]


class FusedEuler(diffrax.AbstractItoSolver):
    r"""Euler–Maruyama for $dy = f(t,y)dt + G\,dW$ with the two products fused in one
    expression, `y + h f(t, y) + dW Gᵀ`; the same numbers as `diffrax.Euler` on
    `MultiTerm(ODETerm(f), PathsControlTerm(G, W))`, with less bookkeeping per step
    (no pytree arithmetic over the `MultiTerm`). Strong order 1 and weak order 1 for
    additive noise (the Milstein correction vanishes there, so this is Milstein's
    scheme too).

    The default solver of [`jaxou.simulate`][]: with its default Brownian path
    ([`jaxou.CounterBrownianPath`][]) it integrates each stage in the eigenbasis of
    the noise covariance, on paired paths (see `jaxou._solvers`), the fastest path.
    """

    term_structure: ClassVar = diffrax.MultiTerm[tuple[diffrax.ODETerm, diffrax.AbstractTerm]]
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 1.0

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        drift, diffusion = terms.terms
        h = jnp.asarray(t1 - t0, jnp.real(y0).dtype)
        dw = diffusion.contr(t0, t1)
        f = drift.vf(t0, y0, args)
        # A real step times a (paired) complex drift: two real products, not a
        # complex one.
        hf = _scale_complex(f, h) if jnp.iscomplexobj(f) else h * f
        y1 = y0 + hf + diffusion.vf_prod(t0, y0, args, dw)
        return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


# ---------------------------------------------------------------------------
# A fast counter-based Brownian path.

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)


def _rotl(x, r: int):
    return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror & Shaw 2011, *Parallel
    random numbers: as easy as 1, 2, 3*), the same hash as JAX's default PRNG; all
    arguments uint32 arrays that broadcast. Returns the two output words."""
    k2 = k0 ^ k1 ^ jnp.uint32(0x1BD11BDA)
    ks = (k0, k1, k2)
    x0, x1 = x0 + k0, x1 + k1
    for i in range(20):
        x0 = x0 + x1
        x1 = _rotl(x1, _ROTATIONS[i % 8]) ^ x0
        if i % 4 == 3:
            s = i // 4 + 1
            x0 = x0 + ks[s % 3]
            x1 = x1 + ks[(s + 1) % 3] + jnp.uint32(s)
    return x0, x1


def _scale_complex(z: Array, s) -> Array:
    """`z * s` for complex `z` and real `s`: two real products (a promoted complex
    product would do four)."""
    return jax.lax.complex(jnp.real(z) * s, jnp.imag(z) * s)


# Taylor coefficients of sin(x)/x and cos(x) in x², enough for float32 on
# |x| <= π/4: the first omitted terms, x^11/11! and x^10/10!, are below 2e-9
# and 3e-8 there (float32's unit roundoff is 6e-8).
_SIN_F32 = (1.0, -1 / 6, 1 / 120, -1 / 5040, 1 / 362880)
_COS_F32 = (1.0, -1 / 2, 1 / 24, -1 / 720, 1 / 40320)


def _horner(x2, coeffs):
    acc = jnp.asarray(coeffs[-1], x2.dtype)
    for c in coeffs[-2::-1]:
        acc = acc * x2 + jnp.asarray(c, x2.dtype)
    return acc


def box_muller_f32(w0: Array, w1: Array) -> tuple[Array, Array]:
    r"""Two independent float32 standard normals from two uint32 words by the
    Box–Muller transform (Box & Muller 1958, *A note on the generation of random
    normal deviates*): $r = \sqrt{-2\ln u}$ with $u = (w_0 + \tfrac12)\,2^{-32} \in
    (0, 1)$ (all 32 bits, so the largest $r$ is $\sqrt{66\ln 2} = 6.76$: the tail
    is cut where $P(|z| > 6.76) \approx 10^{-11}$), and the angle
    $\theta = \tfrac\pi2(q + f)$ from $w_1$: its top two bits give the quadrant $q$,
    the next 24 the fraction $f$. $\cos$ and $\sin$ are short polynomials on the
    reduced angle $x = \tfrac\pi2(f - \tfrac12) \in [-\tfrac\pi4, \tfrac\pi4)$,
    rotated by $q$ quarter turns (a constant rotation of a uniform angle is still
    uniform), so the transform is a few dozen vectorised flops and no
    library calls; `jax.random.normal`'s inverse-CDF transform (`erfinv`) costs
    about twice as much per normal on CPU."""
    f32 = jnp.float32
    u = (w0.astype(f32) + f32(0.5)) * f32(2.0**-32)
    r = jnp.sqrt(f32(-2.0) * jnp.log(u))
    q = w1 >> jnp.uint32(30)
    frac = ((w1 >> jnp.uint32(6)) & jnp.uint32(0xFFFFFF)).astype(f32) * f32(2.0**-24)
    x = (frac - f32(0.5)) * f32(math.pi / 2)
    x2 = x * x
    s = x * _horner(x2, _SIN_F32)
    c = _horner(x2, _COS_F32)
    swap = (q & jnp.uint32(1)) == 1  # a quarter turn: (c, s) -> (-s, c)
    flip = (q & jnp.uint32(2)) == 2  # a half turn: negate both
    a = jnp.where(swap, -s, c)
    b = jnp.where(swap, c, s)
    return r * jnp.where(flip, -a, a), r * jnp.where(flip, -b, b)


def box_muller_f64(a0: Array, a1: Array, b0: Array, b1: Array) -> tuple[Array, Array]:
    """Two float64 standard normals from four uint32 words: Box–Muller with a
    53-bit uniform for the radius (words `a0`, `a1`) and a 52-bit angle (`b0`,
    `b1`), through `log`, `cos`, `sin` in float64."""
    f64 = jnp.float64

    def unit(hi, lo, bits):  # (k + 1/2) 2^-bits for the top `bits` bits of hi:lo
        k = (hi.astype(jnp.uint64) << jnp.uint64(32)) | lo.astype(jnp.uint64)
        k = k >> jnp.uint64(64 - bits)
        return (k.astype(f64) + 0.5) * (2.0**-bits)

    r = jnp.sqrt(-2.0 * jnp.log(unit(a0, a1, 53)))
    theta = (2 * math.pi) * unit(b0, b1, 52)
    return r * jnp.cos(theta), r * jnp.sin(theta)


def paired_normals(k0, k1, shape: tuple[int, ...], dtype, step=0, offset: int = 0) -> Array:
    """Complex numbers whose real and imaginary parts are independent standard
    normals, `[n_keys, *shape]` for the uint32 keys `k0`, `k1` of shape `[n_keys]`:
    Threefry-2x32 keyed by each key on the counters `(offset + c, step)`, `c` the
    row-major index in `shape`, then Box–Muller ([`box_muller_f32`][]; in float64
    [`box_muller_f64`][] on the counters `(2(offset + c), step)` and
    `(2(offset + c) + 1, step)`). One complex output per counter, so that a single
    fused XLA loop computes each hash once (XLA's CPU backend emits a fusion
    element by element with one output: two real outputs from one hash would hash
    twice); the counters are built in the output's own shape (no reshape inside
    the loop, which would keep it from being vectorised)."""
    c = jnp.uint32(offset)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        c = c + jax.lax.broadcasted_iota(jnp.uint32, (1, *shape), axis + 1) * jnp.uint32(stride)
        stride *= shape[axis]
    k0 = k0.reshape((-1,) + (1,) * len(shape))
    k1 = k1.reshape((-1,) + (1,) * len(shape))
    step = jnp.asarray(step, jnp.uint32)
    if jnp.dtype(dtype) == jnp.float64:
        a0, a1 = threefry2x32(k0, k1, 2 * c, step)
        b0, b1 = threefry2x32(k0, k1, 2 * c + 1, step)
        re, im = box_muller_f64(a0, a1, b0, b1)
    else:
        a0, a1 = threefry2x32(k0, k1, c, step)
        re, im = box_muller_f32(a0, a1)
    return jax.lax.complex(re, im).astype(jnp.result_type(dtype, jnp.complex64))


class CounterBrownianPath(diffrax.AbstractBrownianPath):
    r"""A fixed-step Brownian path over `[n_blocks * block, m]` drawn from a
    counter-based generator: the increment over $[t_0, t_1]$ of block $b$ is
    $\sqrt{t_1-t_0}\,z$ with $z$ standard normals from Threefry-2x32 (20 rounds,
    the hash of JAX's default PRNG; Salmon et al. 2011) keyed by
    `hash(key_b, t0, t1)` on counters, transformed by Box–Muller
    (`jaxou._solvers.paired_normals`): counter $c$ gives the normals of rows $c$ and
    $c + \text{block}/2$ of the block (real and imaginary part). The space-time
    Lévy area $H \sim N(0, (t_1-t_0)/12)$, when asked, comes from a second,
    disjoint counter range.

    The default Brownian path of [`jaxou.simulate`][] with fixed steps
    (`brownian=jaxou.CounterBrownianPath`; `simulate` builds it, one key per block of
    256 paths). With `paired=True` the path returns the increments as complex
    numbers, `[n_blocks, block/2, m]`, real part the first half of each block's rows
    and imaginary part the second: the layout of [`jaxou.FusedEuler`][] on a paired
    state, where each hash is computed once inside the step's single fused loop.

    Like `diffrax.UnsafeBrownianPath` (the same restrictions: fixed steps, no
    backpropagation, increments over disjoint steps independent) but several times
    faster on CPU. The draws are keyed by the step's start `t0` (the counter's
    second word), so two calls with the same `t0` reuse the same normals, scaled
    by their own $\sqrt{t_1-t_0}$: right for a fixed-step solve, where each start
    occurs once, and not a Brownian path to be queried at arbitrary intervals.
    Each block's keys are `fold_in(key, b)`, so draws do not depend
    on chunking or sharding.

    **Arguments:**

    - `keys`: `uint32 [n_blocks, 2]`, one Threefry key per block.
    - `block_shape`: `(block, m)`, `block` even.
    - `dtype`: the increments' floating dtype.
    - `levy_area`: `diffrax.BrownianIncrement` or `diffrax.SpaceTimeLevyArea`.
    - `paired`: return the paired complex layout described above.
    """

    keys: Array  # uint32 [n_blocks, 2]
    block_shape: tuple[int, int] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)
    levy_area: type = eqx.field(static=True)
    paired: bool = eqx.field(static=True, default=False)

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
        if t1 is None:
            t0, t1 = jnp.zeros_like(jnp.asarray(t0)), t0
        # Counter mode (Salmon et al. 2011): the block's key stays fixed and the
        # step's start time is the second counter word, so distinct steps get
        # distinct counters. A float32 time is one word; a float64 time (two words)
        # is first hashed into the block key (a bijection of the time for a fixed
        # key, so distinct times still give distinct streams). The per-entry loop
        # then does one hash per entry: per-step keys derived from (t0, t1) by extra
        # hashes would be fused into that loop and recomputed for every entry.
        k0, k1 = self.keys[:, 0], self.keys[:, 1]
        t0 = jnp.asarray(t0)
        if t0.dtype == jnp.float64:
            w = jax.lax.bitcast_convert_type(t0, jnp.uint32)
            k0, k1 = threefry2x32(k0, k1, w[0], w[1])
            step = jnp.uint32(0)
        else:
            step = jax.lax.bitcast_convert_type(t0.astype(jnp.float32), jnp.uint32)
        nb = self.keys.shape[0]
        b, m = self.block_shape
        if b % 2:
            raise ValueError("CounterBrownianPath: the block size must be even")
        half = b // 2
        h = jnp.asarray(t1 - t0, self.dtype)

        def draw(scale, offset):
            zc = paired_normals(k0, k1, (half, m), self.dtype, step, offset)
            if self.paired:
                return _scale_complex(zc, scale)
            zr = jnp.concatenate([jnp.real(zc), jnp.imag(zc)], axis=1)
            return (scale * zr).reshape(nb * b, m)

        w = draw(jnp.sqrt(h), 0)
        if not use_levy:
            return w
        if self.levy_area is diffrax.BrownianIncrement:
            return diffrax.BrownianIncrement(dt=h, W=w)
        if self.levy_area is not diffrax.SpaceTimeLevyArea:
            raise ValueError("CounterBrownianPath: only BrownianIncrement or SpaceTimeLevyArea")
        hh = draw(jnp.sqrt(h / 12), half * m)
        return diffrax.SpaceTimeLevyArea(dt=h, W=w, H=hh)


# ---------------------------------------------------------------------------
# Euler in the noise eigenbasis, on a paired (complex) state.


class EigenDrift(eqx.Module):
    r"""The drift $-B u$ of an OU process written in the eigenbasis $P$ of its
    noise covariance $D = P\,\mathrm{diag}(\sigma^2)P^\top$: with $u = P^\top(y-\mu)$,
    $du = -Bu\,dt + \mathrm{diag}(\sigma)\,dW$, $B = P^\top A P$ (diagonal when $A$
    and $D$ commute, e.g. an SGD stage whose noise shares the Hessian's
    eigenvectors). The state is paired: `u` is complex `[n, d]`, real and imaginary
    parts two independent paths (see [`CounterBrownianPath`][]), and $B$ is real,
    so one product advances both.

    `rates` is $B$ (`[d, d]`) or its diagonal (`[d]`). A diagonal drift is
    elementwise; a dense one is unrolled into `d` scaled columns for `d <= unroll`
    (so that the whole Euler step stays one fused loop) and is one real matrix
    product on the stacked real and imaginary parts beyond.
    """

    rates: Float[Array, "d d"] | Float[Array, " d"]
    unroll: int = eqx.field(static=True, default=8)

    def __call__(self, t, y, args=None):
        B = self.rates
        if B.ndim == 1:
            return _scale_complex(y, -B)
        d = B.shape[0]
        if d <= self.unroll:
            re, im = jnp.real(y), jnp.imag(y)
            acc_re = sum(re[..., j : j + 1] * B[:, j] for j in range(d))
            acc_im = sum(im[..., j : j + 1] * B[:, j] for j in range(d))
            return jax.lax.complex(-acc_re, -acc_im)
        out = jnp.stack([jnp.real(y), jnp.imag(y)]) @ (-B.T)
        return jax.lax.complex(out[0], out[1])


class DiagonalNoiseTerm(diffrax.AbstractTerm):
    r"""The diffusion term $\mathrm{diag}(\sigma)\,dW$ on a paired (complex) state:
    the control is a complex Brownian increment `[n, d]` (two independent real
    increments, see [`CounterBrownianPath`][] with `paired=True`) and the product is
    elementwise."""

    scale: Float[Array, " d"]
    control: diffrax.AbstractBrownianPath

    def vf(self, t, y, args) -> Float[Array, " d"]:
        return self.scale

    def contr(self, t0, t1, **kwargs):
        return self.control.evaluate(t0, t1, **kwargs)

    def prod(self, vf, control):
        return _scale_complex(control, vf)


def noise_eigenbasis(
    drift: np.ndarray, diffusion_cov: np.ndarray, *, eps: float = float(np.finfo(np.float64).eps)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""On the host, in float64: `(P, B, sigma)` with $D = P\,\mathrm{diag}(\sigma^2)
    P^\top$ ($P$ orthogonal) and $B = P^\top A P$, the OU process in the noise
    eigenbasis. When $A$ is symmetric and commutes with $D$, $P$ diagonalises both
    (eigenvectors of the generic combination $D + \tau A$, so that a repeated noise
    eigenvalue, e.g. isotropic noise, does not leave $B$ dense) and `B` is
    returned as its diagonal `[d]`; otherwise `B` is `[d, d]`. "Symmetric",
    "commutes" and "diagonal" are judged relative to the norms at the tolerance
    `16 d eps` (`eps`: the working precision's, so that float32 inputs, rounded
    when they were formed, still qualify; what is dropped is below their rounding).
    The law of the process is unchanged: $P^\top G\,dW$ and
    $\mathrm{diag}(\sigma)\,dW'$ are Brownian increments with the same covariance."""
    A = np.asarray(drift, np.float64)
    D = np.asarray(diffusion_cov, np.float64)
    D = 0.5 * (D + D.T)
    d = A.shape[0]
    tol = 16 * d * eps
    na, nd = max(np.linalg.norm(A), 1e-300), max(np.linalg.norm(D), 1e-300)
    symmetric = np.linalg.norm(A - A.T) <= tol * na
    if symmetric and np.linalg.norm(A @ D - D @ A) <= tol * na * nd:
        As = 0.5 * (A + A.T)
        _, P = np.linalg.eigh(D / nd + 0.6180339887498949 * As / na)  # a generic mix
        B = P.T @ As @ P
        S = P.T @ D @ P
        off = lambda M: np.linalg.norm(M - np.diag(np.diag(M)))
        if off(B) <= tol * na and off(S) <= tol * nd:
            return P, np.diag(B).copy(), np.sqrt(np.clip(np.diag(S), 0, None))
    lam, P = np.linalg.eigh(D)
    return P, P.T @ A @ P, np.sqrt(np.clip(lam, 0, None))
