"""Layer 6: the theory over grids of hyperparameters, in one compiled program.

[`evaluate`][jaxou.evaluate] computes, at every point of a grid of
hyperparameters (learning rate and batch size of each stage, $N_S$, $N_T$,
$\\delta$, the empirical risks, the target's shift and Hessian scale), the
stationary laws, the domain discrepancy and its two parts, each stage's KL and
its two parts, each stage's PAC-Bayes bound and complexity term, and their sum.
[`sensitivity`][jaxou.sensitivity] gives the derivative of every term with
respect to every hyperparameter, at every grid point.

The hyperparameters are traced arrays: a new grid of the same shape reuses the
compiled program.

## The fast ("eigen") path

Only scalars change across the grid, so every matrix factorisation that does not
depend on them is done once. With $H_S = V\\,\\mathrm{diag}(\\lambda)V^\\top$,
$H_T = c\\,W\\mathrm{diag}(\\mu)W^\\top$ ($c$ the Hessian scale, $W, \\mu$ from the
base model), $r_S = \\eta_S/B_S$ and $r_T = \\eta_T/B_T$:

- the pre-trained covariance is *affine* in $r_S$: $P = F_1 S_0 F_1^\\top +
  r_S K_1$ with $F_1 = e^{-H_S t_1}$ and $K_1 = V[(V^\\top C_S V)_{ij}
  (1-e^{-(\\lambda_i+\\lambda_j)t_1})/(\\lambda_i+\\lambda_j)]V^\\top$;
- in the basis $W$ the fine-tuned covariance is $Q = f P f + r_T\\,[\\tilde C_T
  \\circ g(c)]$ with $f = e^{-c\\mu t_2}$ and $g_{ij} = (1-e^{-c(\\mu_i+\\mu_j)
  t_2})/(c(\\mu_i+\\mu_j))$: elementwise, no eigendecomposition per point;
- the stationary laws are $r_S\\Sigma_S^{(1)}$ and $(r_T/c)\\Sigma_T^{(1)}$, so the
  domain discrepancy is a closed form in the generalised eigenvalues $e_i$ of
  $(\\Sigma_T^{(1)}, \\Sigma_S^{(1)})$: covariance part $\\frac12\\sum_i
  \\varphi(\\ln(\\rho e_i))$ with $\\rho = r_T/(c\\,r_S)$ and $\\varphi(u) =
  e^u-1-u$; shift part $\\frac{s^2}{2 r_S} u^\\top(\\Sigma_S^{(1)})^{-1}u$.

Per point this leaves two Cholesky factorisations and two triangular solves whose
right-hand sides are triangular (the KL terms, in the stable form of
[`jaxou.kl_parts`][]), written as batched matrix products (recursive blocking,
`jaxou._cholesky.matmul_cholesky`), so that a gradient costs a small multiple of
the forward evaluation. The "plain" path
rebuilds the [`jaxou.TwoStage`][] at every point and calls
[`jaxou.two_stage_bound`][] and [`jaxou.domain_discrepancy`][] (eigendecompositions
and Lyapunov solves per point, derivatives through the Lyapunov solve's own
adjoint); it is the reference the fast path is tested against.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from ._bounds import domain_discrepancy, stage_bounds, two_stage_bound
from ._cholesky import _lower_sym, matmul_cholesky, matmul_solve_lower_tri
from ._flow import flow_factor
from ._gaussian import Gaussian, KLDecomposition
from ._misc import check_range
from ._numerics import expm1mx
from ._operator import AbstractOperator
from ._sgd import TwoStage

__all__ = [
    "HYPERPARAMETERS",
    "TERMS",
    "Hyperparameters",
    "GridResult",
    "grid",
    "evaluate",
    "sensitivity",
]

# The hyperparameters, in a fixed order (the columns of the tables).
HYPERPARAMETERS = (
    "pretrain_lr",
    "pretrain_batch_size",
    "finetune_lr",
    "finetune_batch_size",
    "n_source",
    "n_target",
    "delta",
    "empirical_risk_source",
    "empirical_risk_target",
    "target_shift",
    "target_hessian_scale",
)

# The scalar terms of a GridResult, flattened (the other columns of the tables).
TERMS = (
    "source_trace",
    "target_trace",
    "discrepancy_total",
    "discrepancy_covariance",
    "discrepancy_shift",
    "pretrain_kl_total",
    "pretrain_kl_covariance",
    "pretrain_kl_shift",
    "finetune_kl_total",
    "finetune_kl_covariance",
    "finetune_kl_shift",
    "pretrain_bound",
    "finetune_bound",
    "pretrain_term",
    "finetune_term",
    "total_term",
)

# Valid ranges: (low, high, low_open, high_open), and why.
_RANGES = {
    "pretrain_lr": (0, math.inf, True, True),
    "pretrain_batch_size": (0, math.inf, True, True),
    "finetune_lr": (0, math.inf, True, True),
    "finetune_batch_size": (0, math.inf, True, True),
    "n_source": (1, math.inf, False, True),
    "n_target": (1, math.inf, False, True),
    "delta": (0, 1, True, True),
    "empirical_risk_source": (0, 1, False, False),
    "empirical_risk_target": (0, 1, False, False),
    "target_shift": (0, math.inf, False, True),
    "target_hessian_scale": (0, math.inf, True, True),
}


class Hyperparameters(eqx.Module):
    r"""Hyperparameters of the two-stage model, each an array (any shape; the
    given fields broadcast against each other to the grid's shape) or `None`
    for the default.

    - `pretrain_lr`, `pretrain_batch_size`: $\eta_S$, $B_S$ (default: the base
      model's pre-training stage).
    - `finetune_lr`, `finetune_batch_size`: $\eta_T$, $B_T$ (default: the base
      model's fine-tuning stage).
    - `n_source`, `n_target`: sample sizes $N_S$, $N_T \ge 1$ (no default: the
      model does not carry them).
    - `delta`: confidence $\delta \in (0, 1)$ (default 0.05).
    - `empirical_risk_source`, `empirical_risk_target`: $\hat R \in [0, 1]$
      (default 0).
    - `target_shift`: $\|\theta^*_T - \theta^*_S\|$, along the base model's
      direction of the shift ($e_1$ if the base model has none); default: the base
      model's norm.
    - `target_hessian_scale`: $c > 0$ with $H_T = c\,H_T^{\text{base}}$ (default 1).

    Build product grids with [`jaxou.grid`][].
    """

    pretrain_lr: Float[ArrayLike, "*grid"] | None = None
    pretrain_batch_size: Float[ArrayLike, "*grid"] | None = None
    finetune_lr: Float[ArrayLike, "*grid"] | None = None
    finetune_batch_size: Float[ArrayLike, "*grid"] | None = None
    n_source: Float[ArrayLike, "*grid"] | None = None
    n_target: Float[ArrayLike, "*grid"] | None = None
    delta: Float[ArrayLike, "*grid"] | None = None
    empirical_risk_source: Float[ArrayLike, "*grid"] | None = None
    empirical_risk_target: Float[ArrayLike, "*grid"] | None = None
    target_shift: Float[ArrayLike, "*grid"] | None = None
    target_hessian_scale: Float[ArrayLike, "*grid"] | None = None

    def given(self) -> dict[str, Any]:
        """The fields that are set, by name."""
        return {k: getattr(self, k) for k in HYPERPARAMETERS if getattr(self, k) is not None}


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, HYPERPARAMETERS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(
        f"unknown hyperparameter {name!r}{hint}; valid names: {', '.join(HYPERPARAMETERS)}"
    )


def grid(**axes: Float[ArrayLike, " n"]) -> Hyperparameters:
    """The Cartesian product of 1-D axes, as [`jaxou.Hyperparameters`][] whose
    fields have the shape `(len(axis_1), len(axis_2), ...)` in the order the axes
    are given (`indexing="ij"`).

    `jaxou.grid(finetune_lr=[1e-3, 1e-2], n_target=[100, 1000, 10000])` has shape
    `(2, 3)`.

    **Raises:** `ValueError` for an unknown name or an axis that is not 1-D and
    non-empty.
    """
    for name in axes:
        if name not in HYPERPARAMETERS:
            raise _unknown(name)
    arrays = []
    for name, values in axes.items():
        a = np.asarray(values) if not isinstance(values, jax.Array) else values
        if a.ndim != 1 or a.shape[0] == 0:
            raise ValueError(
                f"grid: axis {name} must be a non-empty 1-D array, got shape {a.shape}"
            )
        arrays.append(a)
    mesh = jnp.meshgrid(*[jnp.asarray(a) for a in arrays], indexing="ij")
    return Hyperparameters(**dict(zip(axes, mesh)))


def _check_values(name: str, x: Array) -> Array:
    return check_range(f"Hyperparameters.{name}", x, *_RANGES[name])


def _shift_direction(model: TwoStage) -> tuple[Array, Array]:
    v = model.finetune.minimum - model.pretrain.minimum
    norm = jnp.linalg.norm(v)
    e1 = jnp.zeros_like(v).at[0].set(1)
    u = jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1), e1)
    return u, norm


def _resolve(model: TwoStage, hyper: Hyperparameters) -> tuple[dict[str, Array], tuple]:
    """Every hyperparameter as an array of the grid's shape, in the model's dtype,
    defaults filled in and values checked."""
    if not isinstance(model, TwoStage):
        raise TypeError(f"model must be a jaxou.TwoStage, got {type(model).__name__}")
    if not isinstance(hyper, Hyperparameters):
        raise TypeError(
            f"hyper must be a jaxou.Hyperparameters (see jaxou.grid), got {type(hyper).__name__}"
        )
    dtype = model.pretrain.hessian.dtype
    given = {}
    for name, x in hyper.given().items():
        try:
            given[name] = jnp.asarray(x, dtype)
        except (TypeError, ValueError) as err:
            raise TypeError(f"Hyperparameters.{name}: not a numeric array ({err})") from None
    try:
        shape = jnp.broadcast_shapes(*[x.shape for x in given.values()]) if given else ()
    except ValueError:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in given.items())
        raise ValueError(
            f"Hyperparameters: the grids have incompatible shapes ({shapes}); they must "
            "broadcast against each other (use jaxou.grid for a Cartesian product)"
        ) from None
    for name in ("n_source", "n_target"):
        if name not in given:
            raise ValueError(
                f"Hyperparameters.{name} is required (the model does not carry sample sizes)"
            )
    _, base_shift = _shift_direction(model)
    defaults = {
        "pretrain_lr": model.pretrain.lr,
        "pretrain_batch_size": model.pretrain.batch_size,
        "finetune_lr": model.finetune.lr,
        "finetune_batch_size": model.finetune.batch_size,
        "delta": 0.05,
        "empirical_risk_source": 0.0,
        "empirical_risk_target": 0.0,
        "target_shift": base_shift,
        "target_hessian_scale": 1.0,
    }
    out = {}
    for name in HYPERPARAMETERS:
        x = given[name] if name in given else jnp.asarray(defaults[name], dtype)
        out[name] = jnp.broadcast_to(_check_values(name, x), shape)
    return out, tuple(shape)


# ---------------------------------------------------------------------------
# The fast path: everything that does not depend on the scalars, once.


class _Base(NamedTuple):
    A1: Array  # F1 S0 F1ᵀ in the basis W
    K1: Array  # Σ_{t1} per unit r_S, basis W
    Ct: Array  # C_T in the basis W
    mu: Array  # eigenvalues of the base H_T
    L0: Array  # Cholesky factor of S0 in the basis W
    shift1: Array  # ½ |L0⁻¹ (m1 - m0)|² (the pre-training shift part; no scalar moves it)
    a: Array  # Wᵀ (θ*_S - m1)
    u: Array  # Wᵀ u, u the unit direction of the shift
    log_e: Array  # ln of the generalised eigenvalues of (Σ_T1, Σ_S1)
    q_u: Array  # uᵀ Σ_S1⁻¹ u
    tr_S1: Array
    tr_T1: Array
    t2: Array
    W: Array
    S1: Array  # stationary covariances per unit r (original basis), for `laws=True`
    T1: Array
    theta_S: Array
    m1: Array
    u_orig: Array


def _scaled_flow(lam: Array, t: Array) -> tuple[Array, Array]:
    """e^{-λt} and (1 - e^{-(λ_i+λ_j)t})/(λ_i+λ_j), both right for t = inf."""
    inf = jnp.isinf(t)
    f = jnp.where(inf, 0, jnp.exp(-lam * jnp.where(inf, 0, t)))
    return f, flow_factor(lam[:, None] + lam[None, :], t)


def _precompute(model: TwoStage) -> _Base:
    pre, fine = model.pretrain, model.finetune
    lam, V = jnp.linalg.eigh(0.5 * (pre.hessian + pre.hessian.T))
    mu, W = jnp.linalg.eigh(0.5 * (fine.hessian + fine.hessian.T))
    lam = eqx.error_if(lam, lam[0] <= 0, "pretrain.hessian is not positive definite")
    mu = eqx.error_if(mu, mu[0] <= 0, "finetune.hessian is not positive definite")
    Cs = V.T @ pre.noise_cov @ V
    f1, g1 = _scaled_flow(lam, model.t_pretrain)
    K1 = V @ (Cs * g1) @ V.T
    F1 = (V * f1) @ V.T
    S0, m0 = model.init.cov, model.init.mean
    A1 = F1 @ S0 @ F1.T
    m1 = pre.minimum + F1 @ (m0 - pre.minimum)
    sym = lambda M: 0.5 * (M + M.T)
    to_w = lambda M: sym(W.T @ M @ W)
    L0 = jnp.linalg.cholesky(to_w(S0))
    z1 = jax.scipy.linalg.solve_triangular(L0, W.T @ (m1 - m0), lower=True)
    u, _ = _shift_direction(model)
    S1 = sym(V @ (Cs / (lam[:, None] + lam[None, :])) @ V.T)
    Ct = to_w(fine.noise_cov)
    T1 = sym(W @ (Ct / (mu[:, None] + mu[None, :])) @ W.T)
    LS = jnp.linalg.cholesky(S1)
    X = jax.scipy.linalg.solve_triangular(LS, T1, lower=True)
    X = jax.scipy.linalg.solve_triangular(LS, X.T, lower=True)
    e = jnp.linalg.eigvalsh(sym(X))
    zu = jax.scipy.linalg.solve_triangular(LS, u, lower=True)
    return _Base(
        A1=to_w(A1),
        K1=to_w(K1),
        Ct=Ct,
        mu=mu,
        L0=L0,
        shift1=0.5 * jnp.sum(z1**2),
        a=W.T @ (pre.minimum - m1),
        u=W.T @ u,
        log_e=jnp.log(e),
        q_u=jnp.sum(zu**2),
        tr_S1=jnp.trace(S1),
        tr_T1=jnp.trace(T1),
        t2=jnp.asarray(model.t_finetune),
        W=W,
        S1=S1,
        T1=T1,
        theta_S=pre.minimum,
        m1=m1,
        u_orig=u,
    )


# Per grid point, the factorisations are `jaxou._cholesky`'s matrix-product
# (recursively blocked) Cholesky and triangular solve rather than LAPACK: vmapped
# over a grid they become batched matrix products, reverse mode through them costs
# a small multiple of the forward pass, and they avoid jaxlib 0.10's batched
# LAPACK custom calls on CPU, which deadlocked intermittently on this 2-core
# machine when several ran concurrently (seen with d = 64, 2000 points).
_cholesky = matmul_cholesky


def _kl_from_chol(Lp: Array, Lq: Array, diff: Array) -> tuple[Array, Array]:
    """Covariance and shift parts of KL(N(·, Lp Lpᵀ) ‖ N(·, Lq Lqᵀ)), as in
    `jaxou.kl_parts` (a sum of non-negative terms: no cancellation). M = Lq⁻¹ Lp is
    lower triangular with diagonal Lp_ii / Lq_ii."""
    M, z = matmul_solve_lower_tri(Lq, Lp, diff[:, None])
    return _cov_part(M), 0.5 * jnp.sum(z**2)


def _tri_inverse(L: Array) -> Array:
    n = L.shape[-1]
    inv, _ = matmul_solve_lower_tri(L, jnp.eye(n, dtype=L.dtype), jnp.zeros((n, 0), L.dtype))
    return inv


# The two stages' KL terms from the two laws' covariances P (pre-trained) and Q
# (fine-tuned), with their own derivative. Differentiating through the
# factorisations (even with their own rules) made a gradient cost 3× the
# forward pass; the derivative of a Gaussian KL is a closed form in the inverse
# covariances,
#     ∂cov(Q‖P)/∂P = ½(P⁻¹ − P⁻¹QP⁻¹),  ∂cov(Q‖P)/∂Q = ½(P⁻¹ − Q⁻¹),
#     ∂shift(Q‖P)/∂P = −½ wwᵀ,  ∂shift/∂δ = w = P⁻¹δ,
#     ∂cov(P‖S₀)/∂P = ½(S₀⁻¹ − P⁻¹),  ∂cov(P‖S₀)/∂L₀ = tril(L₀⁻ᵀ(I − M₀M₀ᵀ)),
# with M₀ = L₀⁻¹L_p. Written as a JVP whose tangent is a few inner products with
# matrices that do not depend on the tangent, it serves both modes: reverse mode
# transposes the inner products, and forward mode with many tangents computes
# the matrices once. The matrices come from the triangular inverses (matrix
# products are the fast operation here); the factorisations have their own
# derivatives, so the rule can be differentiated again. The grid path uses the
# same matrices one level up, in `_point_kl`.
@jax.custom_jvp
def _kl_terms(P: Array, Q: Array, diff: Array, L0: Array) -> tuple[Array, Array, Array]:
    """`(cov(P ‖ L₀L₀ᵀ), cov(Q ‖ P), shift(Q ‖ P))` with mean difference `diff`."""
    Lp, Lq = _cholesky(P), _cholesky(Q)
    cov2, shift2 = _kl_from_chol(Lq, Lp, diff)
    # L₀ is the same at every point (unbatched under `vmap`): its inverse is
    # computed once, and L₀⁻¹L_p is a matrix product rather than a solve per point.
    cov1 = _cov_part(jnp.tril(_tri_inverse(L0) @ Lp))
    return cov1, cov2, shift2


def _cov_part(M: Array) -> Array:
    """The covariance part of a KL from M = L_q⁻¹ L_p (lower triangular)."""
    return 0.5 * (jnp.sum(expm1mx(2 * jnp.log(jnp.diagonal(M)))) + jnp.sum(jnp.tril(M, -1) ** 2))


def _kl_coefficients(P: Array, Q: Array, diff: Array, L0: Array):
    """The three KL terms and the matrices of their derivative (see above):
    `(terms, (G1, G2, H2, w))` with d cov₁ = ⟨G1, dP⟩, d cov₂ = ⟨G2, dP⟩ + ⟨H2, dQ⟩,
    d shift₂ = −½ wᵀ dP w + wᵀ dδ (dP, dQ symmetric), and the L₀ factors."""
    Lp, Lq = _cholesky(P), _cholesky(Q)
    Ip, Iq, I0 = _tri_inverse(Lp), _tri_inverse(Lq), _tri_inverse(L0)
    M, M0, z = jnp.tril(Ip @ Lq), jnp.tril(I0 @ Lp), Ip @ diff
    terms = (_cov_part(M0), _cov_part(M), 0.5 * jnp.sum(z**2))
    tn = lambda X, Y: jnp.einsum("ki,kj->ij", X, Y)  # Xᵀ Y
    P_inv = tn(Ip, Ip)
    B = tn(Ip, M)  # P⁻¹ L_q, so B Bᵀ = P⁻¹ Q P⁻¹
    G1 = 0.5 * (tn(I0, I0) - P_inv)
    G2 = 0.5 * (P_inv - B @ B.T)
    H2 = 0.5 * (P_inv - tn(Iq, Iq))
    return terms, (G1, G2, H2, Ip.T @ z), (I0, M0)


def _kl_terms_jvp(primals, tangents):
    P, Q, diff, L0 = primals
    dP, dQ, ddiff, dL0 = tangents
    zero = jax.custom_derivatives.SymbolicZero
    terms, (G1, G2, H2, w), (I0, M0) = _kl_coefficients(P, Q, diff, L0)
    d1 = d2 = ds = jnp.zeros_like(terms[0])
    if not isinstance(dP, zero):
        sym = _lower_sym(dP)  # what a function reading the lower triangle sees
        d1 = d1 + jnp.sum(G1 * sym)
        d2 = d2 + jnp.sum(G2 * sym)
        ds = ds - 0.5 * w @ sym @ w
    if not isinstance(dQ, zero):
        d2 = d2 + jnp.sum(H2 * _lower_sym(dQ))
    if not isinstance(ddiff, zero):
        ds = ds + w @ ddiff
    if not isinstance(dL0, zero):
        eye = jnp.eye(P.shape[-1], dtype=P.dtype)
        d1 = d1 + jnp.sum(jnp.tril(I0.T @ (eye - M0 @ M0.T)) * dL0)
    return terms, (d1, d2, ds)


_kl_terms.defjvp(_kl_terms_jvp, symbolic_zeros=True)


def _point_laws(base: _Base, x: Array) -> tuple[Array, Array, Array]:
    """P, Q (the pre-trained and fine-tuned covariances, basis W) and the mean
    difference δ₂ at the point x = (r_S, r_T, c, shift)."""
    r_s, r_t, c, shift = x[0], x[1], x[2], x[3]
    P = base.A1 + r_s * base.K1
    f2, g2 = _scaled_flow(c * base.mu, base.t2)
    Q = f2[:, None] * P * f2[None, :] + r_t * base.Ct * g2
    return P, Q, _one_minus_flow(base, c) * (base.a + shift * base.u)


def _one_minus_flow(base: _Base, c: Array) -> Array:
    """1 − e^{−cμt₂} without cancellation (1 for t₂ = ∞)."""
    inf = jnp.isinf(base.t2)
    return jnp.where(inf, 1, -jnp.expm1(-c * base.mu * jnp.where(inf, 0, base.t2)))


# The KL terms as functions of the four scalars of a grid point. Differentiating
# through P, Q and δ₂ (d × d per point) cost more in reverse mode than the KL's
# own derivative: every scalar's cotangent is a reduction over d × d arrays,
# pass after pass over memory. Here the rule computes the 3 × 4 Jacobian in the
# forward pass (the closed-form derivatives of P, Q and δ₂ in the four scalars,
# contracted with the KL's derivative matrices as they are formed), and both
# modes then only multiply by it. With a tangent in the model's arrays
# (differentiating with respect to the model), the rule differentiates the
# composition instead.
def _point_kl_value(x: Array, base: _Base) -> tuple[Array, Array, Array]:
    P, Q, diff = _point_laws(base, x)
    return _kl_terms(P, Q, diff, base.L0)


_point_kl = jax.custom_jvp(_point_kl_value)


def _point_kl_jvp(primals, tangents):
    x, base = primals
    dx, dbase = tangents
    zero = jax.custom_derivatives.SymbolicZero
    is_zero = lambda t: isinstance(t, zero)
    if not all(is_zero(t) for t in jax.tree.leaves(dbase, is_leaf=is_zero)):
        instantiate = lambda t, p: jnp.zeros_like(p) if isinstance(t, zero) else t
        dx = instantiate(dx, x)
        dbase = jax.tree.map(instantiate, dbase, base, is_leaf=is_zero)
        return jax.jvp(_point_kl_value, (x, base), (dx, dbase))
    if is_zero(dx):
        terms = _point_kl_value(x, base)
        return terms, tuple(jnp.zeros_like(t) for t in terms)
    # The derivatives of P, Q and δ₂ in the four scalars, contracted with the KL's
    # derivative matrices as they are formed (no d × d × 4 array: those passes
    # over memory were the cost). P = A₁ + r_S K₁; Q = F P F + r_T C_T∘g(c);
    # δ₂ = (1 − f(c))∘(a + shift·u); f' and g' are dF/dc and dg/dc.
    r_t, c, shift = x[1], x[2], x[3]
    P, Q, diff = _point_laws(base, x)
    terms, (G1, G2, H2, w), _ = _kl_coefficients(P, Q, diff, base.L0)
    (f, g), (df, dg) = jax.jvp(
        lambda c: _scaled_flow(c * base.mu, base.t2), (c,), (jnp.ones_like(c),)
    )
    v = base.a + shift * base.u
    dQ_dc = (df[:, None] * f[None, :] + f[:, None] * df[None, :]) * P + r_t * base.Ct * dg
    J = jnp.stack(
        [
            jnp.stack([jnp.sum(G1 * base.K1), 0 * c, 0 * c, 0 * c]),
            jnp.stack(
                [
                    jnp.sum(G2 * base.K1 + H2 * (f[:, None] * base.K1 * f[None, :])),
                    jnp.sum(H2 * base.Ct * g),
                    jnp.sum(H2 * dQ_dc),
                    0 * c,
                ]
            ),
            jnp.stack(
                [
                    -0.5 * w @ base.K1 @ w,
                    0 * c,
                    -(w * df) @ v,
                    w @ (_one_minus_flow(base, c) * base.u),
                ]
            ),
        ]
    )
    dterms = J @ dx
    return terms, (dterms[0], dterms[1], dterms[2])


_point_kl.defjvp(_point_kl_jvp, symbolic_zeros=True)


def _point_eigen(base: _Base, h: dict[str, Array], laws: bool) -> dict:
    r_s = h["pretrain_lr"] / h["pretrain_batch_size"]
    r_t = h["finetune_lr"] / h["finetune_batch_size"]
    c = h["target_hessian_scale"]
    shift = h["target_shift"]
    x = jnp.stack([r_s, r_t, c, shift])
    cov1, cov2, shift2 = _point_kl(x, base)
    shift1 = base.shift1
    log_rho = jnp.log(r_t) - jnp.log(c) - jnp.log(r_s)
    dcov = 0.5 * jnp.sum(expm1mx(log_rho + base.log_e))
    dshift = 0.5 * shift**2 * base.q_u / r_s
    kl1, kl2 = cov1 + shift1, cov2 + shift2
    out = {
        "source_trace": r_s * base.tr_S1,
        "target_trace": (r_t / c) * base.tr_T1,
        "discrepancy": KLDecomposition(dcov + dshift, dcov, dshift),
        "pretrain_kl": KLDecomposition(kl1, cov1, shift1 + jnp.zeros_like(cov1)),
        "finetune_kl": KLDecomposition(kl2, cov2, shift2),
    }
    if laws:
        P, Q, diff2 = _point_laws(base, x)
        theta_t = base.theta_S + shift * base.u_orig
        m2 = base.m1 + base.W @ diff2
        back = lambda M: base.W @ M @ base.W.T
        out["laws"] = {
            "source": Gaussian(base.theta_S, r_s * base.S1),
            "target": Gaussian(theta_t, (r_t / c) * base.T1),
            "pretrained": Gaussian(base.m1, back(P)),
            "finetuned": Gaussian(m2, back(Q)),
        }
    return out


# ---------------------------------------------------------------------------
# The plain path: rebuild the model at every point (the reference).


def _model_at(model: TwoStage, h: dict[str, Array]) -> TwoStage:
    u, _ = _shift_direction(model)
    pre_min = model.pretrain.minimum
    return eqx.tree_at(
        lambda m: (
            m.pretrain.lr,
            m.pretrain.batch_size,
            m.finetune.lr,
            m.finetune.batch_size,
            m.finetune.hessian,
            m.finetune.minimum,
        ),
        model,
        (
            h["pretrain_lr"],
            h["pretrain_batch_size"],
            h["finetune_lr"],
            h["finetune_batch_size"],
            _scaled(model.finetune.hessian, h["target_hessian_scale"]),
            pre_min + h["target_shift"] * u,
        ),
    )


def _scaled(M, c):
    return M.scale(c) if isinstance(M, AbstractOperator) else c * M


def _trace(law: Gaussian) -> Array:
    return law.cov.trace() if isinstance(law.cov, AbstractOperator) else jnp.trace(law.cov)


def _is_dense(model: TwoStage) -> bool:
    return model.pretrain.is_dense and model.finetune.is_dense and model.init.is_dense


def _point_plain(model: TwoStage, h: dict[str, Array], laws: bool) -> dict:
    # The bounds of `two_stage_bound` need sample sizes; only its KL terms are used
    # here (the bounds are computed from them by `_with_bounds`, for both paths).
    m = _model_at(model, h)
    b = two_stage_bound(m, 1.0, 1.0, 0.5)
    src, tgt = m.pretrain.stationary(), m.finetune.stationary()
    out = {
        "source_trace": _trace(src),
        "target_trace": _trace(tgt),
        "discrepancy": domain_discrepancy(src, tgt),
        "pretrain_kl": b.pretrain_kl,
        "finetune_kl": b.finetune_kl,
    }
    if laws:
        pre, fin = m.laws()
        out["laws"] = {"source": src, "target": tgt, "pretrained": pre, "finetuned": fin}
    return out


# ---------------------------------------------------------------------------
# The compiled entry points. The KL terms depend on four numbers only (η_S/B_S,
# η_T/B_T, the Hessian scale and the shift); the bounds add N, δ and R̂. So the
# laws are computed once per distinct quadruple and the bounds at every point.

_LAW_KEYS = (
    "pretrain_lr",
    "pretrain_batch_size",
    "finetune_lr",
    "finetune_batch_size",
    "target_hessian_scale",
    "target_shift",
)


def _point_fn(model, method, laws):
    if method == "eigen":
        base = _precompute(model)
        return lambda h: _point_eigen(base, h, laws)
    return lambda h: _point_plain(model, h, laws)


def _with_bounds(out: dict, h: dict[str, Array], kind: str) -> dict:
    b = stage_bounds(
        out["pretrain_kl"],
        out["finetune_kl"],
        h["n_source"],
        h["n_target"],
        h["delta"],
        h["empirical_risk_source"],
        h["empirical_risk_target"],
        kind,
    )
    return {
        **out,
        "pretrain_bound": b.pretrain_bound,
        "finetune_bound": b.finetune_bound,
        "pretrain_term": b.pretrain_term,
        "finetune_term": b.finetune_term,
    }


def _map(fn, flat, batch_size):
    n = next(iter(flat.values())).shape[0]
    if batch_size is None or batch_size >= n:
        return jax.vmap(fn)(flat)
    return lax.map(fn, flat, batch_size=batch_size)


@eqx.filter_jit
def _evaluate_flat(model, law_params, flat, inverse, kind, method, laws, batch_size):
    out = _map(_point_fn(model, method, laws), law_params, batch_size)
    out = jax.tree.map(lambda x: x[inverse], out)
    return jax.vmap(lambda o, h: _with_bounds(o, h, kind))(out, flat)


def _scalars(out: dict) -> dict[str, Array]:
    """The flat scalar terms of one point's output, by TERMS name."""
    flat = {"source_trace": out["source_trace"], "target_trace": out["target_trace"]}
    for group in ("discrepancy", "pretrain_kl", "finetune_kl"):
        for n, v in zip(("total", "covariance", "shift"), out[group]):
            flat[f"{group}_{n}"] = v
    for n in ("pretrain_bound", "finetune_bound", "pretrain_term", "finetune_term"):
        flat[n] = out[n]
    flat["total_term"] = out["pretrain_term"] + out["finetune_term"]
    return flat


def _point_sensitivity(model, kind, method, wrt, terms):
    """The forward-mode Jacobian of the chosen terms at one point."""
    point = _point_fn(model, method, False)

    def one(h):
        def f(x):
            hh = dict(h)
            hh.update(x)
            s = _scalars(_with_bounds(point(hh), hh, kind))
            return {t: s[t] for t in terms}

        return jax.jacfwd(f)({k: h[k] for k in wrt})

    return one


@eqx.filter_jit
def _sensitivity_flat(model, flat, kind, method, wrt, terms, batch_size):
    return _map(_point_sensitivity(model, kind, method, wrt, terms), flat, batch_size)


def _dedupe(h: dict[str, Array], n: int, dedupe: bool):
    """The distinct law quadruples, padded to a power of two (so that grids of one
    shape share a compiled program), and the index of each point's quadruple."""
    if not dedupe or any(isinstance(h[k], jax.core.Tracer) for k in _LAW_KEYS):
        return {k: h[k] for k in _LAW_KEYS}, jnp.arange(n)
    cols = {k: np.asarray(h[k]) for k in _LAW_KEYS}
    key = np.stack(
        [
            cols["pretrain_lr"] / cols["pretrain_batch_size"],
            cols["finetune_lr"] / cols["finetune_batch_size"],
            cols["target_hessian_scale"],
            cols["target_shift"],
        ],
        axis=1,
    )
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    size = min(n, 1 << max(0, int(len(first) - 1).bit_length()))
    first = np.concatenate([first, np.full(size - len(first), first[0])])
    return {k: jnp.asarray(cols[k][first]) for k in _LAW_KEYS}, jnp.asarray(inverse.ravel())


def _auto_batch(d: int, n: int, method: str, budget_bytes: float = 2**28) -> int | None:
    if method == "plain":
        # One point at a time: the plain path calls LAPACK (eigh, Cholesky) per
        # point, and jaxlib's *batched* LAPACK kernels on CPU can deadlock XLA's
        # thread pool when two run at once (seen with gdb: two batched `syevd`
        # calls in ParallelBatchMap, both waiting, in benchmarks/sweep.py's
        # 40-point plain evaluation).
        return None if n <= 1 else 1
    # About 24 d × d temporaries per point (forward and derivative together).
    per_point = 24 * d * d * 8
    size = max(1, int(budget_bytes // per_point))
    return None if size >= n else size


class GridResult(NamedTuple):
    """Every term of the theory at every grid point; each array has the grid's
    shape. `discrepancy`, `pretrain_kl` and `finetune_kl` are
    [`jaxou.KLDecomposition`][]s `(total, covariance, shift)`.

    - `hyper`: the hyperparameters, every field filled in and broadcast.
    - `source_trace`, `target_trace`: $\\mathrm{tr}\\,\\Sigma_\\infty$ of the stationary
      laws $\\pi_S$, $\\pi_T$ (the laws themselves with `laws=True`).
    - `discrepancy`: KL$(\\pi_T\\|\\pi_S)$ ([`jaxou.domain_discrepancy`][]).
    - `pretrain_kl`, `finetune_kl`: KL(pretrained ‖ init), KL(finetuned ‖ pretrained).
    - `pretrain_bound`, `finetune_bound`, `pretrain_term`, `finetune_term`: as in
      [`jaxou.two_stage_bound`][]; `total_term` is the sum of the two terms.
    - `finetune_dominates`: `finetune_term > pretrain_term`.
    - `laws`: `None`, or (with `laws=True`) a dict of batched [`jaxou.Gaussian`][]s
      `source`, `target` (stationary), `pretrained`, `finetuned`.
    """

    hyper: Hyperparameters
    source_trace: Array
    target_trace: Array
    discrepancy: KLDecomposition
    pretrain_kl: KLDecomposition
    finetune_kl: KLDecomposition
    pretrain_bound: Array
    finetune_bound: Array
    pretrain_term: Array
    finetune_term: Array
    total_term: Array
    finetune_dominates: Bool[Array, "*grid"]
    laws: dict[str, Gaussian] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.total_term.shape)

    def columns(self) -> dict[str, np.ndarray]:
        """Flat NumPy columns (hyperparameters, then every term in `TERMS` order,
        then `finetune_dominates`), one row per grid point (C order)."""
        cols = {k: np.asarray(getattr(self.hyper, k)).ravel() for k in HYPERPARAMETERS}
        scal = _scalars(self._asdict())
        for t in TERMS:
            cols[t] = np.asarray(scal[t]).ravel()
        cols["finetune_dominates"] = np.asarray(self.finetune_dominates).ravel()
        return cols


def _prepare(who: str, model, hyper, kind: str, method: str):
    """Validate the options shared by `evaluate` and `sensitivity`, resolve the
    hyperparameters against the model and flatten the grid:
    `(fields, grid shape, number of points, flat fields)`."""
    if kind not in ("mcallester", "kl"):
        raise ValueError(f"{who}: unknown kind {kind!r}; use 'mcallester' or 'kl'")
    if method not in ("eigen", "plain"):
        raise ValueError(f"{who}: unknown method {method!r}; use 'auto', 'eigen' or 'plain'")
    h, shape = _resolve(model, hyper)
    if method == "eigen" and not _is_dense(model):
        raise ValueError(
            f"{who}: method='eigen' needs dense matrices; a model with operator stages "
            "uses method='plain'"
        )
    n = int(np.prod(shape)) if shape else 1
    return h, shape, n, {k: v.reshape(n) for k, v in h.items()}


def _eager_map(fn, flat: dict[str, Array]) -> dict:
    """`fn` at each point, one after the other, outside `jit`: for operator models,
    whose solvers choose their algorithm (and iterate) from concrete values."""
    n = next(iter(flat.values())).shape[0]
    outs = [fn({k: v[i] for k, v in flat.items()}) for i in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def evaluate(
    model: TwoStage,
    hyper: Hyperparameters,
    *,
    kind: Literal["mcallester", "kl"] = "mcallester",
    method: Literal["auto", "eigen", "plain"] = "auto",
    laws: bool = False,
    batch_size: int | None | Literal["auto"] = "auto",
    dedupe: bool = True,
) -> GridResult:
    r"""Every term of the two-stage theory over a grid of hyperparameters, in one
    jit-compiled, vmapped program.

    **Arguments:**

    - `model`: the base [`jaxou.TwoStage`][] (Hessians, noise covariances, minima,
      initial law, durations; its learning rates and batch sizes are the defaults).
    - `hyper`: a [`jaxou.Hyperparameters`][] (see [`jaxou.grid`][]); its fields
      broadcast to the grid's shape.
    - `kind`: the PAC-Bayes bound, `"mcallester"` or `"kl"` (see
      [`jaxou.pac_bayes_bound`][]).
    - `method`: `"eigen"` (one eigendecomposition of each Hessian for the
      whole grid, then closed forms in the scalars lr/B, the Hessian scale and the
      shift, evaluated in that eigenbasis; dense models only) or
      `"plain"` (rebuild the model and call [`jaxou.two_stage_bound`][] at each
      point; the reference, and the path of models with operator stages, whose
      points are evaluated one after the other outside `jit`); `"auto"` (default)
      chooses `"eigen"` for dense models and `"plain"` otherwise.
    - `laws`: also return the four laws at every point (memory: grid × d²).
    - `batch_size`: points evaluated at once (`lax.map` over batches of `vmap`);
      `"auto"` picks one that keeps the temporaries near 256 MB (one point at a
      time for `method="plain"`, whose per-point LAPACK calls must not be
      batched: see `_auto_batch`); `None`: all.
    - `dedupe`: the KL terms depend only on $(\eta_S/B_S, \eta_T/B_T, c, s)$;
      with concrete inputs, compute them once per distinct quadruple (padded to
      a power of two, so grids of one shape share one compiled program) and the
      bounds at every point. `False`: every point computes everything.

    **Returns:** a [`jaxou.GridResult`][] whose arrays have the grid's shape.

    **Raises:** `ValueError` naming the field for grids of incompatible shapes or
    values out of range ($\delta \notin (0,1)$, $N < 1$, $\hat R \notin [0,1]$,
    non-positive learning rate, batch size or Hessian scale, negative shift);
    `TypeError` for a wrong model or hyperparameter type.
    """
    if method == "auto":
        method = "eigen" if _is_dense(model) else "plain"
    h, shape, n, flat = _prepare("evaluate", model, hyper, kind, method)
    law_params, inverse = _dedupe(flat, n, dedupe)
    if not _is_dense(model):
        out = _eager_map(lambda p: _point_plain(model, p, laws), law_params)
        out = jax.tree.map(lambda x: x[inverse], out)
        out = jax.vmap(lambda o, p: _with_bounds(o, p, kind))(out, flat)
    else:
        if batch_size == "auto":
            batch_size = _auto_batch(model.dim, law_params["pretrain_lr"].shape[0], method)
        out = _evaluate_flat(model, law_params, flat, inverse, kind, method, laws, batch_size)
    out = jax.tree.map(lambda x: x.reshape(shape + x.shape[1:]), out)
    return GridResult(
        hyper=Hyperparameters(**h),
        source_trace=out["source_trace"],
        target_trace=out["target_trace"],
        discrepancy=out["discrepancy"],
        pretrain_kl=out["pretrain_kl"],
        finetune_kl=out["finetune_kl"],
        pretrain_bound=out["pretrain_bound"],
        finetune_bound=out["finetune_bound"],
        pretrain_term=out["pretrain_term"],
        finetune_term=out["finetune_term"],
        total_term=out["pretrain_term"] + out["finetune_term"],
        finetune_dominates=out["finetune_term"] > out["pretrain_term"],
        laws=out.get("laws"),
    )


def sensitivity(
    model: TwoStage,
    hyper: Hyperparameters,
    *,
    terms: tuple[str, ...] | None = None,
    wrt: tuple[str, ...] | None = None,
    kind: Literal["mcallester", "kl"] = "mcallester",
    method: Literal["auto", "eigen", "plain"] = "auto",
    batch_size: int | None | Literal["auto"] = "auto",
) -> dict[str, dict[str, Float[Array, "*grid"]]]:
    r"""Derivatives of every term with respect to every hyperparameter, at every
    grid point: `result[term][name]` $= \partial\,\text{term}/\partial\,\text{name}$,
    an array of the grid's shape.

    Forward-mode (`jax.jacfwd`) per point, vmapped over the grid, in one compiled
    program. With `method="plain"` the derivatives go through
    [`jaxou.lyapunov`][]'s own derivative (its adjoint Lyapunov equation) and the
    OU flow; `"eigen"` differentiates the closed forms of the fast path. Both are
    checked against central finite differences in the tests.

    **Arguments:** as [`jaxou.evaluate`][], and

    - `terms`: names among (default: all)
      `source_trace`, `target_trace`, `discrepancy_total`, `discrepancy_covariance`,
      `discrepancy_shift`, `pretrain_kl_total`, `pretrain_kl_covariance`,
      `pretrain_kl_shift`, `finetune_kl_total`, `finetune_kl_covariance`,
      `finetune_kl_shift`, `pretrain_bound`, `finetune_bound`, `pretrain_term`,
      `finetune_term`, `total_term`;
    - `wrt`: names among the fields of [`jaxou.Hyperparameters`][] (default: all)
      `pretrain_lr`, `pretrain_batch_size`, `finetune_lr`, `finetune_batch_size`,
      `n_source`, `n_target`, `delta`, `empirical_risk_source`,
      `empirical_risk_target`, `target_shift`, `target_hessian_scale`.

    Batch sizes and sample sizes are real-valued here (a derivative in $N$ or $B$
    is the derivative of the smooth formula).
    """
    terms = TERMS if terms is None else tuple(terms)
    wrt = HYPERPARAMETERS if wrt is None else tuple(wrt)
    for t in terms:
        if t not in TERMS:
            close = difflib.get_close_matches(t, TERMS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"sensitivity: unknown term {t!r}{hint}; valid: {', '.join(TERMS)}")
    for w in wrt:
        if w not in HYPERPARAMETERS:
            raise _unknown(w)
    if method == "auto":
        method = "eigen" if _is_dense(model) else "plain"
    _, shape, n, flat = _prepare("sensitivity", model, hyper, kind, method)
    if not _is_dense(model):
        out = _eager_map(_point_sensitivity(model, kind, method, wrt, terms), flat)
    else:
        if batch_size == "auto":
            batch_size = _auto_batch(model.dim, n, method, 2**27)
        out = _sensitivity_flat(model, flat, kind, method, wrt, terms, batch_size)
    return jax.tree.map(lambda x: x.reshape(shape), out)
