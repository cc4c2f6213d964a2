r"""Monte Carlo diagnostics (layer 5, above `_simulate`): the exact laws a simulation
estimates, the KL divergence a perfect sampler shows with a finite number of paths,
and a one-call check of a two-stage model's sampler against its analytic laws."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, PRNGKeyArray

from ._gaussian import Gaussian
from ._ou import OUProcess
from ._sgd import SGDStage, TwoStage
from ._simulate import simulate
from ._solvers import ExactOU

__all__ = ["analytic_marginals", "kl_fit_floor", "MonteCarloCheck", "monte_carlo_check"]


def analytic_marginals(
    model: OUProcess | SGDStage | TwoStage,
    ts: Float[ArrayLike, " s"],
    *,
    initial: Gaussian | Float[ArrayLike, " d"] | None = None,
) -> Gaussian:
    r"""The exact law of the model at each time of `ts`: what [`jaxou.simulate`][]
    estimates at those saved times.

    For an [`jaxou.OUProcess`][] or [`jaxou.SGDStage`][] started at `initial`, the
    marginal $N(\mu + e^{-At}(m_0-\mu),\ e^{-At}S_0e^{-A^\top t} + \Sigma_t)$ at each
    $t$ (`model.marginal`); for a [`jaxou.TwoStage`][], the pre-training marginal up
    to `t_pretrain` (included) and then the fine-tuning marginal from the pre-trained
    law (`TwoStage.marginal`).

    **Arguments:**

    - `model`: `OUProcess`, `SGDStage` or `TwoStage`.
    - `ts`: the times, `[s]`.
    - `initial`: the initial law (a [`jaxou.Gaussian`][] or a point) of an
      `OUProcess`/`SGDStage`; not allowed for a `TwoStage`, which carries its own.

    **Returns:** a [`jaxou.Gaussian`][] with batch shape `[s]`.

    **Raises:** `ValueError` when `initial` is missing or not allowed; `TypeError`
    for another kind of model.
    """
    ts = np.asarray(ts, np.float64).reshape(-1)
    if isinstance(model, TwoStage):
        if initial is not None:
            raise ValueError("analytic_marginals: a TwoStage carries its own initial law")
        return model.marginal(ts)
    if not isinstance(model, (OUProcess, SGDStage)):
        raise TypeError(
            "analytic_marginals: model must be a jaxou.OUProcess, SGDStage or TwoStage, "
            f"got {type(model).__name__}"
        )
    if initial is None:
        raise ValueError("analytic_marginals: initial is required for an OUProcess/SGDStage")
    dtype = model.mean.dtype if isinstance(model, OUProcess) else model.dtype
    if not isinstance(initial, Gaussian):
        initial = Gaussian.point(jnp.asarray(initial, dtype))
    return jax.vmap(lambda t: model.marginal(initial, t))(jnp.asarray(ts, dtype))


def kl_fit_floor(dim: int, n_paths: int) -> tuple[float, float]:
    r"""The mean and standard deviation of
    $\mathrm{KL}(N(\hat\mu,\hat\Sigma)\,\|\,N(\mu,\Sigma))$, where $\hat\mu$ and
    $\hat\Sigma$ (divisor $n-1$) are fitted to $n$ exact samples of $N(\mu, \Sigma)$
    in $d$ dimensions: the KL divergence a *perfect* sampler shows with $n$ paths.
    Compare a simulation's [`Simulation.kl_to`][jaxou.Simulation.kl_to] with it, not
    with zero.

    Both moments are exact. With $\nu = n-1$, $\nu\,\Sigma^{-1/2}\hat\Sigma
    \Sigma^{-1/2} = LL^\top \sim W_d(\nu, I)$, and Bartlett's decomposition makes
    $L$ lower triangular with independent entries, $L_{ii}^2 = c_i \sim
    \chi^2_{\nu-i+1}$ and $L_{ij} \sim N(0, 1)$ below the diagonal. So

    $$2\,\mathrm{KL} = \sum_i \big(\tfrac{c_i}{\nu} - \ln\tfrac{c_i}{\nu} - 1\big)
    + \sum_{i>j}\tfrac{L_{ij}^2}{\nu} + \tfrac{\chi^2_d}{n},$$

    the last term the shift of the mean, independent of $\hat\Sigma$. With
    $E\ln c = \psi(k/2) + \ln 2$, $\mathrm{Var}\ln c = \psi_1(k/2)$ and
    $\mathrm{Cov}(c, \ln c) = 2$ for $c \sim \chi^2_k$:

    $$E\,\mathrm{KL} = \frac{d}{2n} - \frac12\Big[\sum_{i=1}^d
    \psi\big(\tfrac{n-i}{2}\big) + d\ln\tfrac{2}{n-1}\Big],\qquad
    \mathrm{Var}\,\mathrm{KL} = \frac14\Big[\sum_{i=1}^d\Big(\frac{2k_i}{\nu^2} +
    \psi_1\big(\tfrac{k_i}2\big) - \frac4\nu\Big) + \frac{d(d-1)}{\nu^2}\Big] +
    \frac{d}{2n^2},$$

    $k_i = n - i$. For large $n$ both approach the $\chi^2_k/(2n)$ law,
    $k = d + d(d+1)/2$: mean $k/(2n)$, standard deviation $\sqrt{k/2}/n$.

    Reference: M. S. Bartlett (1933), On the theory of statistical regression,
    *Proc. R. Soc. Edinburgh* 53; Anderson, *An Introduction to Multivariate
    Statistical Analysis* (2003), §7.2.

    **Arguments:**

    - `dim`: the dimension $d \ge 1$.
    - `n_paths`: the number of samples $n > d$.

    **Returns:** `(mean, std)`, two floats.

    **Raises:** `ValueError` when `dim < 1` or `n_paths <= dim` (the fit is singular).
    """
    from scipy.special import digamma, polygamma

    d, n = int(dim), int(n_paths)
    if d < 1 or n <= d:
        raise ValueError(f"kl_fit_floor: need dim >= 1 and n_paths > dim, got {dim}, {n_paths}")
    nu = n - 1
    k = n - np.arange(1, d + 1, dtype=np.float64)  # degrees of freedom of the c_i
    mean = d / (2 * n) - 0.5 * (float(np.sum(digamma(k / 2))) + d * math.log(2 / nu))
    var_diag = np.sum(2 * k / nu**2 + polygamma(1, k / 2) - 4 / nu)
    var = 0.25 * (float(var_diag) + d * (d - 1) / nu**2) + d / (2 * n**2)
    return mean, math.sqrt(var)


class MonteCarloCheck(NamedTuple):
    r"""The result of [`jaxou.monte_carlo_check`][].

    - `n_paths`: the number of paths simulated.
    - `kl_pretrained`, `kl_finetuned`: $\mathrm{KL}(\text{empirical fit}\,\|\,
      \text{analytic law})$ at the end of each stage.
    - `kl_floor`, `kl_floor_std`: its mean and standard deviation for a perfect
      sampler ([`jaxou.kl_fit_floor`][]).
    - `kl_threshold`: `kl_floor` plus the one-sided normal quantile at level
      `alpha/2` times `kl_floor_std`.
    - `max_z_mean`, `max_z_var`: the largest deviation of a mean entry and of a
      variance entry, in standard errors, over both stage ends.
    - `z_threshold`: the two-sided Bonferroni critical value at level `alpha` over
      those entries.
    - `passed`: every KL below `kl_threshold` and every deviation below
      `z_threshold`.
    """

    n_paths: int
    kl_pretrained: float
    kl_finetuned: float
    kl_floor: float
    kl_floor_std: float
    kl_threshold: float
    max_z_mean: float
    max_z_var: float
    z_threshold: float
    passed: bool


def monte_carlo_check(
    model: TwoStage,
    key: PRNGKeyArray,
    *,
    n_paths: int = 4096,
    solver: diffrax.AbstractSolver = ExactOU(),
    dt: float | None = None,
    alpha: float = 1e-3,
) -> MonteCarloCheck:
    r"""Simulate a [`jaxou.TwoStage`][] and compare the empirical laws at the end of
    pre-training and of fine-tuning with the analytic ones (`model.laws()`): the KL
    of the Gaussian fit against what a perfect sampler shows, and every mean and
    variance entry in standard errors.

    The default, [`jaxou.ExactOU`][]`()` with 4096 paths, jumps from $0$ to $T_1$ to
    $T_1+T_2$ with the exact OU transition: about a second on `jaxou run`'s default
    problem (d = 50) and no discretisation bias, so a failure is a bug in the laws
    or the sampler. A numerical solver needs `dt` small enough for the stiffest mode
    (Euler: `dt · max eig(H) ≲ 0.2` for a bias under the noise); the test then also
    measures its bias.

    **Arguments:**

    - `model`: a `TwoStage` with finite durations.
    - `key`: a JAX PRNG key.
    - `n_paths`: the number of paths, $> d$.
    - `solver`, `dt`: as in [`jaxou.simulate`][] (`dt` only for a numerical solver).
    - `alpha`: the family-wise level of the test, in $(0, 1)$.

    **Returns:** a [`jaxou.MonteCarloCheck`][].

    **Raises:** `TypeError` for another kind of model; `ValueError` for a bad `alpha`
    or whatever [`jaxou.simulate`][] refuses.
    """
    if not isinstance(model, TwoStage):
        raise TypeError(f"monte_carlo_check: model must be a TwoStage, got {type(model).__name__}")
    if not 0 < alpha < 1:
        raise ValueError(f"monte_carlo_check: alpha must lie in (0, 1), got {alpha}")
    t_end = float(model.t_pretrain) + float(model.t_finetune)
    ts = [float(model.t_pretrain), t_end]
    sim = simulate(model, key, n_paths=n_paths, dt=dt, solver=solver, ts=ts)
    pre, fine = model.laws()
    laws = Gaussian(jnp.stack([pre.mean, fine.mean]), jnp.stack([pre.cov, fine.cov]))
    kls = np.asarray(sim.kl_to(laws), np.float64)
    z_mean, z_cov = (np.asarray(z, np.float64) for z in sim.z_scores(laws))
    z_var = np.diagonal(z_cov, axis1=-2, axis2=-1)
    d = model.dim
    z_thr = NormalDist().inv_cdf(1 - alpha / (2 * 2 * 2 * d))  # mean and variance, two ends
    floor, sd = kl_fit_floor(d, n_paths)
    kl_thr = floor + NormalDist().inv_cdf(1 - alpha / 2) * sd
    max_zm, max_zv = float(np.max(np.abs(z_mean))), float(np.max(np.abs(z_var)))
    return MonteCarloCheck(
        n_paths=int(n_paths),
        kl_pretrained=float(kls[0]),
        kl_finetuned=float(kls[1]),
        kl_floor=floor,
        kl_floor_std=sd,
        kl_threshold=kl_thr,
        max_z_mean=max_zm,
        max_z_var=max_zv,
        z_threshold=z_thr,
        passed=bool(max(max_zm, max_zv) < z_thr and np.all(kls < kl_thr)),
    )
