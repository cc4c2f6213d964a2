"""Layer 6: PAC-Bayes bounds, the two-stage bound and the domain discrepancy."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from ._gaussian import Gaussian, KLDecomposition, kl_parts
from ._misc import check_range
from ._numerics import expm1mx, log1p
from ._ou import OUProcess
from ._sgd import SGDStage, TwoStage

__all__ = [
    "binary_kl",
    "kl_inverse",
    "pac_bayes_bound",
    "domain_discrepancy",
    "two_stage_bound",
    "TwoStageBound",
]


def _weighted_phi(w: Array, x: Array, diff: Array) -> Array:
    """w φ(ln(x/w)) for w in (0, 1), x in [0, 1], given diff = x - w computed
    without rounding from the original arguments (Sterbenz). Near x = w through
    log1p of the relative difference (full relative accuracy); where ln(x/w) > 1 as
    (x - w) - w ln(x/w) instead, which neither overflows for tiny w nor amplifies
    the rounding of the logarithm through the exponential (found by a property test:
    w = 1e-206 lost 30 ulps, w = 1e-308 gave NaN)."""
    log_ratio = jnp.log(x) - jnp.log(w)
    big = log_ratio > 1
    w_safe = jnp.where(big, 1.0, w)
    near = w * expm1mx(log1p(jnp.where(big, 0.0, diff / w_safe)))
    far = diff - w * jnp.where(big, log_ratio, 0.0)
    return jnp.where(big, far, near)


def binary_kl(q: ArrayLike, p: ArrayLike) -> Array:
    r"""$\mathrm{kl}(q\,\|\,p) = q\ln\frac qp + (1-q)\ln\frac{1-q}{1-p}$, the KL
    divergence between Bernoulli laws, with $0\ln 0 = 0$.

    Written as $q\,\varphi(\ln\frac pq) + (1-q)\,\varphi(\ln\frac{1-p}{1-q})$ with
    $\varphi(u) = e^u - 1 - u \ge 0$ (the two forms agree because
    $q\frac pq + (1-q)\frac{1-p}{1-q} = 1$): a sum of non-negative terms, so
    $\mathrm{kl}$ keeps its relative accuracy when $p$ is close to $q$, where the
    textbook form cancels.
    """
    q, p = jnp.broadcast_arrays(jnp.asarray(q), jnp.asarray(p))
    dtype = jnp.result_type(q.dtype, p.dtype, float)
    q, p = q.astype(dtype), p.astype(dtype)
    inner = (q > 0) & (q < 1)
    qs = jnp.where(inner, q, 0.5)
    general = _weighted_phi(qs, p, p - qs) + _weighted_phi(1 - qs, 1 - p, qs - p)
    # q = 0: kl = -ln(1-p);  q = 1: kl = -ln p.
    return jnp.where(q <= 0, -log1p(-p), jnp.where(q >= 1, -jnp.log(p), general))


@jax.custom_jvp
def _kl_inverse(q: Array, c: Array) -> Array:
    dtype = q.dtype
    n_iter = jnp.finfo(dtype).nmant + 3
    one = jnp.ones_like(q)

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = binary_kl(q, mid) <= c
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    _, hi = jax.lax.fori_loop(0, n_iter, body, (q, one))

    # Newton polish from the right: g(p) = kl(q‖p) - c is convex and increasing on
    # [q, 1), so Newton steps from above the root stay above it (the bound stays an
    # upper bound) and converge quadratically.
    def newton(_, p):
        g = binary_kl(q, p) - c
        dg = (p - q) / (p * (1 - p))
        step = jnp.where((p < 1) & (dg > 0) & jnp.isfinite(g), g / dg, 0)
        return jnp.maximum(p - jnp.maximum(step, 0), q)

    p = jax.lax.fori_loop(0, 2, newton, hi)

    # Rounding can leave p an ulp or two below the root: step up ulp by ulp until
    # kl(q‖p) >= c, so that the result stays an upper bound to the last digit.
    def nudge(_, p):
        below = (binary_kl(q, p) < c) & (p < 1)
        return jnp.where(below, jnp.nextafter(p, one), p)

    return jax.lax.fori_loop(0, 4, nudge, p)


@_kl_inverse.defjvp
def _kl_inverse_jvp(primals, tangents):
    # Implicit function theorem on kl(q‖p) = c:  dp = (dc - ∂_q kl dq) / ∂_p kl.
    q, c = primals
    dq, dc = tangents
    p = _kl_inverse(q, c)
    interior = p < 1
    p_safe = jnp.where(interior, p, 0.5)
    dkl_dp = (p_safe - q) / (p_safe * (1 - p_safe))
    dkl_dq = jnp.log(q * (1 - p_safe)) - jnp.log(p_safe * (1 - q))
    dp = jnp.where(interior, (dc - dkl_dq * dq) / dkl_dp, 0)
    return p, dp


# Jitted once per shape: eager calls would otherwise re-trace the loops each time.
_kl_inverse_jit = jax.jit(_kl_inverse)


def kl_inverse(
    q: Float[ArrayLike, "*shape"], c: Float[ArrayLike, "*shape"]
) -> Float[Array, "*shape"]:
    r"""The upper kl-inverse $\mathrm{kl}^{-1}(q, c) = \sup\{p \in [q, 1] :
    \mathrm{kl}(q\,\|\,p) \le c\}$, elementwise with broadcasting.

    Computed inside `jit` by bisection to the dtype's precision and two Newton
    steps from above (so the result never falls below the true value), and
    differentiated by the implicit function theorem (no differentiation through
    the iterations).
    """
    q, c = jnp.broadcast_arrays(jnp.asarray(q), jnp.asarray(c))
    dtype = jnp.result_type(q.dtype, c.dtype, float)
    return _kl_inverse_jit(q.astype(dtype), c.astype(dtype))


def pac_bayes_bound(
    kl: Float[ArrayLike, "*shape"],
    n: Float[ArrayLike, "*shape"],
    delta: Float[ArrayLike, "*shape"],
    *,
    empirical_risk: Float[ArrayLike, "*shape"] = 0.0,
    kind: Literal["mcallester", "kl"] = "mcallester",
) -> Float[Array, "*shape"]:
    r"""A PAC-Bayesian upper bound on the true risk $R(Q)$ of a posterior $Q$.

    For a loss in $[0, 1]$, a prior $P$ chosen before seeing the sample and
    $N$ i.i.d. examples, with probability at least $1-\delta$, simultaneously for
    every posterior $Q$:

    - `kind="mcallester"` (McAllester 1999, in the form of Maurer 2004 with
      Pinsker's inequality):

        $$R(Q) \le \hat R(Q) + \sqrt{\frac{\mathrm{KL}(Q\|P) +
        \ln(2\sqrt N/\delta)}{2N}};$$

    - `kind="kl"` (Langford & Seeger 2001; Seeger 2002; Maurer 2004):

        $$\mathrm{kl}(\hat R(Q)\,\|\,R(Q)) \le \frac{\mathrm{KL}(Q\|P) +
        \ln(2\sqrt N/\delta)}{N},$$

        so $R(Q) \le \mathrm{kl}^{-1}(\hat R(Q), \cdot)$
        ([`jaxou.kl_inverse`][]); never looser than McAllester's.

    The complexity term is $O(\sqrt{\mathrm{KL}/N})$. A value $\ge 1$ is a
    vacuous bound (it is not clipped, so that gradients stay informative).

    **Arguments:** `kl` ($\ge 0$), `n` ($\ge 1$, real-valued for gradients),
    `delta` in $(0, 1)$, `empirical_risk` in $[0, 1]$; arrays broadcast. The
    result is differentiable in every argument.

    **Raises:** `ValueError` naming the argument for values out of range (at run
    time through `equinox.error_if` under `jit`), or an unknown `kind`.

    **References:** D. McAllester (1999), PAC-Bayesian model averaging, COLT;
    J. Langford & M. Seeger (2001), Bounds for averaging classifiers, CMU-CS-01-102;
    A. Maurer (2004), A note on the PAC Bayesian theorem, arXiv:cs/0411099.
    """
    if kind not in ("mcallester", "kl"):
        raise ValueError(f"pac_bayes_bound: unknown kind {kind!r}; use 'mcallester' or 'kl'")
    arrays = [jnp.asarray(x) for x in (kl, n, delta, empirical_risk)]
    dtype = jnp.result_type(*[a.dtype for a in arrays], float)
    try:
        kl, n, delta, risk = jnp.broadcast_arrays(*[a.astype(dtype) for a in arrays])
    except ValueError:
        shapes = {k: a.shape for k, a in zip(("kl", "n", "delta", "empirical_risk"), arrays)}
        raise ValueError(f"pac_bayes_bound: shapes do not broadcast: {shapes}") from None
    kl = check_range("kl", kl, 0, math.inf, False, True)
    n = check_range("n", n, 1, math.inf, False, True)
    delta = check_range("delta", delta, 0, 1, True, True)
    risk = check_range("empirical_risk", risk, 0, 1, False, False)
    budget = (kl + jnp.log(2 * jnp.sqrt(n) / delta)) / n
    if kind == "mcallester":
        return risk + jnp.sqrt(budget / 2)
    return _kl_inverse_jit(risk, budget)


def _law(x, name: str) -> Gaussian:
    if isinstance(x, Gaussian):
        return x
    if isinstance(x, (SGDStage, OUProcess)):
        return x.stationary()
    raise TypeError(
        f"{name} must be a jaxou.Gaussian, SGDStage or OUProcess, got {type(x).__name__}"
    )


def domain_discrepancy(source, target) -> KLDecomposition:
    r"""How far apart the source and target domains are, as the KL divergence
    between their stationary laws, split into its two parts:

    $$\mathrm{KL}(\pi_T\|\pi_S) = \underbrace{\tfrac12[\mathrm{tr}(\Sigma_S^{-1}
    \Sigma_T) - d - \ln\det(\Sigma_S^{-1}\Sigma_T)]}_{\text{covariance discrepancy}}
    + \underbrace{\tfrac12(\theta^*_T-\theta^*_S)^\top\Sigma_S^{-1}(\theta^*_T-
    \theta^*_S)}_{\text{shift of the minimum}}.$$

    **Arguments:** `source`, `target`: [`jaxou.Gaussian`][]s (the stationary laws),
    or [`jaxou.SGDStage`][]s / [`jaxou.OUProcess`][]es whose stationary laws are
    taken.

    **Returns:** a [`jaxou.KLDecomposition`][] `(total, covariance, shift)`.
    """
    return kl_parts(_law(target, "target"), _law(source, "source"))


class TwoStageBound(NamedTuple):
    r"""The two PAC-Bayes terms of the two-stage model (see [`jaxou.two_stage_bound`][]).

    - `pretrain_kl`: $\mathrm{KL}(\text{pretrained}\,\|\,\text{init})$, a
      [`jaxou.KLDecomposition`][] (total, covariance, shift).
    - `finetune_kl`: $\mathrm{KL}(\text{finetuned}\,\|\,\text{pretrained})$.
    - `pretrain_bound`, `finetune_bound`: the bounds on the source and target risks.
    - `pretrain_term`, `finetune_term`: the complexity terms, bound minus empirical
      risk.
    - `finetune_dominates`: whether the fine-tuning term is the larger one.
    """

    pretrain_kl: KLDecomposition  # KL(pretrained ‖ init)
    finetune_kl: KLDecomposition  # KL(finetuned ‖ pretrained)
    pretrain_bound: Array  # bound on the source risk
    finetune_bound: Array  # bound on the target risk
    pretrain_term: Array  # complexity term = bound - empirical risk
    finetune_term: Array
    finetune_dominates: Bool[Array, ""]


def two_stage_bound(
    model: TwoStage,
    n_source: Float[ArrayLike, ""],
    n_target: Float[ArrayLike, ""],
    delta: Float[ArrayLike, ""] = 0.05,
    *,
    empirical_risk_source: Float[ArrayLike, ""] = 0.0,
    empirical_risk_target: Float[ArrayLike, ""] = 0.0,
    kind: Literal["mcallester", "kl"] = "mcallester",
) -> TwoStageBound:
    r"""The PAC-Bayes bound of each stage of a [`jaxou.TwoStage`][] model.

    - Stage 1 (pre-training): posterior = the pre-trained law, prior = the
      initialisation law (chosen before the source sample), $N = N_S$.
    - Stage 2 (fine-tuning): posterior = the fine-tuned law, prior = the
      pre-trained law (it does not depend on the target sample), $N = N_T$.

    Each term is [`jaxou.pac_bayes_bound`][]'s complexity term; with $N_T \ll N_S$
    the fine-tuning term usually dominates. `finetune_dominates` computes it, it
    does not assume it. Differentiable in every argument and in the model.
    """
    if not isinstance(model, TwoStage):
        raise TypeError(
            f"two_stage_bound: model must be a jaxou.TwoStage, got {type(model).__name__}"
        )
    if kind not in ("mcallester", "kl"):
        raise ValueError(f"two_stage_bound: unknown kind {kind!r}; use 'mcallester' or 'kl'")
    dtype = model.pretrain.dtype
    scalars = {
        "n_source": n_source,
        "n_target": n_target,
        "delta": delta,
        "empirical_risk_source": empirical_risk_source,
        "empirical_risk_target": empirical_risk_target,
    }
    scalars = {k: jnp.asarray(v, dtype) for k, v in scalars.items()}
    # Eager range checks (clear ValueErrors) before entering the compiled program,
    # where the same checks run again through eqx.error_if for traced values.
    for name, lo, hi, lo_open, hi_open in (
        ("n_source", 1, math.inf, False, True),
        ("n_target", 1, math.inf, False, True),
        ("delta", 0, 1, True, True),
        ("empirical_risk_source", 0, 1, False, False),
        ("empirical_risk_target", 0, 1, False, False),
    ):
        check_range(name, scalars[name], lo, hi, lo_open, hi_open)
    if model.pretrain.is_dense and model.finetune.is_dense and model.init.is_dense:
        return _two_stage_bound(model, scalars, kind)
    # Operator stages: the laws are computed by solvers that choose their algorithm
    # from concrete values (and may run iterations in Python), so only the KL
    # divergences are compiled.
    pre, fine = model.laws()
    return _bounds_from_laws(model.init, pre, fine, scalars, kind)


@eqx.filter_jit
def _two_stage_bound(model, scalars, kind):
    pre, fine = model.laws()
    return _bounds_from_laws(model.init, pre, fine, scalars, kind)


def _bounds_from_laws(init, pre, fine, scalars, kind) -> TwoStageBound:
    kl1 = kl_parts(pre, init)
    kl2 = kl_parts(fine, pre)
    names = ("n_source", "n_target", "delta", "empirical_risk_source", "empirical_risk_target")
    return stage_bounds(kl1, kl2, *(scalars[n] for n in names), kind)


def stage_bounds(
    kl1: KLDecomposition,
    kl2: KLDecomposition,
    n_source,
    n_target,
    delta,
    empirical_risk_source,
    empirical_risk_target,
    kind: str,
) -> TwoStageBound:
    """The two stages' bounds and complexity terms from their KL divergences
    (shared by the dense, grid and structured two-stage bounds)."""
    b1 = pac_bayes_bound(
        kl1.total, n_source, delta, empirical_risk=empirical_risk_source, kind=kind
    )
    b2 = pac_bayes_bound(
        kl2.total, n_target, delta, empirical_risk=empirical_risk_target, kind=kind
    )
    t1 = b1 - jnp.asarray(empirical_risk_source, b1.dtype)
    t2 = b2 - jnp.asarray(empirical_risk_target, b2.dtype)
    return TwoStageBound(kl1, kl2, b1, b2, t1, t2, t2 > t1)
