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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from ._ou import OUDiffusion

__all__ = ["PathsControlTerm", "BlockBrownianPath", "ExactOU"]


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


class ExactOU(diffrax.AbstractSolver):
    r"""The exact Ornstein–Uhlenbeck step as a Diffrax solver:

    $$y_1 = \mu + F(y_0-\mu) + L\,\xi,\qquad F = e^{-Ah},\ LL^\top = \Sigma_h,\
    \xi = \Delta W/\sqrt h \sim N(0, I_d),$$

    with $\Sigma_h = \int_0^h e^{-As}De^{-A^\top s}ds$ (DESIGN.md, "exact
    transition"). It is exact in law for any step $h$, so the integrator can jump
    straight from one saved time to the next. The step matrices for the nominal step
    `dt` are precomputed; any other step length (a clipped last step) recomputes
    them. Use it with the terms `(ODETerm(drift_field), PathsControlTerm(...))`
    whose Brownian path has `d` columns (the drift term is only read for its
    matrix and mean; the noise enters through $L$, not through $G$).

    Reference: e.g. Gardiner, *Stochastic Methods* (2009), §4.5.6.
    """

    term_structure: ClassVar = diffrax.MultiTerm[tuple[diffrax.ODETerm, diffrax.AbstractTerm]]
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    drift: Float[Array, "d d"]
    mean: Float[Array, " d"]
    diffusion_cov: Float[Array, "d d"]
    dt: Float[Array, ""]
    flow: Float[Array, "d d"]
    chol: Float[Array, "d d"]

    def __init__(self, drift, mean, diffusion_cov, dt):
        from ._linalg import ou_flow

        self.drift = drift
        self.mean = mean
        self.diffusion_cov = diffusion_cov
        self.dt = jnp.asarray(dt, drift.dtype)
        self.flow, self.chol = _flow_chol(ou_flow, drift, diffusion_cov, self.dt)

    def order(self, terms):
        return None

    def strong_order(self, terms):
        return None

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        from ._linalg import ou_flow

        del solver_state, made_jump
        h = jnp.asarray(t1 - t0, self.drift.dtype)
        F, L = jax.lax.cond(
            jnp.abs(h - self.dt) <= 1e-6 * self.dt,
            lambda: (self.flow, self.chol),
            lambda: _flow_chol(ou_flow, self.drift, self.diffusion_cov, h),
        )
        _, diffusion = terms.terms
        dw = diffusion.contr(t0, t1)
        xi = dw / jnp.sqrt(h).astype(dw.dtype)
        y1 = self.mean + (y0 - self.mean) @ F.T.astype(y0.dtype) + xi @ L.T.astype(y0.dtype)
        return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def _flow_chol(ou_flow, drift, diffusion_cov, h):
    F, S = ou_flow(drift, diffusion_cov, h)
    # A PSD square root that tolerates a singular Σ_h (degenerate noise).
    lam, V = jnp.linalg.eigh(S)
    return F, V * jnp.sqrt(jnp.clip(lam, 0))[None, :]


class FusedEuler(diffrax.AbstractItoSolver):
    r"""Euler–Maruyama for $dy = f(t,y)dt + G\,dW$ with the two products fused in one
    expression, `y + h f(t, y) + dW Gᵀ`; the same numbers as `diffrax.Euler` on
    `MultiTerm(ODETerm(f), PathsControlTerm(G, W))`, with less bookkeeping per step
    (no pytree arithmetic over the `MultiTerm`). Strong order 1 and weak order 1 for
    additive noise.
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
        h = jnp.asarray(t1 - t0, y0.dtype)
        dw = diffusion.contr(t0, t1)
        y1 = y0 + h * drift.vf(t0, y0, args) + diffusion.vf_prod(t0, y0, args, dw)
        return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
