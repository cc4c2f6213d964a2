"""Streamed sample statistics: per-block centred sums merged pairwise (Chan et al.).

A set of samples is summarised by its sufficient statistics `(count, mean, m2)`
with `m2 = Σ (x - mean)(x - mean)ᵀ`. Two summaries merge exactly (Chan, Golub &
LeVeque 1979, *Updating formulae and a pairwise algorithm for computing sample
variances*):

    n = n_a + n_b,  δ = mean_b - mean_a,
    mean = mean_a + δ n_b / n,
    m2 = m2_a + m2_b + δ δᵀ n_a n_b / n.

Inside one compiled program the paths are summarised block by block (two-pass,
centred within a block of a few hundred paths) and the blocks merged with sums
taken in two levels, so the rounding error grows like `sqrt(n_blocks)` rather
than `n_paths` and no large offset is ever subtracted from a raw second moment:
float32 statistics over 10^6-10^7 paths keep their digits. Chunks are merged on
the host in float64, in a balanced tree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["Moments", "block_moments", "merge_pair", "merge_host"]


class Moments(NamedTuple):
    """Sufficient statistics of a sample: `count`, `mean` [..., d], `m2` [..., d, d]."""

    count: Array
    mean: Array
    m2: Array


def merge_pair(a: Moments, b: Moments) -> Moments:
    """The summary of two disjoint samples (Chan et al.; both counts > 0): the
    formula in the module docstring, in whatever array type the inputs have."""
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + (a.count * b.count / n) * delta[..., :, None] * delta[..., None, :]
    return Moments(n, mean, m2)


def _two_level_sum(x: Array) -> Array:
    """Sum over the leading axis in two levels (groups of about sqrt(k)): the
    rounding error grows like 2 sqrt(k) eps instead of k eps, at the cost of one
    reshape (cheap to compile, unlike a log2(k)-deep tree)."""
    k = x.shape[0]
    g = max(1, math.isqrt(k))
    groups = -(-k // g)
    pad = groups * g - k
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return jnp.sum(jnp.sum(x.reshape((groups, g) + x.shape[1:]), axis=1), axis=0)


def block_moments(
    y: Float[Array, "n_blocks block d"], mask: Float[Array, "n_blocks block"]
) -> Moments:
    """The moments of the rows of `y` where `mask` is 1: two-pass (centred) within
    each block; across blocks, the exact merge of Chan et al. written as
    `mean = Σ n_b mean_b / n` and `m2 = Σ [m2_b + n_b (mean_b - mean)(mean_b - mean)ᵀ]`,
    each sum taken in two levels."""
    mask = mask.astype(y.dtype)
    count_b = jnp.sum(mask, axis=1)
    mean_b = jnp.sum(y * mask[..., None], axis=1) / jnp.where(count_b > 0, count_b, 1)[:, None]
    dev = (y - mean_b[:, None, :]) * mask[..., None]
    m2_b = jnp.einsum("kbi,kbj->kij", dev, dev)
    count = _two_level_sum(count_b)
    mean = _two_level_sum(count_b[:, None] * mean_b) / count
    shift = (mean_b - mean) * jnp.sqrt(count_b)[:, None]
    m2 = _two_level_sum(m2_b + shift[:, :, None] * shift[:, None, :])
    return Moments(count, mean, m2)


def merge_host(parts: list[Moments]) -> Moments:
    """Merge per-chunk summaries on the host, in float64, in a balanced tree."""
    parts = [
        Moments(np.float64(p.count), np.asarray(p.mean, np.float64), np.asarray(p.m2, np.float64))
        for p in parts
    ]
    while len(parts) > 1:
        pairs = [merge_pair(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = pairs + parts[len(pairs) * 2 :]
    return parts[0]
