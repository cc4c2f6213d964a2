"""Layer 3: the Ornstein–Uhlenbeck process dX = -A (X - μ) dt + G dW."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._flow import ou_flow
from ._gaussian import Gaussian
from ._lyapunov import lyapunov
from ._misc import as_float_array, is_concrete

__all__ = ["OUProcess", "OUDrift", "OUDiffusion", "initial_law", "marginal_law"]


def initial_law(initial, dim: int) -> Gaussian:
    """`initial` as a single Gaussian of dimension `dim` (a point becomes a point
    mass); `ValueError` otherwise."""
    if not isinstance(initial, Gaussian):
        initial = Gaussian.point(initial)
    if initial.dim != dim or initial.batch_shape != ():
        raise ValueError(
            f"marginal: initial must be a single law of dimension {dim}, got "
            f"dimension {initial.dim} and batch shape {initial.batch_shape}"
        )
    return initial


def marginal_law(drift, mean, diffusion_cov, initial: Gaussian, t, *, symmetric=None):
    r"""The law at time $t$ of $dX = -A(X - \mu)dt + G\,dW$ ($D = GG^\top$,
    dense) from `initial`: $N(\mu + F(m_0 - \mu), FS_0F^\top + \Sigma_t)$ with
    $(F, \Sigma_t)$ = `ou_flow(A, D, t)`."""
    F, St = ou_flow(drift, diffusion_cov, t, symmetric=symmetric)
    cov = F @ initial.cov_matrix() @ F.T + St
    return Gaussian(mean + F @ (initial.mean - mean), 0.5 * (cov + cov.T))


class OUDrift(eqx.Module):
    r"""The drift vector field $f(t, y) = -A(y - \mu)$ in Diffrax's `(t, y, args)`
    signature, so that `diffrax.ODETerm(OUDrift(A, mu))` works untouched. `y` may
    carry leading dimensions (many paths in one state): `y` is `[..., d]`."""

    matrix: Float[Array, "d d"]
    mean: Float[Array, " d"]

    def __call__(self, t, y: Float[Array, "... d"], args=None) -> Float[Array, "... d"]:
        return -(y - self.mean) @ self.matrix.T


class OUDiffusion(eqx.Module):
    r"""The constant diffusion $g(t, y) = G$ (shape `[d, m]`) in Diffrax's
    `(t, y, args)` signature, for `diffrax.ControlTerm(OUDiffusion(G), brownian)`."""

    matrix: Float[Array, "d m"]

    def __call__(self, t, y, args=None) -> Float[Array, "d m"]:
        return self.matrix


class OUProcess(eqx.Module):
    r"""The Ornstein–Uhlenbeck process

    $$dX_t = -A (X_t - \mu)\,dt + G\,dW_t,$$

    with $A$ stable (every eigenvalue has a positive real part), $W$ an
    $m$-dimensional Brownian motion and $D = G G^\top$.

    Exact laws (used as the reference for every numerical solver):

    - stationary: $N(\mu, \Sigma_\infty)$, $A\Sigma_\infty + \Sigma_\infty A^\top = D$;
    - marginal at $t$ from $N(m_0, S_0)$: mean $\mu + e^{-At}(m_0-\mu)$,
      covariance $e^{-At} S_0 e^{-A^\top t} + \Sigma_t$ with
      $\Sigma_t = \int_0^t e^{-As} D e^{-A^\top s} ds$ $(= \Sigma_\infty -
      e^{-At}\Sigma_\infty e^{-A^\top t})$;
    - transition over $\Delta$: $X' \mid X \sim N(\mu + F(X-\mu), \Sigma_\Delta)$,
      $F = e^{-A\Delta}$.

    **Arguments:**

    - `drift`: $A$, shape `[d, d]`.
    - `mean`: $\mu$, shape `[d]`.
    - `diffusion`: $G$, shape `[d, m]` (often `[d, d]`).

    `drift_field` and `diffusion_field` are the Equinox vector fields that Diffrax
    integrates (`(t, y, args)` signature).
    """

    drift: Float[Array, "d d"]
    mean: Float[Array, " d"]
    diffusion: Float[Array, "d m"]

    def __init__(
        self,
        drift: Float[ArrayLike, "d d"],
        mean: Float[ArrayLike, " d"],
        diffusion: Float[ArrayLike, "d m"],
    ):
        drift = as_float_array(drift, "drift")
        mean = as_float_array(mean, "mean")
        diffusion = as_float_array(diffusion, "diffusion")
        if drift.ndim != 2 or drift.shape[0] != drift.shape[1]:
            raise ValueError(f"OUProcess: drift must be a [d, d] matrix, got {drift.shape}")
        d = drift.shape[0]
        if mean.shape != (d,):
            raise ValueError(f"OUProcess: mean must have shape ({d},), got {mean.shape}")
        if diffusion.ndim != 2 or diffusion.shape[0] != d:
            raise ValueError(f"OUProcess: diffusion must be [{d}, m], got {diffusion.shape}")
        for name, x in (("mean", mean), ("diffusion", diffusion)):
            if x.dtype != drift.dtype:
                raise TypeError(f"OUProcess: drift is {drift.dtype} but {name} is {x.dtype}")
        for name, x in (("drift", drift), ("mean", mean), ("diffusion", diffusion)):
            if is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
                raise ValueError(f"OUProcess: {name} has non-finite entries (NaN or inf)")
        self.drift = drift
        self.mean = mean
        self.diffusion = diffusion

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    @property
    def diffusion_cov(self) -> Float[Array, "d d"]:
        """$D = G G^\\top$."""
        return self.diffusion @ self.diffusion.T

    @property
    def drift_field(self) -> OUDrift:
        """The drift as a Diffrax vector field, $-A(y-\\mu)$."""
        return OUDrift(self.drift, self.mean)

    @property
    def diffusion_field(self) -> OUDiffusion:
        """The diffusion as a Diffrax vector field, $G$."""
        return OUDiffusion(self.diffusion)

    def stationary(self) -> Gaussian:
        r"""The stationary law $N(\mu, \Sigma_\infty)$ with
        $A\Sigma_\infty + \Sigma_\infty A^\top = GG^\top$. Raises at run time if
        the drift is not stable."""
        S = lyapunov(self.drift, self.diffusion_cov)
        return Gaussian(self.mean, 0.5 * (S + S.T))

    def marginal(self, initial: Gaussian | Float[ArrayLike, " d"], t) -> Gaussian:
        r"""The law of $X_t$ when $X_0 \sim$ `initial` (a [`jaxou.Gaussian`][] or a
        point); `t = inf` gives the stationary law. Accurate for tiny $t$."""
        initial = initial_law(initial, self.dim)
        t = jnp.asarray(t, self.drift.dtype)
        t = eqx.error_if(t, t < 0, "marginal: t must be >= 0")
        return marginal_law(self.drift, self.mean, self.diffusion_cov, initial, t)

    def transition(self, dt) -> tuple[Float[Array, "d d"], Float[Array, "d d"]]:
        r"""The exact transition over a step `dt`: returns $(F, \Sigma_{dt})$ with
        $X_{t+dt} \mid X_t \sim N(\mu + F(X_t - \mu), \Sigma_{dt})$,
        $F = e^{-A\,dt}$, $\Sigma_{dt} = \int_0^{dt} e^{-As} D e^{-A^\top s} ds$.
        Computed without cancellation, so it is accurate for tiny `dt`."""
        dt = jnp.asarray(dt, self.drift.dtype)
        dt = eqx.error_if(dt, dt <= 0, "transition: dt must be > 0")
        return ou_flow(self.drift, self.diffusion_cov, dt)

    def transition_sample(self, key, x: Float[Array, "... d"], dt) -> Float[Array, "... d"]:
        """One exact step from states `x` (any leading shape)."""
        F, S = self.transition(dt)
        step = Gaussian(jnp.zeros(self.dim, x.dtype), S)
        noise = step.sample(key, x.shape[:-1])
        return self.mean + (x - self.mean) @ F.T + noise
