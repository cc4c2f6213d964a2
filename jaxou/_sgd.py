"""Layer 4: SGD stages as OU processes, and the two-stage (pre-train, fine-tune) model."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._flow import flow_factor
from ._gaussian import Gaussian
from ._lyapunov import AbstractLyapunovSolver, Eigh, finite_time_cov, flow_operator, lyapunov
from ._lyapunov.structured import positive_diagonal, stationary_operator
from ._misc import as_float_array, is_concrete
from ._operator import (
    AbstractOperator,
    Dense,
    Diagonal,
    DiagonalPlusLowRank,
    check_matrix,
    densify,
    psd_sqrt,
)
from ._ou import OUProcess, initial_law, marginal_law

__all__ = ["SGDStage", "TwoStage"]


def _as_matrix_or_operator(x, name: str):
    """An array stays an array, a `Dense` operator becomes its array, a structured
    operator stays as it is."""
    if isinstance(x, Dense):
        return x.matrix
    if isinstance(x, AbstractOperator):
        if not isinstance(x, (Diagonal, DiagonalPlusLowRank)):
            raise TypeError(f"SGDStage: {name} of type {type(x).__name__} is not supported")
        return x
    return as_float_array(x, name)


def _check_scalar(name: str, x: Array) -> Array:
    if x.shape != ():
        raise ValueError(f"SGDStage: {name} must be a scalar, got shape {x.shape}")
    if is_concrete(x) and not (float(x) > 0 and math.isfinite(float(x))):
        raise ValueError(f"SGDStage: {name} must be positive and finite, got {float(x)}")
    return eqx.error_if(x, ~(x > 0), f"SGDStage: {name} must be > 0")


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

    `hessian` and `noise_cov` are dense arrays or operators
    ([`jaxou.Diagonal`][], [`jaxou.DiagonalPlusLowRank`][]); the methods are the
    same for both, and return [`jaxou.Gaussian`][]s with dense or operator
    covariances accordingly. A dense matrix beside an operator is turned into an
    operator's dense counterpart (the pair is treated densely, up to jaxou's dense
    limit, $d \le 2048$).

    **Arguments:**

    - `hessian`: $H$, `[d, d]` or an operator, symmetric positive definite.
    - `noise_cov`: $C$, `[d, d]` or an operator, symmetric positive semi-definite.
    - `minimum`: $\theta^*$, `[d]`, finite.
    - `lr`: $\eta > 0$ (a scalar; traced values are fine, for gradients).
    - `batch_size`: $B > 0$ (a scalar, real-valued so that it can be differentiated).
    - `solver`: the Lyapunov solver of the stationary law (keyword-only). `None`
      (default): [`jaxou.Eigh`][] for dense matrices; for operators the exact
      structured solution where a closed form exists (diagonal $H$ and $C$, or a
      constant diagonal part of $H$), else [`jaxou.LowRankADI`][] with its default
      tolerance. Pass e.g. `LowRankADI(rtol=1e-10)` to tighten it, or
      `LowRankADI(rtol=1e-6)` to loosen it at scale; its `rtol` is also the
      compression tolerance of this stage's finite-time laws
      ([`jaxou.finite_time_cov`][]).

    **Raises:** `ValueError` naming the argument for wrong shapes, non-finite
    entries, non-symmetric or indefinite matrices, or a non-positive
    `lr`/`batch_size` (checked eagerly for concrete inputs; under `jit` the
    positivity of `lr` and `batch_size` is checked at run time, and an indefinite
    Hessian makes the Lyapunov solve raise); `TypeError` for mismatched dtypes.
    """

    hessian: Float[Array, "d d"] | AbstractOperator
    noise_cov: Float[Array, "d d"] | AbstractOperator
    minimum: Float[Array, " d"]
    lr: Float[Array, ""]
    batch_size: Float[Array, ""]
    solver: AbstractLyapunovSolver | None

    def __init__(
        self,
        hessian: Float[ArrayLike, "d d"] | AbstractOperator,
        noise_cov: Float[ArrayLike, "d d"] | AbstractOperator,
        minimum: Float[ArrayLike, " d"],
        lr: float | Float[ArrayLike, ""],
        batch_size: float | Float[ArrayLike, ""],
        *,
        solver: AbstractLyapunovSolver | None = None,
    ):
        if solver is not None and not isinstance(solver, AbstractLyapunovSolver):
            raise TypeError(
                f"SGDStage: solver must be a jaxou Lyapunov solver (e.g. jaxou.LowRankADI()), "
                f"got {type(solver).__name__}"
            )
        hessian = _as_matrix_or_operator(hessian, "hessian")
        noise_cov = _as_matrix_or_operator(noise_cov, "noise_cov")
        minimum = as_float_array(minimum, "minimum")
        dtype = hessian.dtype
        for name, x in (("noise_cov", noise_cov), ("minimum", minimum)):
            if x.dtype != dtype:
                raise TypeError(f"SGDStage: hessian is {dtype} but {name} is {x.dtype}")
        if minimum.ndim != 1:
            raise ValueError(f"SGDStage: minimum must be a vector [d], got {minimum.shape}")
        if is_concrete(minimum) and not np.all(np.isfinite(np.asarray(minimum))):
            raise ValueError("SGDStage: minimum has non-finite entries (NaN or inf)")
        d = minimum.shape[0]
        if isinstance(hessian, AbstractOperator) != isinstance(noise_cov, AbstractOperator):
            hessian = densify(hessian, "SGDStage with one dense and one operator matrix")
            noise_cov = densify(noise_cov, "SGDStage with one dense and one operator matrix")
        for name, M, definite in (("hessian", hessian, True), ("noise_cov", noise_cov, False)):
            shape = (M.dim, M.dim) if isinstance(M, AbstractOperator) else M.shape
            if shape != (d, d):
                raise ValueError(f"SGDStage: {name} must be a [{d}, {d}] matrix, got shape {shape}")
            if isinstance(M, AbstractOperator):
                M.check(f"SGDStage: {name}", definite=definite)
            else:
                check_matrix(f"SGDStage: {name}", M, definite=definite)
        self.hessian = hessian
        self.noise_cov = noise_cov
        self.minimum = minimum
        self.lr = _check_scalar("lr", jnp.asarray(lr, dtype))
        self.batch_size = _check_scalar("batch_size", jnp.asarray(batch_size, dtype))
        self.solver = solver

    @property
    def dim(self) -> int:
        return self.minimum.shape[-1]

    @property
    def dtype(self):
        return self.minimum.dtype

    @property
    def is_dense(self) -> bool:
        """Whether `hessian` and `noise_cov` are dense arrays."""
        return not isinstance(self.hessian, AbstractOperator)

    @property
    def diffusion_cov(self) -> Float[Array, "d d"] | AbstractOperator:
        r"""$D = (\eta/B)\,C$, in the representation of `noise_cov`."""
        r = self.lr / self.batch_size
        if isinstance(self.noise_cov, AbstractOperator):
            return self.noise_cov.scale(r)
        return r * self.noise_cov

    @property
    def process(self) -> OUProcess:
        r"""The OU process: drift $H$, mean $\theta^*$, diffusion
        $\sqrt{\eta/B}\,C^{1/2}$ (the symmetric square root). Dense: an operator
        stage is densified up to jaxou's dense limit (for simulation)."""
        H = densify(self.hessian, "SGDStage.process")
        root = psd_sqrt(densify(self.noise_cov, "SGDStage.process"))
        return OUProcess(H, self.minimum, jnp.sqrt(self.lr / self.batch_size) * root)

    def stationary(self) -> Gaussian:
        r"""$N(\theta^*, \Sigma_\infty)$, $H\Sigma_\infty + \Sigma_\infty H =
        (\eta/B)C$: by the symmetric (eigendecomposition) Lyapunov solve for dense
        matrices; for operators, exactly where a closed form exists (diagonal $H$
        and $C$; $H$ with a constant diagonal), otherwise by the large-scale
        low-rank solver."""
        if self.is_dense:
            solver = Eigh() if self.solver is None else self.solver
            S = lyapunov(self.hessian, self.diffusion_cov, solver=solver)
            return Gaussian(self.minimum, 0.5 * (S + S.T))
        # Σ∞ is linear in η/B: solve once for C (concrete, so that the large-scale
        # solver can run) and scale, which keeps gradients in lr and batch_size.
        unit = stationary_operator(self.hessian, self.noise_cov, self.solver)
        return Gaussian(self.minimum, unit.scale(self.lr / self.batch_size))

    def marginal(self, initial: Gaussian | Float[ArrayLike, " d"], t) -> Gaussian:
        """The law after running this stage for a time `t` (= lr × steps) from
        `initial`; `t = inf` gives [`stationary`][jaxou.SGDStage.stationary]."""
        initial = initial_law(initial, self.dim)
        t = jnp.asarray(t, self.dtype)
        if is_concrete(t) and not float(t) >= 0:
            raise ValueError(f"marginal: t must be >= 0 (or inf), got {float(t)}")
        if self.is_dense:
            return _stage_marginal(self, initial, t)
        if is_concrete(t) and math.isinf(float(t)):
            return self.stationary()
        return _operator_marginal(self, initial, t)


@eqx.filter_jit
def _stage_marginal(stage: SGDStage, initial: Gaussian, t: Array) -> Gaussian:
    t = eqx.error_if(t, ~(t >= 0), "marginal: t must be >= 0")
    return marginal_law(
        stage.hessian, stage.minimum, stage.diffusion_cov, initial, t, symmetric=True
    )


def _operator_marginal(stage: SGDStage, initial: Gaussian, t: Array) -> Gaussian:
    """Finite-time law of an operator stage: closed form for a diagonal Hessian,
    noise and initial law; otherwise mean θ* + e^{-tH}(m₀ - θ*) and covariance
    Σ∞ + e^{-tH}(Σ₀ - Σ∞)e^{-tH} by the large-scale flow (dense, up to jaxou's dense
    limit, for a dense initial law or a Hessian whose diagonal part is not positive)."""
    H, D = stage.hessian, stage.diffusion_cov
    init_cov = initial.cov
    if isinstance(H, Diagonal) and isinstance(D, Diagonal) and isinstance(init_cov, Diagonal):
        h = H.diagonal
        decay = jnp.exp(-h * t)
        cov = decay**2 * init_cov.diagonal + D.diagonal * flow_factor(2 * h, t)
        mean = stage.minimum + decay * (initial.mean - stage.minimum)
        return Gaussian(mean, Diagonal(cov))
    if initial.is_dense or not positive_diagonal(H):
        what = "the finite-time law (a dense initial law or a non-positive diagonal)"
        Hd, Dd = densify(H, what), densify(D, what)
        return marginal_law(Hd, stage.minimum, Dd, initial, t, symmetric=True)
    rtol = getattr(stage.solver, "rtol", None)  # the stage's accuracy, for both laws
    cov = finite_time_cov(H, stage.stationary().cov, initial.cov, t, rtol=rtol)
    mean = stage.minimum + flow_operator(H, t).mv(initial.mean - stage.minimum)
    return Gaussian(mean, cov)


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
        dtype = pretrain.dtype
        ts = []
        for name, t in (("t_pretrain", t_pretrain), ("t_finetune", t_finetune)):
            t = jnp.asarray(t, dtype)
            if t.shape != ():
                raise ValueError(f"TwoStage: {name} must be a scalar, got shape {t.shape}")
            if is_concrete(t) and not float(t) >= 0:
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
        t = jnp.asarray(t, self.pretrain.dtype)
        pre = self.pretrained()
        tp = self.t_pretrain

        def one(s):
            first = self.pretrain.marginal(self.init, jnp.minimum(s, tp))
            second = self.finetune.marginal(pre, jnp.maximum(s - tp, 0.0))
            return jax.tree.map(lambda a, b: jnp.where(s <= tp, a, b), first, second)

        flat = jax.vmap(one)(t.reshape(-1))
        return jax.tree.map(lambda x: x.reshape(t.shape + x.shape[1:]), flat)
