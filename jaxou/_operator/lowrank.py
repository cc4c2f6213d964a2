r"""Diagonal plus low rank: $\mathrm{diag}(g) + Z S Z^\top$.

Log-determinants, solves and square-root factors go through the matrix
determinant lemma and Woodbury's identity on the whitened form
$D^{1/2}(I + Q\,\mathrm{diag}(\tau)Q^\top)D^{1/2}$ ($D = \mathrm{diag}(g)$), computed
from the $m \times m$ Gram matrix $G = \tilde Z^\top\tilde Z$ of
$\tilde Z = D^{-1/2}Z$: matrix products over $d$, then $m \times m$
eigendecompositions, $O(dm^2)$ in all; no thin QR (about 20× slower at d = 10⁶)
and no $d \times d$ matrix. The products over $d$ run over row blocks
(`weighted_gram`), so that no weighted copy of a factor (`[d, m]`, 6 GB at
$d = 10^6$, $m = 777$) is ever formed.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._misc import as_float_array, is_concrete
from .base import DENSE_LIMIT, AbstractOperator
from .dense import check_matrix
from .diagonal import check_diagonal

__all__ = [
    "DiagonalPlusLowRank",
    "sym",
    "weighted_gram",
    "weighted_sq_norms",
    "weighted_sym_gram",
]

# The eager definiteness check whitens the matrix, O(d m²); above this many flops
# only the cheap checks (finite entries, signs of the diagonal, a symmetric core) run.
_CHECK_FLOPS = 1e10

# with_positive_diagonal refuses to add more than this many numbers (1 GB in float64).
_MAX_ZERO_COLUMNS_ENTRIES = 2**27


def sym(M: Array) -> Array:
    """(M + Mᵀ)/2 over the last two axes."""
    return 0.5 * (M + jnp.swapaxes(M, -1, -2))


_GRAM_ROWS = 8192  # rows per block of the products over d


def _over_rows(term, init, *arrays):
    """Σ over row blocks of term(*blocks) (an array or a tuple of arrays): a
    `fori_loop` over full blocks and one remainder, so that no temporary spans all d
    rows (differentiable: the loop has static bounds)."""
    d = arrays[0].shape[0]
    add = lambda acc, t: jax.tree.map(jnp.add, acc, t)
    if d <= 2 * _GRAM_ROWS:
        return add(init, term(*arrays))
    n_full, rest = divmod(d, _GRAM_ROWS)

    def body(i, acc):
        blocks = [lax.dynamic_slice_in_dim(a, i * _GRAM_ROWS, _GRAM_ROWS, 0) for a in arrays]
        return add(acc, term(*blocks))

    acc = lax.fori_loop(0, n_full, body, init)
    if rest:
        acc = add(acc, term(*(a[n_full * _GRAM_ROWS :] for a in arrays)))
    return acc


@jax.jit
def weighted_gram(X: Array, w: Array, Y: Array) -> Array:
    r"""$X^\top\mathrm{diag}(w)\,Y$ (`[m, n]`) for `X [d, m]`, `w [d]`, `Y [d, n]`,
    by row blocks: no `[d, m]` temporary."""
    dtype = jnp.result_type(X, w, Y)
    init = jnp.zeros((X.shape[1], Y.shape[1]), dtype)
    return _over_rows(lambda x, v, y: x.T @ (v[:, None] * y), init, X, w, Y)


_SYM_BLOCK = 256  # column block of weighted_sym_gram (smaller GEMMs run slower)


@jax.jit
def weighted_sym_gram(X: Array, w: Array) -> Array:
    r"""$X^\top\mathrm{diag}(w)\,X$ (`[m, m]`, symmetric) for `X [d, m]`, `w [d]`,
    by row blocks, computing only the blocks on and above the diagonal of a split of
    the columns into $b$ blocks of at most 256: $(b+1)/2b$ of the products of
    `weighted_gram` (0.625 at $m = 800$; the KL at $d = 10^6$ is three such Gram
    matrices and one cross product)."""
    m = X.shape[1]
    b = -(-m // _SYM_BLOCK)
    if b < 2:
        return sym(weighted_gram(X, w, X))
    edges = [round(i * m / b) for i in range(b + 1)]
    pairs = [(i, j) for i in range(b) for j in range(i, b)]
    dtype = jnp.result_type(X, w)
    size = lambda i: edges[i + 1] - edges[i]
    init = tuple(jnp.zeros((size(i), size(j)), dtype) for i, j in pairs)

    def term(x, v):
        vx = v[:, None] * x
        cols = lambda a, i: a[:, edges[i] : edges[i + 1]]
        return tuple(cols(x, i).T @ cols(vx, j) for i, j in pairs)

    blocks = dict(zip(pairs, _over_rows(term, init, X, w)))
    rows = [
        jnp.concatenate([blocks[(i, j)] if i <= j else blocks[(j, i)].T for j in range(b)], axis=1)
        for i in range(b)
    ]
    return sym(jnp.concatenate(rows, axis=0))


@jax.jit
def weighted_sq_norms(X: Array, w: Array) -> Array:
    r"""$\sum_k w_k X_{ki}^2$ for each column $i$ of `X [d, m]`, by row blocks."""
    init = jnp.zeros((X.shape[1],), jnp.result_type(X, w))
    return _over_rows(lambda x, v: v @ (x * x), init, X, w)


def _diagonal_core(core: Array) -> bool:
    """Whether `core` is known (concrete) to be diagonal."""
    if not is_concrete(core):
        return False
    c = np.asarray(core)
    return c.size == 0 or not np.any(c - np.diag(np.diag(c)))


class _Whitened(eqx.Module):
    """The m × m algebra of a DiagonalPlusLowRank with a positive diagonal g:
    `tau` (eigenvalues of G^{1/2} S G^{1/2}, the nonzero spectrum of Z̃ S Z̃ᵀ),
    `basis` (Q = Z̃ E γ^{-1/2} V, orthonormal columns spanning the range of Z̃, where
    Z̃ = D^{-1/2} Z), `inner` (K = S (I + G S)^{-1}, so that
    M⁻¹ = D⁻¹ − A K Aᵀ with A = D⁻¹ Z)."""

    tau: Array
    basis: Array | None
    inner: Array


class DiagonalPlusLowRank(AbstractOperator):
    r"""$M = \mathrm{diag}(g) + Z S Z^\top$: `diagonal` $g$ `[d]`, `factor` $Z$
    `[d, m]` (any columns, not necessarily orthonormal; $m$ may be 0) and `core`
    $S$ `[m, m]` symmetric, possibly indefinite where $M$ is a difference.

    This is the representation of every large matrix in jaxou: a Lanczos Hessian
    $U\Lambda U^\top + \mathrm{diag}(h)$ (`core = diag(Λ)`), an exact noise
    covariance $\frac1N G^\top G$ from per-example gradients, the stationary
    covariances of the large-scale Lyapunov solvers. Solves, log-determinants and
    the KL divergence need a positive diagonal; see
    `with_positive_diagonal` for one with zeros.

    **Arguments:**

    - `diagonal`: $g$, shape `[d]`.
    - `factor`: $Z$, shape `[d, m]`.
    - `core`: $S$, shape `[m, m]`; `None` (default) is the identity.

    **Raises:** `ValueError` for mismatched shapes; `TypeError` for mismatched
    dtypes.
    """

    diagonal: Float[Array, " d"]
    factor: Float[Array, "d m"]
    core: Float[Array, "m m"]

    def __init__(
        self,
        diagonal: Float[ArrayLike, " d"],
        factor: Float[ArrayLike, "d m"],
        core: Float[ArrayLike, "m m"] | None = None,
    ):
        diagonal = as_float_array(diagonal, "diagonal")
        factor = as_float_array(factor, "factor")
        if diagonal.ndim != 1:
            raise ValueError(f"DiagonalPlusLowRank: diagonal must be [d], got {diagonal.shape}")
        if factor.ndim != 2 or factor.shape[0] != diagonal.shape[0]:
            raise ValueError(
                f"DiagonalPlusLowRank: factor must be [{diagonal.shape[0]}, m], got {factor.shape}"
            )
        m = factor.shape[1]
        core = jnp.eye(m, dtype=factor.dtype) if core is None else as_float_array(core, "core")
        if core.shape != (m, m):
            raise ValueError(f"DiagonalPlusLowRank: core must be [{m}, {m}], got {core.shape}")
        for name, x in (("factor", factor), ("core", core)):
            if x.dtype != diagonal.dtype:
                raise TypeError(
                    f"DiagonalPlusLowRank: diagonal is {diagonal.dtype} but {name} is {x.dtype}"
                )
        self.diagonal = diagonal
        self.factor = factor
        self.core = core

    @property
    def dim(self) -> int:
        return self.diagonal.shape[0]

    @property
    def rank(self) -> int:
        """The number of columns $m$ of the factor."""
        return self.factor.shape[1]

    @property
    def dtype(self):
        return self.diagonal.dtype

    def mv(self, x):
        g = self.diagonal if x.ndim == 1 else self.diagonal[:, None]
        return g * x + self.factor @ (self.core @ (self.factor.T @ x))

    def as_matrix(self):
        return jnp.diag(self.diagonal) + self.factor @ self.core @ self.factor.T

    def trace(self):
        return jnp.sum(self.diagonal) + jnp.sum((self.factor.T @ self.factor) * self.core)

    def diagonal_values(self):
        return self.diagonal + jnp.sum((self.factor @ self.core) * self.factor, axis=1)

    def scale(self, c):
        return DiagonalPlusLowRank(c * self.diagonal, self.factor, c * self.core)

    def whitened(self, *, basis: bool = True) -> _Whitened:
        """The m × m algebra behind solves, log-determinants and square roots (see
        the module docstring). Needs a positive diagonal. `basis=False` skips the
        `[d, m]` basis (solves and log-determinants do not need it)."""
        if self.rank == 0:
            empty = jnp.zeros((0,), self.dtype)
            return _Whitened(empty, self.factor, self.core)
        gram = weighted_sym_gram(self.factor, 1 / self.diagonal)
        gamma, E = jnp.linalg.eigh(sym(gram))
        gamma = jnp.maximum(gamma, 0)
        root = jnp.sqrt(gamma)
        G_half = (E * root) @ E.T
        tau, V = jnp.linalg.eigh(sym(G_half @ self.core @ G_half))
        # Q = Z̃ G^{-1/2} V on the range of G (directions with γ = 0 carry τ = 0).
        inv_root = jnp.where(gamma > 0, 1 / jnp.where(gamma > 0, root, 1), 0)
        W = self.core @ G_half @ V
        inner = sym(self.core - (W / (1 + tau)) @ W.T)
        if not basis:
            return _Whitened(tau, None, inner)
        Q = (self.factor / jnp.sqrt(self.diagonal)[:, None]) @ ((E * inv_root) @ E.T @ V)
        return _Whitened(tau, Q, inner)

    def logdet(self):
        tau = self.whitened(basis=False).tau
        return jnp.sum(jnp.log(self.diagonal)) + jnp.sum(jnp.log1p(tau))

    def solve(self, x):
        K = self.whitened(basis=False).inner
        x2 = x if x.ndim == 2 else x[:, None]
        g = self.diagonal[:, None]
        out = (x2 - self.factor @ (K @ weighted_gram(self.factor, 1 / self.diagonal, x2))) / g
        return out if x.ndim == 2 else out[:, 0]

    @property
    def root_width(self) -> int:
        return self.dim

    def root_mv(self, z):
        r"""$R z$ with $R = D^{1/2}(I + Q(\sqrt{1+\tau} - 1)Q^\top)$, so that
        $RR^\top = M$ (positive semi-definite $M$ with a positive diagonal)."""
        w = self.whitened()
        gain = jnp.sqrt(jnp.clip(1 + w.tau, 0)) - 1
        inner = ((z @ w.basis) * gain) @ w.basis.T
        return (z + inner) * jnp.sqrt(self.diagonal)

    def with_positive_diagonal(self) -> DiagonalPlusLowRank:
        r"""The same matrix with every diagonal entry positive, for the Woodbury
        algebra: each zero entry $g_i = 0$ becomes $s$ (the mean of the positive
        entries) and $-s\,e_ie_i^\top$ joins the low-rank part, whose rank grows by
        the number of zeros. Needs concrete values (the rank depends on them).

        **Raises:** `ValueError` for negative or non-finite diagonal entries, or
        under `jit`.
        """
        if not is_concrete(self.diagonal):
            raise ValueError(
                "with_positive_diagonal needs concrete values (the new rank depends on "
                "the number of zero diagonal entries); call it outside jax.jit"
            )
        g = np.asarray(self.diagonal)
        check_diagonal("DiagonalPlusLowRank", g, definite=False)
        zeros = np.flatnonzero(g == 0)
        if zeros.size == 0:
            return self
        n0 = zeros.size
        if n0 * self.dim > _MAX_ZERO_COLUMNS_ENTRIES:
            raise ValueError(
                f"DiagonalPlusLowRank: {n0} of its {self.dim} diagonal entries are zero; moving "
                f"them into the factor would add {n0} columns of length {self.dim} (more than "
                f"{_MAX_ZERO_COLUMNS_ENTRIES:.0e} numbers). Solves, log-determinants and KL "
                "divergences need a mostly positive diagonal: a singular noise covariance "
                "gives singular stationary laws, whose KL is only defined on their common "
                "support; use finite-time laws (positive definite from a positive definite "
                "initial law) or add a small diagonal floor"
            )
        positive = g[g > 0]
        s = float(np.mean(positive)) if positive.size else 1.0
        E = jnp.zeros((self.dim, n0), self.dtype).at[zeros, jnp.arange(n0)].set(1)
        m = self.rank
        core = jnp.block(
            [
                [self.core, jnp.zeros((m, n0), self.dtype)],
                [jnp.zeros((n0, m), self.dtype), -s * jnp.eye(n0, dtype=self.dtype)],
            ]
        )
        return DiagonalPlusLowRank(
            self.diagonal.at[zeros].set(s), jnp.concatenate([self.factor, E], axis=1), core
        )

    def check(self, name: str, *, definite: bool) -> None:
        if not is_concrete(self.diagonal, self.factor, self.core):
            return
        check_diagonal(f"{name} (diagonal part)", self.diagonal, definite=False)
        for part, x in (("factor", self.factor), ("core", self.core)):
            if not np.all(np.isfinite(np.asarray(x))):
                raise ValueError(f"{name} has non-finite entries in its {part}")
        core = np.asarray(self.core)
        if core.size and np.max(np.abs(core - core.T)) > 1e3 * np.finfo(core.dtype).eps * max(
            np.max(np.abs(core)), 1e-300
        ):
            raise ValueError(f"{name}: its core is not symmetric")
        if self.rank == 0:
            check_diagonal(name, self.diagonal, definite=definite)
            return
        if self.dim * self.rank**2 > _CHECK_FLOPS:
            return  # definiteness costs as much as the algebra itself: not checked
        g = np.asarray(self.diagonal)
        if definite:
            if np.all(g > 0):
                smallest = 1 + float(np.min(np.asarray(self.whitened(basis=False).tau)))
                if not smallest > 0:
                    raise ValueError(
                        f"{name} is not positive definite: the smallest eigenvalue of its "
                        f"whitened form D^(-1/2) M D^(-1/2) is {smallest:.3g}"
                    )
            elif self.dim <= DENSE_LIMIT:
                check_matrix(name, self.as_matrix(), definite=True)
            return
        # Semi-definite: M + δI must be positive semi-definite, δ = √ε max_i M_ii (the
        # accuracy of the low-rank solvers' compressed factors): whitening M + δI
        # tells exactly whether the smallest eigenvalue of M is >= -δ.
        scale = float(np.max(np.asarray(self.diagonal_values())))
        delta = float(np.sqrt(np.finfo(g.dtype).eps)) * max(scale, np.finfo(g.dtype).tiny)
        shifted = DiagonalPlusLowRank(self.diagonal + delta, self.factor, self.core)
        smallest = 1 + float(np.min(np.asarray(shifted.whitened(basis=False).tau)))
        if smallest < 0:
            raise ValueError(
                f"{name} is not positive semi-definite: it has an eigenvalue below "
                f"-{delta:.3g} (√ε times its largest diagonal entry)"
            )
