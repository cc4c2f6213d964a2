r"""A symmetric low-rank matrix $X = Z K Z^\top$ built block by block and compressed
in place: the memory-bounded core of the large-scale solvers
([`jaxou.LowRankADI`][] and [`jaxou.finite_time_cov`][]).

The factor $Z$ (`[d, N]`) is kept as a list of panels (`[d, P]` arrays), so that
appending a block never copies what is already there and every product over $d$
touches only the columns in use. Alongside it the small matrices are kept in
float64 NumPy: the core $K$ and the Gram matrix $G = Z^\top Z$. Each append costs
one pass over the old panels ($O(dNP)$); nothing is orthogonalised until a
compression. Where truncation is measured in the residual of a Lyapunov equation,
the caller hands `compress` the matrix $G_2 = (HZ)^\top(HZ)$ (the ADI solver
knows it from a recurrence, without touching $d$; see `adi.py`), and the
accumulator keeps its rotated form.

**Compression** (column compression by the Gram matrix, with a shift). With
$G = E\,\mathrm{diag}(g)\,E^\top$ and $s = N\varepsilon\max g$, let
$B = E\,\mathrm{diag}(g+s)^{-1/2}$; then $Q_1 = ZB$ has singular values
$\sqrt{g/(g+s)} \le 1$ and $X = Q_1 K_1 Q_1^\top$ *exactly*, with
$K_1 = B^{-1}KB^{-\top}$. The eigendecomposition $K_1 = P\,\mathrm{diag}(\theta)P^\top$
gives $X = Y\mathrm{diag}(\theta)Y^\top$ with $Y = ZBP$, columns of norm at most 1.
Dropping a set $D$ of directions changes $X$ by $E = Y_D\theta_DY_D^\top$, and

- $\|E\|_F \le \|Y\|_2\,(\sum_{i\in D}\theta_i^2\|y_i\|^2)^{1/2}$,
- $\|HE + EH\|_F \le 2\|Y\|_2\,(\sum_{i\in D}\theta_i^2\|Hy_i\|^2)^{1/2}$,

both computed from $G$ and $G_2$ without touching $d$. Directions are dropped in
increasing order of that score while the bound stays within the budget. The
shift replaces the usual rank decision on the Gram matrix (which would drop
directions below $\sqrt\varepsilon$ of the largest and lose about $\sqrt\varepsilon$
of $X$): nothing is dropped on account of $G$, only on account of $\theta$, and the
representation stays accurate to about $\varepsilon\|Z\|^2\|K\|$. The new factor
$ZR$ ($R = BP$, kept columns) overwrites the panels in place, row block by row
block, so that a compression needs no second copy of $Z$.
"""

from __future__ import annotations

import functools

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

__all__ = ["LowRankAccumulator", "auto_width", "lowrank_fro"]

_ROW_CHUNK = 4096  # rows per step of the in-place rotation
AUTO_COLUMNS = 2048  # below this many columns an iteration compresses only at the end


def auto_width(rank: int, step: int, dim: int) -> int | None:
    """The most columns an iteration without `max_rank` lets its accumulator hold
    before it compresses in the loop, given the `rank` after the last compression
    (0 before any) and the `step` columns it appends at a time; `None`: compress at
    the end only.

    `AUTO_COLUMNS` or twice what the last compression kept plus two steps, whichever
    is more. So an iteration that ends below 2,048 columns (the large-scale
    benchmark at $d = 10^6$: 1,530) runs as without this rule, and one whose factor
    compresses well (a real network's Hessian, whose spread of $10^3$–$10^4$ makes
    the ADI take many steps for a modest rank: 4,482 columns held for a rank of
    518 at $d = 126{,}090$, measured) holds a few times its rank instead of the sum
    of its blocks: a compression costs two eigendecompositions of the width and a
    rotation over $d$, and the width costs every later append (a product over $d$)
    and $O(N^2)$ of bookkeeping.

    Only while that width is at most $d/2$: past $d$ columns the Gram matrix has
    exact null directions, in which the residual-scored compression (its $G_2$
    from a recurrence, not from the panels) cannot tell rounding from signal, and
    repeated compressions there kept more than $d$ columns and diverged (measured
    at $d = 300$). Small problems compress once, at the end, as before.
    """
    limit = max(AUTO_COLUMNS, 2 * rank + 2 * step)
    return limit if 2 * limit <= dim else None


def lowrank_fro(gram: np.ndarray, core: np.ndarray) -> float:
    r"""$\|Z S Z^\top\|_F$ from the Gram matrix $G = Z^\top Z$ and the core $S$:
    $\|G^{1/2} S G^{1/2}\|_F$, a sum of squares (no cancellation for an indefinite
    $S$)."""
    if gram.size == 0:
        return 0.0
    g, E = np.linalg.eigh(0.5 * (gram + gram.T))
    root = (E * np.sqrt(np.clip(g, 0, None))) @ E.T
    return float(np.linalg.norm(root @ core @ root))


@jax.jit
def _cross(panel: Array, block: Array) -> Array:
    return panel.T @ block


@functools.partial(jax.jit, donate_argnums=0, static_argnames="n_out")
def _rotate(panels: tuple[Array, ...], R: Array, n_out: int) -> tuple[Array, ...]:
    """The first `n_out` panels ← (concatenated panels) @ R, in place, row block by
    row block; R has at most n_out·P columns, the rest of the last panel is zero (not
    computed). All panels come back (the others unchanged), so that every donated
    buffer is reused."""
    d, P = panels[0].shape
    chunk = min(_ROW_CHUNK, d)
    pad = n_out * P - R.shape[1]

    def rotate_rows(ps, start, size):
        rows = jnp.concatenate([lax.dynamic_slice_in_dim(p, start, size, 0) for p in ps], 1)
        new = rows @ R
        if pad:
            new = jnp.concatenate([new, jnp.zeros((size, pad), new.dtype)], axis=1)
        out = [
            lax.dynamic_update_slice_in_dim(ps[j], new[:, j * P : (j + 1) * P], start, 0)
            for j in range(n_out)
        ]
        return tuple(out) + tuple(ps[n_out:])

    n_full = d // chunk
    panels = lax.fori_loop(0, n_full, lambda i, ps: rotate_rows(ps, i * chunk, chunk), panels)
    if d % chunk:
        panels = rotate_rows(panels, n_full * chunk, d % chunk)
    return panels


class LowRankAccumulator:
    r"""$X = ZKZ^\top$ with $Z$ in panels of `panel` columns (see the module
    docstring). A plain mutable Python object for the eager loops of the
    large-scale solvers, never traced. `gram2` is $G_2 = (HZ)^\top(HZ)$ as of the
    last compression that was given one (rotated with the factor), else `None`.
    """

    def __init__(self, dim: int, dtype, panel: int):
        self.dim, self.dtype, self.panel = dim, dtype, panel
        self.panels: list[Array] = []
        self.core = np.zeros((0, 0))
        self.gram = np.zeros((0, 0))
        self.gram2: np.ndarray | None = None
        self.rank = 0  # columns in use after the last compression

    @property
    def width(self) -> int:
        """The number of columns N held (panels times panel width)."""
        return len(self.panels) * self.panel

    def append(self, block: Array, core: np.ndarray) -> None:
        """X ← X + V T Vᵀ for a block V [d, n] (any n) and its core T [n, n]. A block
        of exactly one panel is stored as it is (no copy): do not reuse it."""
        n, P, start = block.shape[1], self.panel, self.width
        block = block.astype(self.dtype)
        if n % P:
            block = jnp.pad(block, ((0, 0), (0, P - n % P)))
        core = np.asarray(core, np.float64)
        for j in range(block.shape[1] // P):
            self._append_panel(block if block.shape[1] == P else block[:, j * P : (j + 1) * P])
        self.core[start : start + n, start : start + n] += core  # padding keeps a zero core

    def _append_panel(self, p: Array) -> None:
        N, P = self.width, self.panel
        cross = np.zeros((N, P))
        for i, old in enumerate(self.panels):
            cross[i * P : (i + 1) * P] = np.asarray(_cross(old, p), np.float64)
        self.panels.append(p)
        self.gram = _grow(self.gram, cross, _cross(p, p))
        self.core = np.pad(self.core, ((0, P), (0, P)))

    def cross(self, block: Array) -> np.ndarray:
        """Zᵀ V (float64) for a block V [d, n], one pass over the panels."""
        block = block.astype(self.dtype)
        out = [np.asarray(_cross(p, block), np.float64) for p in self.panels]
        return np.concatenate(out, axis=0) if out else np.zeros((0, block.shape[1]))

    def fro(self) -> float:
        """‖Z K Zᵀ‖_F = tr(KGKG)^{1/2} (for tolerances: no eigendecomposition)."""
        KG = self.core @ self.gram
        return float(np.sqrt(max(float(np.sum(KG * KG.T)), 0.0)))

    def compress(
        self, budget: float, *, gram2: np.ndarray | None = None, max_width: int | None = None
    ) -> float:
        """Drop directions while the error bound stays within `budget` (measured in
        ‖HE + EH‖_F if `gram2` = (HZ)ᵀ(HZ) [N, N] is given, else in ‖E‖_F), and in
        any case down to `max_width` columns; rotate the panels in place and leave
        the core diagonal. Returns the bound on what was dropped."""
        if self.width == 0:
            return 0.0
        residual = gram2 is not None
        self.gram2 = _sym(np.asarray(gram2, np.float64)) if residual else None
        R, theta, score, ynorm = self._eigen_directions(residual)
        order = np.argsort(score, kind="stable")
        factor = (2.0 if residual else 1.0) * ynorm
        bound = factor * np.sqrt(np.cumsum(score[order]))
        n_drop = int(np.searchsorted(bound, budget, side="right"))
        if max_width is not None:
            n_drop = max(n_drop, self.width - max_width)
        dropped = float(bound[n_drop - 1]) if n_drop else 0.0
        keep = np.sort(order[n_drop:])
        self._rotate_to(R[:, keep], theta[keep])
        return dropped

    def _eigen_directions(self, residual: bool):
        """R, θ with X = (ZR) diag(θ) (ZR)ᵀ, the score θ²‖y‖² (or θ²‖Hy‖²) of each
        column y of ZR, and ‖ZR‖₂ (at least 1; by power iteration on RᵀGR, which
        the shift keeps within rounding of 1)."""
        R, theta = _directions(self.gram, self.core, float(np.finfo(self.dtype).eps))
        GR = self.gram @ R
        yy = np.sum(R * GR, axis=0)
        v = np.random.default_rng(0).standard_normal(R.shape[1])
        for _ in range(30):
            w = R.T @ (GR @ v)
            top = float(np.linalg.norm(w))
            v = w / max(top, np.finfo(float).tiny)
        ynorm = float(np.sqrt(max(1.01 * top, 1.0)))
        weights = np.sum(R * (self.gram2 @ R), axis=0) if residual else yy
        return R, theta, theta**2 * np.clip(weights, 0, None), ynorm

    def _rotate_to(self, R: np.ndarray, theta: np.ndarray) -> None:
        r, P = R.shape[1], self.panel
        n_out = -(-r // P)
        R_pad = np.pad(R, ((0, 0), (0, n_out * P - r)))
        if n_out:
            panels = _rotate(tuple(self.panels), jnp.asarray(R, self.dtype), n_out)
            self.panels = list(panels[:n_out])
        else:
            self.panels = []
        self.rank = r
        self.core = np.diag(np.pad(theta, (0, n_out * P - r)))
        self.gram = _sym(R_pad.T @ self.gram @ R_pad)
        if self.gram2 is not None:
            self.gram2 = _sym(R_pad.T @ self.gram2 @ R_pad)

    def factor(self) -> tuple[Array, np.ndarray]:
        """(Z, θ) right after a compression: Z [d, r] without the padding columns,
        θ [r] the diagonal of the core. One copy of Z (the panels are released):
        peak memory 2r columns."""
        r, theta, P = self.rank, np.diag(self.core)[: self.rank], self.panel
        if r == 0:
            self.panels = []
            return jnp.zeros((self.dim, 0), self.dtype), theta
        n_full, rest = divmod(r, P)
        parts = self.panels[:n_full] + ([self.panels[n_full][:, :rest]] if rest else [])
        self.panels = []
        return jnp.concatenate(parts, axis=1), theta


def _directions(gram: np.ndarray, core: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """One pass of the shifted Gram compression (module docstring): R = B P, θ;
    `eps` is the machine epsilon of the factor's dtype (the Gram matrix's accuracy)."""
    g, E = np.linalg.eigh(_sym(gram))
    g = np.clip(g, 0, None)
    s = g.shape[0] * eps * max(float(g.max()), np.finfo(float).tiny)
    root = np.sqrt(g + s)
    theta, P = np.linalg.eigh(_sym((E.T @ core @ E) * root[:, None] * root[None, :]))
    return (E / root) @ P, theta


def _grow(gram: np.ndarray, cross: np.ndarray, new: Array) -> np.ndarray:
    new = np.asarray(new, np.float64)
    return np.block([[gram, cross], [cross.T, _sym(new)]])


def _sym(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + M.T)
