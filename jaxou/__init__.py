"""jaxou: the two-stage Ornstein–Uhlenbeck model of pre-training and fine-tuning, in JAX."""

from ._bounds import (
    TwoStageBound as TwoStageBound,
    binary_kl as binary_kl,
    domain_discrepancy as domain_discrepancy,
    kl_inverse as kl_inverse,
    pac_bayes_bound as pac_bayes_bound,
    two_stage_bound as two_stage_bound,
)
from ._diagnostics import (
    MonteCarloCheck as MonteCarloCheck,
    analytic_marginals as analytic_marginals,
    kl_fit_floor as kl_fit_floor,
    monte_carlo_check as monte_carlo_check,
)
from ._estimate import (
    AbstractHessianEstimator as AbstractHessianEstimator,
    AbstractNoiseEstimator as AbstractNoiseEstimator,
    DenseHessian as DenseHessian,
    DenseNoise as DenseNoise,
    ExactNoise as ExactNoise,
    LanczosHessian as LanczosHessian,
    Minimum as Minimum,
    SketchedNoise as SketchedNoise,
    StageEstimate as StageEstimate,
    estimate_hessian as estimate_hessian,
    estimate_noise_cov as estimate_noise_cov,
    estimate_stage as estimate_stage,
    flatten_params as flatten_params,
    hutchinson_diagonal as hutchinson_diagonal,
    lanczos as lanczos,
    per_example_grads as per_example_grads,
    sample_sgd as sample_sgd,
    sgd_stationary_cov as sgd_stationary_cov,
    train_to_minimum as train_to_minimum,
)
from ._gaussian import (
    Gaussian as Gaussian,
    KLDecomposition as KLDecomposition,
    kl as kl,
    kl_parts as kl_parts,
    w2 as w2,
)
from ._lyapunov import (
    AbstractLyapunovSolver as AbstractLyapunovSolver,
    ADIStats as ADIStats,
    AutoLyapunov as AutoLyapunov,
    Eigh as Eigh,
    Kronecker as Kronecker,
    LowRankADI as LowRankADI,
    LyapunovResult as LyapunovResult,
    LyapunovSolution as LyapunovSolution,
    MatrixSign as MatrixSign,
    finite_time_cov as finite_time_cov,
    flow_operator as flow_operator,
    lyapunov as lyapunov,
)
from ._operator import (
    AbstractOperator as AbstractOperator,
    Dense as Dense,
    Diagonal as Diagonal,
    DiagonalPlusLowRank as DiagonalPlusLowRank,
)
from ._ou import OUDiffusion as OUDiffusion, OUDrift as OUDrift, OUProcess as OUProcess
from ._sgd import SGDStage as SGDStage, TwoStage as TwoStage
from ._simulate import Simulation as Simulation, simulate as simulate
from ._solvers import (
    CounterBrownianPath as CounterBrownianPath,
    ExactOU as ExactOU,
    FusedEuler as FusedEuler,
)
from ._sweep import (
    GridResult as GridResult,
    Hyperparameters as Hyperparameters,
    evaluate as evaluate,
    grid as grid,
    sensitivity as sensitivity,
)

__version__ = "0.1.0"

# The public surface, layer by layer (see docs/api/index.md).
__all__ = [
    # 1. covariance operators
    "AbstractOperator",
    "Dense",
    "Diagonal",
    "DiagonalPlusLowRank",
    # 1. Lyapunov solvers and the OU flow
    "lyapunov",
    "AbstractLyapunovSolver",
    "AutoLyapunov",
    "Eigh",
    "MatrixSign",
    "Kronecker",
    "LowRankADI",
    "ADIStats",
    "LyapunovSolution",
    "LyapunovResult",
    "flow_operator",
    "finite_time_cov",
    # 2. Gaussians
    "Gaussian",
    "KLDecomposition",
    "kl",
    "kl_parts",
    "w2",
    # 3. OU processes
    "OUProcess",
    "OUDrift",
    "OUDiffusion",
    # 4. SGD stages
    "SGDStage",
    "TwoStage",
    # 5. Monte Carlo
    "simulate",
    "Simulation",
    "FusedEuler",
    "ExactOU",
    "CounterBrownianPath",
    "analytic_marginals",
    "kl_fit_floor",
    "monte_carlo_check",
    "MonteCarloCheck",
    # 6. bounds, grids and sensitivity
    "pac_bayes_bound",
    "kl_inverse",
    "binary_kl",
    "two_stage_bound",
    "TwoStageBound",
    "domain_discrepancy",
    "evaluate",
    "grid",
    "sensitivity",
    "Hyperparameters",
    "GridResult",
    # 7. estimation
    "train_to_minimum",
    "Minimum",
    "estimate_stage",
    "StageEstimate",
    "estimate_hessian",
    "AbstractHessianEstimator",
    "DenseHessian",
    "LanczosHessian",
    "estimate_noise_cov",
    "AbstractNoiseEstimator",
    "DenseNoise",
    "ExactNoise",
    "SketchedNoise",
    "per_example_grads",
    "flatten_params",
    "lanczos",
    "hutchinson_diagonal",
    "sample_sgd",
    "sgd_stationary_cov",
]
