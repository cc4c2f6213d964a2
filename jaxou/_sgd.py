"""Layer 4: SGD stages as OU processes, and the two-stage (pre-train, fine-tune) model."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._gaussian import Gaussian
from ._flow import ou_flow
from ._lyapunov import lyapunov
from ._misc import as_float_array
from ._ou import OUProcess

__all__ = ["SGDStage", "TwoStage"]


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_matrix(name: str, M: Array, d: int, *, definite: bool) -> None:
    """Value checks on a concrete symmetric matrix, with messages naming it."""
    if M.shape != (d, d):
        raise ValueError(f"{name} must be a [{d}, {d}] matrix, got shape {M.shape}")
    Mn = np.asarray(M)
    if not np.all(np.isfinite(Mn)):
        raise ValueError(f"{name} has non-finite entries")
    scale = max(float(np.max(np.abs(Mn))), np.finfo(Mn.dtype).tiny)
    eps = np.finfo(Mn.dtype).eps
    if np.max(np.abs(Mn - Mn.T)) > 1e3 * eps * scale:
        raise ValueError(
            f"{name} is not symmetric (max |M - Mᵀ| = {np.max(np.abs(Mn - Mn.T)):.3g})"
        )
    lam = np.linalg.eigvalsh(0.5 * (Mn + Mn.T))
    tol = 10 * d * eps * scale
    if definite and lam[0] <= 0:
        raise ValueError(
            f"{name} is not positive definite (smallest eigenvalue {lam[0]:.3g}); "
            "the loss must be locally strictly convex at the minimum"
        )
    if not definite and lam[0] < -tol:
        raise ValueError(f"{name} is not positive semi-definite (smallest eigenvalue {lam[0]:.3g})")


class SGDStage(eqx.Module):
    r"""One stage of SGD near a minimum, as an OU process. With a local quadratic
    loss of minimum $\theta^*$ and Hessian $H$, per-example gradient-noise
    covariance $C$, learning rate $\eta$ and batch size $B$, in continuous time
    $t = \eta \times \text{steps}$:

    $$d\theta = -H(\theta-\theta^*)\,dt + \sqrt{\eta/B}\;C^{1/2}\,dW_t,$$

    so the diffusion covariance is $D = (\eta/B)\,C$ and the stationary law is
    $N(\theta^*, \Sigma_\infty)$ with $H\Sigma_\infty + \Sigma_\infty H = (\eta/B)C$
    (Mandt, Hoffman & Blei 2017, *Stochastic gradient descent as approximate
    Bayesian inference*).

    **Arguments:**

    - `hessian`: $H$, `[d, d]`, symmetric positive definite.
    - `noise_cov`: $C$, `[d, d]`, symmetric positive semi-definite.
    - `minimum`: $\theta^*$, `[d]`.
    - `lr`: $\eta > 0$ (a scalar; traced values are fine, for gradients).
    - `batch_size`: $B > 0$ (a scalar, real-valued so that it can be differentiated).

    **Raises:** `ValueError` naming the argument for wrong shapes, non-symmetric or
    indefinite matrices, or a non-positive `lr`/`batch_size` (checked eagerly for
    concrete inputs; under `jit` the positivity of `lr` and `batch_size` is checked
    at run time, and an indefinite Hessian makes the Lyapunov solve raise).
    """

    hessian: Float[Array, "d d"]
    noise_cov: Float[Array, "d d"]
    minimum: Float[Array, " d"]
    lr: Float[Array, ""]
    batch_size: Float[Array, ""]

    def __init__(
        self,
        hessian: Float[ArrayLike, "d d"],
        noise_cov: Float[ArrayLike, "d d"],
        minimum: Float[ArrayLike, " d"],
        lr: float | Float[ArrayLike, ""],
        batch_size: float | Float[ArrayLike, ""],
    ):
        hessian = as_float_array(hessian, "hessian")
        dtype = hessian.dtype
        noise_cov = as_float_array(noise_cov, "noise_cov")
        minimum = as_float_array(minimum, "minimum")
        for name, x in (("noise_cov", noise_cov), ("minimum", minimum)):
            if x.dtype != dtype:
                raise TypeError(f"SGDStage: hessian is {dtype} but {name} is {x.dtype}")
        if minimum.ndim != 1:
            raise ValueError(f"SGDStage: minimum must be a vector [d], got {minimum.shape}")
        d = minimum.shape[0]
        lr = jnp.asarray(lr, dtype)
        batch_size = jnp.asarray(batch_size, dtype)
        for name, x in (("lr", lr), ("batch_size", batch_size)):
            if x.shape != ():
                raise ValueError(f"SGDStage: {name} must be a scalar, got shape {x.shape}")
        if _is_concrete(hessian):
            _check_matrix("SGDStage: hessian", hessian, d, definite=True)
        elif hessian.shape != (d, d):
            raise ValueError(f"SGDStage: hessian must be [{d}, {d}], got {hessian.shape}")
        if _is_concrete(noise_cov):
            _check_matrix("SGDStage: noise_cov", noise_cov, d, definite=False)
        elif noise_cov.shape != (d, d):
            raise ValueError(f"SGDStage: noise_cov must be [{d}, {d}], got {noise_cov.shape}")
        for name, x in (("lr", lr), ("batch_size", batch_size)):
            if _is_concrete(x):
                if not float(x) > 0 or not math.isfinite(float(x)):
                    raise ValueError(
                        f"SGDStage: {name} must be positive and finite, got {float(x)}"
                    )
        lr = eqx.error_if(lr, ~(lr > 0), "SGDStage: lr must be > 0")
        batch_size = eqx.error_if(batch_size, ~(batch_size > 0), "SGDStage: batch_size must be > 0")
        self.hessian = hessian
        self.noise_cov = noise_cov
        self.minimum = minimum
        self.lr = lr
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.minimum.shape[-1]

    @property
    def diffusion_cov(self) -> Float[Array, "d d"]:
        r"""$D = (\eta/B)\,C$."""
        return (self.lr / self.batch_size) * self.noise_cov

    @property
    def process(self) -> OUProcess:
        r"""The OU process: drift $H$, mean $\theta^*$, diffusion
        $\sqrt{\eta/B}\,C^{1/2}$ (symmetric square root through `eigh`)."""
        lam, V = jnp.linalg.eigh(self.noise_cov)
        root = (V * jnp.sqrt(jnp.clip(lam, 0))) @ V.T
        return OUProcess(self.hessian, self.minimum, jnp.sqrt(self.lr / self.batch_size) * root)

    def stationary(self) -> Gaussian:
        r"""$N(\theta^*, \Sigma_\infty)$, $H\Sigma_\infty + \Sigma_\infty H =
        (\eta/B)C$, by the symmetric (eigendecomposition) Lyapunov solve."""
        S = lyapunov(self.hessian, self.diffusion_cov, method="eigh")
        return Gaussian(self.minimum, 0.5 * (S + S.T))

    def marginal(self, initial: Gaussian | Float[ArrayLike, " d"], t) -> Gaussian:
        """The law after running this stage for a time `t` (= lr × steps) from
        `initial`; `t = inf` gives [`stationary`][jaxou.SGDStage.stationary]."""
        if not isinstance(initial, Gaussian):
            initial = Gaussian.point(initial)
        if initial.dim != self.dim or initial.batch_shape != ():
            raise ValueError(
                f"marginal: initial must be a single law of dimension {self.dim}, got "
                f"dimension {initial.dim} and batch shape {initial.batch_shape}"
            )
        t = jnp.asarray(t, self.hessian.dtype)
        if _is_concrete(t) and not float(t) >= 0:
            raise ValueError(f"marginal: t must be >= 0 (or inf), got {float(t)}")
        return _stage_marginal(self, initial, t)


@eqx.filter_jit
def _stage_marginal(stage: SGDStage, initial: Gaussian, t: Array) -> Gaussian:
    t = eqx.error_if(t, ~(t >= 0), "marginal: t must be >= 0")
    F, St = ou_flow(stage.hessian, stage.diffusion_cov, t, symmetric=True)
    mean = stage.minimum + F @ (initial.mean - stage.minimum)
    cov = F @ initial.cov @ F.T + St
    return Gaussian(mean, 0.5 * (cov + cov.T))


class TwoStage(eqx.Module):
    r"""Pre-training then fine-tuning. $\theta_0 \sim$ `init`; the `pretrain` stage
    runs for a time `t_pretrain`, then the `finetune` stage runs for `t_finetune`
    from the law pre-training reached. A duration of `inf` means "to
    stationarity" (then the stage's law no longer depends on where it started).

    **Arguments:**

    - `init`: the initialisation law, a [`jaxou.Gaussian`][] (e.g.
      `Gaussian.isotropic(zeros(d), sigma0)`).
    - `pretrain`, `finetune`: the two [`jaxou.SGDStage`][]s (same dimension).
    - `t_pretrain`, `t_finetune`: durations in continuous time ($\eta\times$steps),
      $\ge 0$ or `inf`.
    """

    init: Gaussian
    pretrain: SGDStage
    finetune: SGDStage
    t_pretrain: Float[Array, ""]
    t_finetune: Float[Array, ""]

    def __init__(
        self,
        init: Gaussian,
        pretrain: SGDStage,
        finetune: SGDStage,
        t_pretrain=float("inf"),
        t_finetune=float("inf"),
    ):
        if not isinstance(init, Gaussian):
            raise TypeError(f"TwoStage: init must be a jaxou.Gaussian, got {type(init).__name__}")
        for name, s in (("pretrain", pretrain), ("finetune", finetune)):
            if not isinstance(s, SGDStage):
                raise TypeError(
                    f"TwoStage: {name} must be a jaxou.SGDStage, got {type(s).__name__}"
                )
        if not (init.dim == pretrain.dim == finetune.dim):
            raise ValueError(
                f"TwoStage: dimensions differ (init {init.dim}, pretrain {pretrain.dim}, "
                f"finetune {finetune.dim})"
            )
        if init.batch_shape != ():
            raise ValueError(f"TwoStage: init must be a single law, got batch {init.batch_shape}")
        dtype = pretrain.hessian.dtype
        ts = []
        for name, t in (("t_pretrain", t_pretrain), ("t_finetune", t_finetune)):
            t = jnp.asarray(t, dtype)
            if t.shape != ():
                raise ValueError(f"TwoStage: {name} must be a scalar, got shape {t.shape}")
            if _is_concrete(t) and not float(t) >= 0:
                raise ValueError(f"TwoStage: {name} must be >= 0 (or inf), got {float(t)}")
            ts.append(eqx.error_if(t, ~(t >= 0), f"TwoStage: {name} must be >= 0"))
        self.init = init
        self.pretrain = pretrain
        self.finetune = finetune
        self.t_pretrain, self.t_finetune = ts

    @property
    def dim(self) -> int:
        return self.init.dim

    def pretrained(self) -> Gaussian:
        """The law at the end of pre-training (the prior of the fine-tuning bound)."""
        return self.pretrain.marginal(self.init, self.t_pretrain)

    def finetuned(self) -> Gaussian:
        """The law at the end of fine-tuning."""
        return self.finetune.marginal(self.pretrained(), self.t_finetune)

    def laws(self) -> tuple[Gaussian, Gaussian]:
        """`(pretrained, finetuned)`, computing the pre-trained law once."""
        pre = self.pretrained()
        return pre, self.finetune.marginal(pre, self.t_finetune)

    def marginal(self, t: Float[ArrayLike, "*s"]) -> Gaussian:
        r"""The exact law of $\theta_t$ at time(s) `t` of the whole run: the
        pre-training marginal for $t \le$ `t_pretrain`, then the fine-tuning marginal
        started from the pre-trained law at $t -$ `t_pretrain`. `t` may be an array
        (the result has its shape as batch shape) and may be traced; it is meant to lie
        in $[0,$ `t_pretrain + t_finetune`$]$ (beyond, fine-tuning simply goes on).
        """
        t = jnp.asarray(t, self.pretrain.hessian.dtype)
        pre = self.pretrained()
        tp = self.t_pretrain

        def one(s):
            first = self.pretrain.marginal(self.init, jnp.minimum(s, tp))
            second = self.finetune.marginal(pre, jnp.maximum(s - tp, 0.0))
            return jax.tree.map(lambda a, b: jnp.where(s <= tp, a, b), first, second)

        flat = jax.vmap(one)(t.reshape(-1))
        return jax.tree.map(lambda x: x.reshape(t.shape + x.shape[1:]), flat)
