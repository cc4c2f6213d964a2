"""Front end: build the two-stage problem a configuration describes.

Shared by the subcommands (`jaxou run`, `jaxou simulate`, ...): they all call
[`build_problem`][] on a validated [`jaxou._config.Config`][] and get a
[`jaxou.TwoStage`][] and a [`ProblemInfo`][] (sample sizes, confidence, how each
matrix was made).

The generated problem mimics what is measured on real networks:

- pre-training Hessian $H_S = V\\,\\mathrm{diag}(\\lambda)\\,V^\\top$ with $\\lambda$
  log-spaced in `[hessian_min_eig, hessian_max_eig]` (a spectrum spread over
  orders of magnitude) and $V$ a Haar-random orthogonal matrix;
- gradient-noise covariance aligned with, but not proportional to, the Hessian:
  $C_S = s\\,[V\\,\\mathrm{diag}(\\lambda^p)\\,V^\\top + r\\,\\bar{\\lambda^p}\\,WW^\\top/d]$,
  $W$ a standard Gaussian matrix. With $p = 1$ and $r = 0$ the stationary law
  would be isotropic, $\\Sigma_\\infty = \\frac{\\eta s}{2B} I$; the defaults
  $p = 1/2$, $r = 0.2$ make it anisotropic and not diagonal in $V$;
- fine-tuning: $H_T = c\\,R H_S R^\\top$, $C_T = s_T\\,R C_S R^\\top$ with
  $R = \\exp(\\alpha K)$, $K$ a random skew-symmetric matrix of spectral norm 1 (so
  $\\alpha$ is the largest principal rotation angle), and
  $\\theta^*_T = \\theta^*_S + \\text{shift}\\cdot u$, $u$ a random unit vector.

Explicit `hessian`, `noise_cov` or `minimum` in a stage's table replace the
generated ones. Every random draw comes from NumPy streams spawned from
`problem.seed` (one per ingredient), so a seed names one problem whatever is
given explicitly, and building costs no compilation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from ._config import Config
from ._gaussian import Gaussian
from ._sgd import SGDStage, TwoStage

__all__ = ["ProblemInfo", "build_problem", "haar_orthogonal", "random_rotation"]


@dataclass(frozen=True)
class ProblemInfo:
    """What the bound needs beside the model, and how the model was made.

    - `n_source`, `n_target`: sample sizes $N_S$, $N_T$.
    - `delta`: confidence of the PAC-Bayes bounds.
    - `kind`: the bound that decides which stage dominates (`"mcallester"`/`"kl"`).
    - `empirical_risk_source`, `empirical_risk_target`: the $\\hat R$ of each stage.
    - `origin`: for each of `pretrain.hessian`, ..., `finetune.minimum`, whether it
      was `"generated"` or `"explicit"`.
    - `rotation`: the rotation $R$ that made the generated target Hessian or noise
      covariance (`None` when both are explicit).
    - `config`: the configuration it was built from.
    """

    dim: int
    seed: int
    n_source: int
    n_target: int
    delta: float
    kind: str
    empirical_risk_source: float
    empirical_risk_target: float
    origin: dict[str, str]
    rotation: np.ndarray | None
    config: Config = field(repr=False)


def haar_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    """A Haar-distributed random orthogonal matrix (QR of a Gaussian matrix with
    the signs of R's diagonal fixed; Mezzadri 2007, *How to generate random
    matrices from the classical compact groups*)."""
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    return Q * np.where(np.diagonal(R) < 0, -1.0, 1.0)[None, :]


def random_rotation(rng: np.random.Generator, d: int, angle: float) -> np.ndarray:
    """$R = \\exp(\\alpha K)$ with $K$ a random skew-symmetric matrix normalised to
    spectral norm 1, so that the largest principal rotation angle is $\\alpha$.

    $iK$ is Hermitian, $iK = U\\,\\mathrm{diag}(w)\\,U^*$, so
    $\\exp(\\alpha K) = U\\,\\mathrm{diag}(e^{-i\\alpha w})\\,U^*$ exactly (an
    orthogonal matrix up to rounding, with no scaling-and-squaring error)."""
    A = rng.standard_normal((d, d))
    K = A - A.T
    if d == 1 or angle == 0:
        return np.eye(d)
    w, U = np.linalg.eigh(1j * K)
    norm = np.max(np.abs(w))
    R = ((U * np.exp(-1j * (angle / norm) * w)[None, :]) @ U.conj().T).real
    # Re-orthogonalise (polar factor) so that R Rᵀ = I to working precision.
    Uo, _, Vt = np.linalg.svd(R)
    return Uo @ Vt


def _sym(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + M.T)


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    u = rng.standard_normal(d)
    return u / np.linalg.norm(u)


def build_problem(config: Config) -> tuple[TwoStage, ProblemInfo]:
    """Build the [`jaxou.TwoStage`][] model a validated configuration describes.

    Works in the default float dtype (float64 when `jax_enable_x64` is on, as in
    the command line). Returns `(model, info)`; see [`ProblemInfo`][].

    **Raises:** `ValueError`/`TypeError` from the library constructors if the
    generated problem is invalid (the configuration checks make that unlikely).
    """
    dtype = jnp.result_type(float)
    prob, pre, fine = config.problem, config.pretrain, config.finetune
    d = int(prob.dim)
    # One independent stream per ingredient, so that the seed alone names the
    # problem whatever else is given explicitly. Generated in float64 NumPy (no
    # compilation), handed to the library in the default float dtype.
    streams = np.random.SeedSequence(int(prob.seed)).spawn(5)
    rng_basis, rng_noise, rng_min, rng_rot, rng_shift = map(np.random.default_rng, streams)
    origin = {}

    def explicit(table: str, key: str):
        value = getattr(config, table)[key]
        origin[f"{table}.{key}"] = "explicit" if value is not None else "generated"
        return None if value is None else np.asarray(value, np.float64)

    # --- pre-training stage
    V = haar_orthogonal(rng_basis, d)
    H_S = explicit("pretrain", "hessian")
    if H_S is None:
        lam = np.logspace(math.log10(pre.hessian_min_eig), math.log10(pre.hessian_max_eig), d)
        H_S = _sym((V * lam) @ V.T)
    else:
        lam, V = np.linalg.eigh(H_S)
    C_S = explicit("pretrain", "noise_cov")
    if C_S is None:
        aligned = np.clip(lam, 0, None) ** pre.noise_power
        W = rng_noise.standard_normal((d, d))
        random_part = pre.noise_random * np.mean(aligned) * (W @ W.T) / d
        C_S = _sym(pre.noise_scale * ((V * aligned) @ V.T + random_part))
    theta_S = explicit("pretrain", "minimum")
    if theta_S is None:
        theta_S = pre.minimum_norm * _unit(rng_min, d)

    # --- fine-tuning stage: rotated, rescaled, shifted
    H_T = explicit("finetune", "hessian")
    C_T = explicit("finetune", "noise_cov")
    R = None
    if H_T is None or C_T is None:
        R = random_rotation(rng_rot, d, fine.rotation)
    if H_T is None:
        H_T = _sym(fine.scale * (R @ H_S @ R.T))
    if C_T is None:
        C_T = _sym(fine.noise_scale * (R @ C_S @ R.T))
    theta_T = explicit("finetune", "minimum")
    if theta_T is None:
        theta_T = theta_S + fine.shift * _unit(rng_shift, d)

    init_mean = explicit("init", "mean")
    if init_mean is None:
        init_mean = np.zeros(d)
    H_S, C_S, theta_S, H_T, C_T, theta_T, init_mean = (
        jnp.asarray(x, dtype) for x in (H_S, C_S, theta_S, H_T, C_T, theta_T, init_mean)
    )
    init = Gaussian.isotropic(init_mean, config.init.std)

    source = SGDStage(H_S, C_S, theta_S, pre.lr, pre.batch_size)
    target = SGDStage(H_T, C_T, theta_T, fine.lr, fine.batch_size)
    model = TwoStage(init, source, target, pre.duration, fine.duration)
    b = config.bound
    info = ProblemInfo(
        dim=d,
        seed=int(prob.seed),
        n_source=int(pre.n_samples),
        n_target=int(fine.n_samples),
        delta=float(b.delta),
        kind=str(b.kind),
        empirical_risk_source=float(b.empirical_risk_source),
        empirical_risk_target=float(b.empirical_risk_target),
        origin=origin,
        rotation=None if R is None else np.asarray(R),
        config=config,
    )
    return model, info
