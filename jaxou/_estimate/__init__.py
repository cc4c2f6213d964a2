r"""Layer 7: estimation. The inputs of the OU model, measured on a real model
trained on real data with Optax, returned as the operators that layers 1–6 take.

Given a per-example loss $\ell(\theta; x, y)$ and a sample $(x_i, y_i)_{i\le N}$,
the training loss is $L(\theta) = \frac1N\sum_i \ell(\theta; x_i, y_i)$ and

- the minimum $\theta^* = \arg\min L$ ([`jaxou.train_to_minimum`][]),
- the Hessian $H = \nabla^2 L(\theta^*)$ ([`jaxou.estimate_hessian`][]) by a
  Hessian estimator: [`jaxou.DenseHessian`][] or [`jaxou.LanczosHessian`][],
- the per-example gradient covariance $C$ ([`jaxou.estimate_noise_cov`][]) by a
  noise estimator: [`jaxou.DenseNoise`][], [`jaxou.ExactNoise`][] or
  [`jaxou.SketchedNoise`][],
- the [`jaxou.SGDStage`][] they define ([`jaxou.estimate_stage`][]).

Estimators are objects, as Lineax's solvers are: one class per method with its own
options, instead of `method=` strings whose options only some values read.

Parameters may be any pytree, an Equinox module included: the inexact-array
leaves are flattened into one vector $\theta\in\mathbb R^d$
([`jaxou.flatten_params`][]). The data enter every compiled program as
arguments, and sums over examples run one chunk at a time.
"""

from ._api import (
    StageEstimate as StageEstimate,
    estimate_hessian as estimate_hessian,
    estimate_noise_cov as estimate_noise_cov,
    estimate_stage as estimate_stage,
    per_example_grads as per_example_grads,
)
from ._hessian import (
    AbstractHessianEstimator as AbstractHessianEstimator,
    DenseHessian as DenseHessian,
    LanczosHessian as LanczosHessian,
)
from ._krylov import hutchinson_diagonal as hutchinson_diagonal, lanczos as lanczos
from ._noise import (
    AbstractNoiseEstimator as AbstractNoiseEstimator,
    DenseNoise as DenseNoise,
    ExactNoise as ExactNoise,
    SketchedNoise as SketchedNoise,
)
from ._objective import flatten_params as flatten_params
from ._sampling import sample_sgd as sample_sgd, sgd_stationary_cov as sgd_stationary_cov
from ._train import Minimum as Minimum, train_to_minimum as train_to_minimum
