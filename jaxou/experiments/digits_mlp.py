"""Digits with a network of 126,090 parameters: the two-stage model of a real network,
measured and tested through the operator path alone (no d × d matrix anywhere).

Data — scikit-learn's digits, the thin-stroke/thick-stroke split of
`jaxou experiment digits` (`digits.ink_split`), on the raw 64 pixels in [0, 1]: the
weights fed by always-blank pixels get no gradient from any example, so the noise
covariance has exact zeros on its diagonal.

Model — a tanh MLP 64 → 384 → 256 → 10 (126,090 parameters) with softmax
cross-entropy and an L2 penalty `REG`/2 |θ|². Pre-trained to its minimum θ*_S on the
source by full-batch L-BFGS, then fine-tuned to θ*_T on the target's training sample.

The chain, every matrix an operator:

1. H_S, C_S at θ*_S and H_T, C_T at θ*_T: `jaxou.LanczosHessian` (top eigenpairs plus
   Hutchinson's diagonal with standard errors); C_T by `jaxou.ExactNoise` (the exact
   factor of the 250 centred per-example gradients, zero diagonal part), C_S by
   `jaxou.SketchedNoise` (rank 100 plus the exact residual diagonal: the exact factor
   of the 1,174 source gradients would make each stationary solve's right-hand side
   1,214 columns wide, past 16 GB at this size).
2. Real SGD over many seeds of the network (one vmapped, compiled program per batch
   size, data as arguments, float32): pre-training on the source from N(θ*_S, σ₀² I)
   for a time T₁, then fine-tuning on the target for T₂ over a grid of (lr, B).
3. The OU model's laws (`SGDStage.marginal`, `TwoStage`): the predicted variance of
   the SGD iterates along the top Hessian directions and along random directions,
   against the empirical one, with the sampling floor (a perfect prediction's
   relative error, √(2/(S−1)) for S seeds).
4. The fine-tuning term of the two-stage bound (PAC-Bayes kl-bound on the target's
   0-1 risk, prior the pre-trained law: `jaxou.kl_parts` of the laws of step 3 and
   `jaxou.pac_bayes_bound`, checked against the whole `jaxou.two_stage_bound` at the
   first setting) and `jaxou.domain_discrepancy` (KL between the laws the two stages
   reach from the common initial law in the same time; between the stationary laws
   at the first setting) against the measured generalization gap (held-out minus
   training 0-1 risk of the SGD seeds), with Spearman correlations over the grid.

Cost: every law of an operator stage at this size is a large-scale Lyapunov solve
(minutes at d = 126,090), so each setting computes three (its fine-tuned law and the
two laws of the discrepancy) and the reference setting four more.

The initial law N(θ*_S, σ₀² I) is centred at the source minimum, so the pre-training
term of the two-stage bound is not a valid PAC-Bayes bound on the source risk (its
prior depends on the source sample); the fine-tuning term is (its prior, the
pre-trained law, does not depend on the target sample).

Each step's time and peak memory (resident set, `resource.getrusage`) are reported.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any

import numpy as np

from . import digits

TITLE = "digits-mlp: a 126,090-parameter tanh MLP, thin → thick strokes, operators only"

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "hidden": (384, 256),
        "seeds": 256,
        "rank": 20,
        "probes": 100,
        "train_steps": 500,
        "grid_lr": (0.05, 0.1, 0.2, 0.4),  # lr × λ_max(H_T)
        "grid_batch": (8, 32, 128),
        "random_directions": 20,
        "source_noise_rank": 100,
        "target_noise_rank": None,  # None: the exact factor
        "pretrain_lr": 0.1,  # lr × λ_max(H_S)
        "pretrain_batch": 32,
    },
    "quick": {
        "hidden": (8, 8),
        "seeds": 64,
        "rank": 10,
        "probes": 30,
        "train_steps": 150,
        "grid_lr": (0.1, 0.4),
        "grid_batch": (8, 32, 128),
        "random_directions": 10,
        "source_noise_rank": 20,
        "target_noise_rank": 20,  # the exact factor's rank 249 ~ d/3 makes ADI slow
        "pretrain_lr": 0.1,
        "pretrain_batch": 32,
    },
}

REG = 1e-3  # L2 strength: the Hessian's diagonal gets REG from the penalty
INIT_STD = 1e-2  # σ₀ of the initial law N(θ*_S, σ₀² I)
T_MODES = 3.0  # each stage runs for T = T_MODES / λ_k (the k-th Hessian eigenvalue)
DELTA = 0.05
N_TARGET_TRAIN = 250
N_CLASSES = 10


# ---------------------------------------------------------------------------
# The network.


def mlp_init(key, hidden: tuple[int, ...], n_in: int = 64) -> dict:
    """LeCun-normal weights, zero biases: layers n_in → *hidden → 10."""
    import jax
    import jax.numpy as jnp

    sizes = (n_in, *hidden, N_CLASSES)
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"W{i}"] = jax.random.normal(keys[i], (a, b)) / math.sqrt(a)
        params[f"b{i}"] = jnp.zeros(b)
    return params


def mlp_logits(params, x):
    import jax.numpy as jnp

    n = len(params) // 2
    for i in range(n - 1):
        x = jnp.tanh(x @ params[f"W{i}"] + params[f"b{i}"])
    return x @ params[f"W{n - 1}"] + params[f"b{n - 1}"]


def mlp_loss(params, x, y):
    """Softmax cross-entropy of one example plus REG/2 |θ|²."""
    import jax
    import jax.numpy as jnp

    reg = 0.5 * REG * sum(jnp.sum(v**2) for v in jax.tree.leaves(params))
    return -jax.nn.log_softmax(mlp_logits(params, x))[y] + reg


def _zero_one(unravel):
    """errors(thetas [S, d], x, y) -> [S] 0-1 risks, one compiled program per shape."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def errors(thetas, x, y):
        wrong = lambda t: jnp.mean(jnp.argmax(mlp_logits(unravel(t), x), -1) != y)  # noqa: E731
        return jax.lax.map(wrong, thetas, batch_size=16)

    return errors


# ---------------------------------------------------------------------------
# Steps with their time and peak memory.


class _Steps:
    """Runs each step under the progress meter and records its wall time and the
    process's peak resident memory after it (`ru_maxrss`, which only grows)."""

    def __init__(self, progress):
        self.progress = progress
        self.rows: list[dict] = []

    def __call__(self, name: str):
        steps = self

        class _Step:
            def __enter__(self):
                self.inner = steps.progress(name)
                self.inner.__enter__()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB
                steps.rows.append(
                    {"step": name, "seconds": time.perf_counter() - self.t0, "peak_rss_mb": peak}
                )
                return self.inner.__exit__(*exc)

        return _Step()


class _NullProgress:
    def __call__(self, _):
        import contextlib

        return contextlib.nullcontext()


# ---------------------------------------------------------------------------
# The study.


def run(*, quick: bool = False, seeds: int | None = None, progress=None) -> tuple[dict, dict]:
    """Run the study; returns `(report, figures)`, figures as PNG bytes by name."""
    import jax

    size = dict(SIZES["quick" if quick else "full"])
    if seeds is not None:
        size["seeds"] = seeds
    steps = _Steps(progress if progress is not None else _NullProgress())
    t_start = time.perf_counter()
    key = jax.random.key(0)
    split = digits.ink_split(N_TARGET_TRAIN, np.random.default_rng(0))
    data = {
        name: (split["x"][split[name]], split["y"][split[name]])
        for name in ("source", "target_train", "target_test")
    }
    report: dict[str, Any] = {
        "experiment": "digits-mlp",
        "title": TITLE,
        "size": "quick" if quick else "full",
        "settings": {**size, "reg": REG, "init_std": INIT_STD, "delta": DELTA, "t_modes": T_MODES},
        "data": split["info"],
    }
    key, k0, k1, k2 = jax.random.split(key, 4)
    stages = _estimate_stages(size, data, k0, k1, steps, report)
    sgd = _Sampler(stages, data, size, steps)
    directions = {
        name: _directions(stages[name], size["random_directions"], k2)
        for name in ("source", "target")
    }
    report["pretrain"], pre = _pretrain(stages, sgd, directions["source"], size, steps, key)
    points, examples = [], []
    for i, (a, b) in enumerate((a, b) for b in size["grid_batch"] for a in size["grid_lr"]):
        key, k = jax.random.split(key)
        label = f"fine-tuning {i + 1}: lr·λmax = {a:g}, B = {b}, {size['seeds']} seeds"
        with steps(label):
            point, example = _finetune(
                stages, sgd, directions["target"], pre, a, b, k, reference=i == 0
            )
        points.append(point)
        examples.append(example)
    report["finetune_grid"] = points
    report["finetune_summary"] = _summary(points)
    report["steps"] = steps.rows
    report["elapsed_s"] = time.perf_counter() - t_start
    from ._analysis import plot_mlp_study

    figures = {"digits_mlp.png": plot_mlp_study(stages, examples, points, TITLE)}
    return report, figures


def _estimate_stages(size, data, key_init, key_est, steps, report) -> dict:
    """θ*, H, C of both stages (operators), with their diagnostics in `report`."""
    import jax

    import jaxou

    params0 = mlp_init(key_init, size["hidden"])
    out, params = {"solver": _solve_once(jaxou.LowRankADI())}, params0
    noise = {
        name: jaxou.ExactNoise() if rank is None else jaxou.SketchedNoise(rank=rank)
        for name, rank in (
            ("source", size["source_noise_rank"]),
            ("target", size["target_noise_rank"]),
        )
    }
    for name, sample in (("source", data["source"]), ("target", data["target_train"])):
        with steps(f"{name}: L-BFGS to the minimum ({size['train_steps']} steps)"):
            m = jaxou.train_to_minimum(mlp_loss, params, sample, steps=size["train_steps"])
            jax.block_until_ready(m.params)
        params = m.params
        key_est, k = jax.random.split(key_est)
        with steps(f"{name}: H (Lanczos + Hutchinson) and C ({type(noise[name]).__name__})"):
            est = jaxou.estimate_stage(
                mlp_loss,
                params,
                sample,
                jaxou.LanczosHessian(rank=size["rank"], probes=size["probes"], floor=REG),
                noise[name],
                lr=1.0,  # placeholders: each (lr, B) of the study builds its own stage
                batch_size=1.0,
                train_steps=0,
                key=k,
            )
            jax.block_until_ready(est.stage.hessian)
        out[name] = est
        report[f"{name}_stage"] = _stage_info(est, m, sample)
    out["n_source"] = int(data["source"][0].shape[0])
    out["n_target"] = int(data["target_train"][0].shape[0])
    report["dim"] = int(out["source"].stage.dim)
    report["minimum_shift_norm"] = float(
        np.linalg.norm(np.asarray(out["target"].stage.minimum - out["source"].stage.minimum))
    )
    return out


class _Memo:
    """Solutions kept by the identity of their (A, Q), with A and Q themselves (so
    that an identity is never reused while its entry lives)."""

    def __init__(self):
        self.solutions: dict = {}


def _solve_once(inner):
    """`inner` (a Lyapunov solver) wrapped to solve each (A, Q) once. Every (lr, B)
    of the grid needs the same equation H Σ + Σ H = C per stage (`SGDStage` solves
    for C and scales by lr/B), and every finite-time law of a stage needs it again;
    at d = 126,090 one `jaxou.LowRankADI` solve takes minutes. (Defined here, not at
    import, so that listing the studies does not load JAX.)"""
    import jaxou

    class SolveOnce(jaxou.AbstractLyapunovSolver):
        rtol: float | None
        inner: Any
        memo: _Memo

        def solve(self, A, Q):
            key = (id(A), id(Q))
            if key not in self.memo.solutions:
                self.memo.solutions[key] = (A, Q, self.inner.solve(A, Q))
            return self.memo.solutions[key][2]

    return SolveOnce(rtol=inner.rtol, inner=inner, memo=_Memo())


def _stage(stages, name: str, lr, batch_size):
    """The `jaxou.SGDStage` of `name`'s estimates at (lr, B), with the shared solver."""
    import jaxou

    est = stages[name].stage
    return jaxou.SGDStage(
        est.hessian, est.noise_cov, est.minimum, lr, batch_size, solver=stages["solver"]
    )


def _stage_info(est, m, sample) -> dict:
    H, C = est.stage.hessian, est.stage.noise_cov
    lam = np.asarray(np.diag(H.core))
    h, se = np.asarray(H.diagonal), np.asarray(est.hessian_stderr)
    c = np.asarray(C.diagonal_values())
    return {
        "n_examples": int(sample[0].shape[0]),
        "loss": float(m.loss),
        "grad_norm": float(est.grad_norm),
        "hessian_top_eigenvalues": lam,
        "hessian_diagonal_range": [float(h.min()), float(h.max())],
        "hutchinson_relative_stderr_median": float(np.median(se / np.abs(h))),
        "hutchinson_floored_entries": int(est.hessian_floored),
        "noise_rank": int(C.rank),
        "noise_trace": float(np.sum(c)),
        "noise_zero_diagonal_entries": int(np.sum(c == 0)),
    }


class _Sampler:
    """Real SGD on the network, float32, all seeds at once (`jaxou.sample_sgd`)."""

    def __init__(self, stages, data, size, steps):
        import jax
        import jax.numpy as jnp

        import jaxou

        params32 = jax.tree.map(
            lambda a: a.astype(jnp.float32),
            stages["source"].unravel(stages["source"].stage.minimum),
        )
        _, self.unravel = jaxou.flatten_params(params32)
        self.data = {k: (jnp.asarray(x, jnp.float32), jnp.asarray(y)) for k, (x, y) in data.items()}
        self.errors = _zero_one(self.unravel)

    def run(self, start, sample, lr, batch_size, n_steps, key):
        import jax.numpy as jnp

        import jaxou

        return jaxou.sample_sgd(
            mlp_loss,
            jnp.asarray(start, jnp.float32),
            self.data[sample],
            unravel=self.unravel,
            lr=lr,
            batch_size=batch_size,
            steps=n_steps,
            key=key,
        )

    def risks(self, thetas, sample) -> np.ndarray:
        return np.asarray(self.errors(thetas, *self.data[sample]), np.float64)


def _directions(target, n_random: int, key) -> dict:
    """Unit directions: the top Hessian eigenvectors of the target stage (the Lanczos
    factor) and `n_random` uniformly random ones."""
    import jax

    U = np.asarray(target.stage.hessian.factor)
    R = np.asarray(jax.random.normal(key, (U.shape[0], n_random), U.dtype))
    return {"top_hessian": U, "random": R / np.linalg.norm(R, axis=0)}


def _cov_columns(cov, V: np.ndarray) -> np.ndarray:
    """diag(Vᵀ Σ V) for a dense or operator covariance, without forming Σ."""
    import jax.numpy as jnp

    import jaxou

    SV = cov.mv(jnp.asarray(V)) if isinstance(cov, jaxou.AbstractOperator) else cov @ V
    return np.sum(V * np.asarray(SV), 0)


def compare_variances(samples: np.ndarray, law, V: np.ndarray) -> dict:
    """The variance of the seeds along each column of V against the law's
    vᵀΣv, with the sampling floor: for S Gaussian draws the sample variance has
    relative standard deviation √(2/(S−1)), so z = (ŝ²/σ² − 1)/√(2/(S−1)) is about
    N(0, 1) where the prediction is right; and the mean offset along v in standard
    errors."""
    X = np.asarray(samples, np.float64) @ V
    S = X.shape[0]
    empirical = X.var(0, ddof=1)
    predicted = _cov_columns(law.cov, V)
    floor = math.sqrt(2 / (S - 1))
    ratio = empirical / predicted
    z = (ratio - 1) / floor
    offset = (X.mean(0) - np.asarray(law.mean) @ V) / np.sqrt(predicted / S)
    return {
        "empirical": empirical,
        "predicted": predicted,
        "ratio": ratio,
        "ratio_median": float(np.median(ratio)),
        "sampling_floor_relative_sd": floor,
        "abs_log_ratio_median": float(np.median(np.abs(np.log(ratio)))),
        "z_abs_max": float(np.max(np.abs(z))),
        "fraction_within_2_floors": float(np.mean(np.abs(z) < 2)),
        "mean_offset_se_abs_max": float(np.max(np.abs(offset))),
    }


def _zero_diagonal(cov) -> int:
    """The number of zero entries in an operator covariance's diagonal part (0 for a
    dense one)."""
    import jaxou

    if isinstance(cov, jaxou.DiagonalPlusLowRank):
        return int(np.sum(np.asarray(cov.diagonal) <= 0))
    return 0


def _laws_or_error(fn):
    """`fn()`, or the error a solver gave (recorded in the report, not raised)."""
    try:
        return fn(), None
    except ValueError as err:
        return None, " ".join(str(err).split())


def _schedule(stage, a: float) -> tuple[float, int, float]:
    """(lr, steps, t) for lr = a/λ_max and a run of T_MODES/λ_k (λ_k the smallest
    Lanczos eigenvalue: the top directions forget where they started)."""
    lam = np.asarray(np.diag(stage.hessian.core))
    lr = a / float(lam.max())
    n = int(math.ceil(T_MODES / float(lam.min()) / lr))
    return lr, n, lr * n


def _pretrain(stages, sgd, directions, size, steps, key) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp

    import jaxou

    est = stages["source"].stage
    d = est.dim
    lr, n, t1 = _schedule(est, size["pretrain_lr"])
    b = size["pretrain_batch"]
    stage = _stage(stages, "source", lr, b)
    init = jaxou.Gaussian(est.minimum, jaxou.Diagonal(jnp.full(d, INIT_STD**2)))
    k0, k1 = jax.random.split(key)
    starts = est.minimum + INIT_STD * jax.random.normal(k0, (size["seeds"], d), est.minimum.dtype)
    with steps(f"pre-training: SGD on the source, {size['seeds']} seeds × {n} steps"):
        samples = np.asarray(sgd.run(starts, "source", lr, b, n, k1))
    with steps("pre-training: the predicted law (SGDStage.marginal)"):
        law, error = _laws_or_error(lambda: stage.marginal(init, t1))
    out = {"lr": lr, "batch_size": b, "steps": n, "t_pretrain": t1, "law_error": error}
    out["train_risk_sgd"] = float(sgd.risks(samples, "source").mean())
    if law is not None:
        out["variance_top_hessian"] = compare_variances(samples, law, directions["top_hessian"])
        out["variance_random"] = compare_variances(samples, law, directions["random"])
    return out, {
        "samples": samples,
        "law": law,
        "law_error": error,
        "stage": stage,
        "init": init,
        "t": t1,
    }


def _finetune(stages, sgd, directions, pre, a, b, key, reference) -> tuple[dict, tuple]:

    est_t = stages["target"].stage
    lr, n, t2 = _schedule(est_t, a)
    stage_t = _stage(stages, "target", lr, b)
    samples = np.asarray(sgd.run(pre["samples"], "target_train", lr, b, n, key))
    train, test = sgd.risks(samples, "target_train"), sgd.risks(samples, "target_test")
    gaps = test - train
    point: dict[str, Any] = {
        "lr": lr,
        "batch_size": b,
        "lr_times_lambda_max": a,
        "lr_over_b": lr / b,
        "steps": n,
        "t_finetune": t2,
        "train_risk_sgd": float(train.mean()),
        "test_risk_sgd": float(test.mean()),
        "gap_sgd": float(gaps.mean()),
        "gap_sgd_se": float(gaps.std(ddof=1) / math.sqrt(len(gaps))),
    }
    law, point["law_error"] = None, pre["law_error"]
    if pre["law"] is not None:
        law, point["law_error"] = _laws_or_error(lambda: stage_t.marginal(pre["law"], t2))
    variances = {}
    if law is not None:
        for name, V in directions.items():
            variances[name] = compare_variances(samples, law, V)
            point[f"variance_{name}"] = {
                k: v for k, v in variances[name].items() if np.ndim(v) == 0
            }
        point.update(_bound(law, pre["law"], stages["n_target"], point["train_risk_sgd"]))
    point.update(_discrepancy(stages, pre, stage_t, t2))
    if reference:
        point.update(_reference(stages, pre, stage_t, t2, point))
    return point, (f"lr·λmax = {a:g}, B = {b}", variances)


def _bound(fine, prior, n_target: int, train_risk: float) -> dict:
    """The fine-tuning term of the two-stage bound from the laws already computed:
    KL(fine-tuned ‖ pre-trained) and the kl-inversion PAC-Bayes bound with the SGD
    seeds' training risk (what `jaxou.two_stage_bound` computes, without solving the
    two laws again; checked against it at the reference setting)."""
    import jaxou

    parts = jaxou.kl_parts(fine, prior)
    bound = jaxou.pac_bayes_bound(
        parts.total, n_target, DELTA, empirical_risk=train_risk, kind="kl"
    )
    return {
        "finetune_bound": float(bound),
        "finetune_kl": float(parts.total),
        "finetune_kl_shift": float(parts.shift),
        "finetune_kl_covariance": float(parts.covariance),
    }


def _discrepancy(stages, pre, stage_t, t2) -> dict:
    """`jaxou.domain_discrepancy` between the laws the two stages reach from the
    common initial law in the same time t2 at this (lr, B): finite, where the
    stationary laws of a singular noise covariance need not share a support."""
    import jaxou

    stage_s = _stage(stages, "source", stage_t.lr, stage_t.batch_size)
    parts, error = _laws_or_error(
        lambda: jaxou.domain_discrepancy(
            stage_s.marginal(pre["init"], t2), stage_t.marginal(pre["init"], t2)
        )
    )
    out: dict[str, Any] = {"discrepancy_error": error}
    if parts is not None:
        out.update(
            discrepancy=float(parts.total),
            discrepancy_covariance=float(parts.covariance),
            discrepancy_shift=float(parts.shift),
        )
    return out


def _reference(stages, pre, stage_t, t2, point) -> dict:
    """At the first setting only (two more finite-time laws): the whole
    `jaxou.two_stage_bound` of the model, against the fine-tuning bound above, and
    the domain discrepancy of the stationary laws (`jaxou.domain_discrepancy`), where
    their covariances have a positive diagonal part."""
    import jaxou

    model = jaxou.TwoStage(pre["init"], pre["stage"], stage_t, pre["t"], t2)
    bound, error = _laws_or_error(
        lambda: jaxou.two_stage_bound(
            model,
            stages["n_source"],
            stages["n_target"],
            DELTA,
            empirical_risk_target=point["train_risk_sgd"],
            kind="kl",
        )
    )
    out: dict[str, Any] = {"two_stage_bound_error": error}
    if bound is not None:
        out["two_stage_bound"] = {
            "pretrain_kl": float(bound.pretrain_kl.total),
            "finetune_kl": float(bound.finetune_kl.total),
            "finetune_bound": float(bound.finetune_bound),
            "finetune_dominates": bool(bound.finetune_dominates),
        }
    laws, out["discrepancy_stationary_error"] = _laws_or_error(
        lambda: (
            _stage(stages, "source", stage_t.lr, stage_t.batch_size).stationary(),
            stage_t.stationary(),
        )
    )
    parts = None
    zeros = [_zero_diagonal(law.cov) for law in laws] if laws is not None else []
    if any(zeros):
        out["discrepancy_stationary_error"] = (
            f"not computed: the stationary covariances have {zeros[0]} (source) and "
            f"{zeros[1]} (target) zero entries in their diagonal parts (the split "
            "(η/B) diag(c/2h) + low rank, c = 0 where the noise model has no diagonal "
            "part), so the laws are singular or nearly so there"
        )
    elif laws is not None:
        parts, out["discrepancy_stationary_error"] = _laws_or_error(
            lambda: jaxou.domain_discrepancy(*laws)
        )
    if parts is not None:
        out["discrepancy_stationary"] = {
            "total": float(parts.total),
            "covariance": float(parts.covariance),
            "shift": float(parts.shift),
        }
    return out


def _summary(points) -> dict:
    from scipy.stats import spearmanr

    gap = [p["gap_sgd"] for p in points]

    def rho(field):
        xs = [p.get(field) for p in points]
        if any(x is None or not math.isfinite(x) for x in xs):
            return None
        if len(set(xs)) == 1:  # a saturated bound (1.0 at every setting) ranks nothing
            return {"rho": None, "p_value": None, "n": len(xs), "constant_value": xs[0]}
        r = spearmanr(xs, gap)
        return {"rho": float(r.statistic), "p_value": float(r.pvalue), "n": len(xs)}

    out = {
        f"spearman_{f}_vs_gap": rho(f)
        for f in (
            "lr_over_b",
            "finetune_bound",
            "finetune_kl",
            "discrepancy",
        )
    }
    bounds = [(p.get("finetune_bound"), p["test_risk_sgd"]) for p in points]
    if all(b is not None for b, _ in bounds):
        out["bound_holds_sgd_all"] = all(b >= r for b, r in bounds)
    for name in ("top_hessian", "random"):
        fr = [
            p[f"variance_{name}"]["fraction_within_2_floors"]
            for p in points
            if f"variance_{name}" in p
        ]
        if fr:
            out[f"variance_{name}_fraction_within_2_floors_mean"] = float(np.mean(fr))
    return out
