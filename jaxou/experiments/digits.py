"""Digits: domain adaptation on scikit-learn's bundled handwritten digits (1797 8×8
images, nothing downloaded).

Domains — a sub-population split on a real feature, the ink of an image (the sum of
its pixel intensities, which tracks stroke thickness: its correlation with the pixel
standard deviation is 0.84–0.90 within a class). Within each digit class, the 35 %
of images with the most ink form the target domain, the rest the source. The split
is made within classes, so that both domains hold every digit in the same
proportions: the shift is a covariate shift (thick against thin strokes, a natural
variation between writers), not a label shift. PCA features are fitted on the source
only and standardised with the source's scale; the target's training sample (the
fine-tuning set) is small, the rest of the target is held out.

Models — (1) multinomial logistic regression on `pca` features with class 0 as the
reference class (its logit is 0, which removes the softmax's null direction, where C
would be singular) and L2 regularisation `reg` (so that H ⪰ reg·I): the dense path;
(2) a one-hidden-layer tanh MLP on `mlp_pca` features: the operator path (Lanczos +
Hutchinson Hessian, sketched noise covariance, both diagonal plus low rank), checked
against dense computations, which its size still allows. `jaxou experiment
digits-mlp` runs a network of 126,090 parameters through the operator path alone.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

TITLE = "digits: thin-stroke → thick-stroke handwritten digits (scikit-learn load_digits)"

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "seeds": 1024,
        "pca": 8,
        "n_target_train": 250,
        "grid_lr_lambda": (0.05, 0.15, 0.45),  # lr × λ_max(H_T)
        "grid_batch": (8, 32),
        "large_lr_lambda": 1.6,
        "mlp_pca": 16,
        "mlp_hidden": 32,
        "mlp_k": 20,
        "mlp_probes": 100,
        "mlp_seeds": 384,
        "mlp_max_steps": 1500,
        "mlp_train_steps": 400,
    },
    "quick": {
        "seeds": 160,
        "pca": 6,
        "n_target_train": 250,
        "grid_lr_lambda": (0.1, 0.4),
        "grid_batch": (8,),
        "large_lr_lambda": 1.6,
        "mlp_pca": 6,
        "mlp_hidden": 6,
        "mlp_k": 8,
        "mlp_probes": 30,
        "mlp_seeds": 96,
        "mlp_max_steps": 300,
        "mlp_train_steps": 120,
    },
}

REG = 0.03  # L2 strength: H ⪰ REG·I
INIT_STD = 0.1  # the initialisation law N(0, INIT_STD² I)
DELTA = 0.05  # PAC-Bayes confidence
TARGET_FRACTION = 0.35
N_CLASSES = 10


def ink_split(n_target_train: int, rng: np.random.Generator) -> dict:
    """The pixels `x` [1797, 64] in [0, 1] (intensities / 16), the labels `y`, the
    index sets `source`, `target_train`, `target_test` of the thin/thick-stroke
    split, and a description `info`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = digits.data / 16.0
    y = digits.target.astype(np.int32)
    ink = X.sum(1)
    target = np.zeros(len(y), bool)
    for c in range(N_CLASSES):
        idx = np.flatnonzero(y == c)
        cut = np.quantile(ink[idx], 1 - TARGET_FRACTION)
        target[idx[ink[idx] > cut]] = True
    t_idx = rng.permutation(np.flatnonzero(target))
    return {
        "x": X,
        "y": y,
        "source": np.flatnonzero(~target),
        "target_train": t_idx[:n_target_train],
        "target_test": t_idx[n_target_train:],
        "info": {
            "n_source": int((~target).sum()),
            "n_target_train": min(n_target_train, len(t_idx)),
            "n_target_test": max(len(t_idx) - n_target_train, 0),
            "mean_ink_source": float(ink[~target].mean()),
            "mean_ink_target": float(ink[target].mean()),
        },
    }


def load_domains(n_pca: int, n_target_train: int, rng: np.random.Generator) -> dict:
    """Source, target-train and target-test samples of `n_pca` PCA features (fitted
    and standardised on the source), and a description of the split."""
    split = ink_split(n_target_train, rng)
    X, y = split["x"], split["y"]
    Xs = X[split["source"]]
    mu = Xs.mean(0)
    _, _, Vt = np.linalg.svd(Xs - mu, full_matrices=False)
    P = Vt[:n_pca].T
    Zs = (Xs - mu) @ P
    scale = Zs.std(0)
    feats = lambda A: ((A - mu) @ P) / scale  # noqa: E731
    tr, te = split["target_train"], split["target_test"]
    return {
        "source": (feats(Xs), y[split["source"]]),
        "target_train": (feats(X[tr]), y[tr]),
        "target_test": (feats(X[te]), y[te]),
        "info": {
            **split["info"],
            "pca_features": n_pca,
            "pca_variance_explained_source": float(np.sum(Zs.var(0)) / np.sum((Xs - mu).var(0))),
        },
    }


# ---------------------------------------------------------------------------
# Models.


def _logits(jnp, W, b, x):
    z = x @ W + b
    return jnp.concatenate([jnp.zeros(z.shape[:-1] + (1,), z.dtype), z], -1)


def logistic_loss(params, x, y):
    import jax
    import jax.numpy as jnp

    logits = _logits(jnp, params["W"], params["b"], x)
    reg = 0.5 * REG * (jnp.sum(params["W"] ** 2) + jnp.sum(params["b"] ** 2))
    return -jax.nn.log_softmax(logits)[y] + reg


def logistic_predict(params, x):
    import jax.numpy as jnp

    return jnp.argmax(_logits(jnp, params["W"], params["b"], x), -1)


def mlp_loss(params, x, y):
    import jax
    import jax.numpy as jnp

    h = jnp.tanh(x @ params["W1"] + params["b1"])
    logits = _logits(jnp, params["W2"], params["b2"], h)
    reg = 0.5 * REG * sum(jnp.sum(v**2) for v in params.values())
    return -jax.nn.log_softmax(logits)[y] + reg


def mlp_predict(params, x):
    import jax.numpy as jnp

    h = jnp.tanh(x @ params["W1"] + params["b1"])
    return jnp.argmax(_logits(jnp, params["W2"], params["b2"], h), -1)


def _zero_one(predict, unravel):
    """errors(thetas [S, d], x, y) -> [S] 0-1 risks, one compiled program per shape."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def errors(thetas, x, y):
        return jax.vmap(lambda t: jnp.mean(predict(unravel(t), x) != y))(thetas)

    return errors


# ---------------------------------------------------------------------------
# The study.


def run(*, quick: bool = False, seeds: int | None = None, progress=None) -> tuple[dict, dict]:
    """Run the study; returns `(report, figures)`, figures as PNG bytes by name."""
    import jax
    import jax.numpy as jnp
    from scipy.stats import spearmanr

    import jaxou

    from ._analysis import (
        compare_law,
        discrete_marginal,
        excess_kurtosis,
        plot_covariances,
        plot_grid,
    )

    size = dict(SIZES["quick" if quick else "full"])
    if seeds is not None:
        size["seeds"] = seeds
    S = size["seeds"]
    step = progress if progress is not None else _NullProgress()
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    data = load_domains(size["pca"], size["n_target_train"], rng)
    src, ttr, tte = data["source"], data["target_train"], data["target_test"]
    p = size["pca"]
    n_t = data["info"]["n_target_train"]
    report: dict[str, Any] = {
        "experiment": "digits",
        "title": TITLE,
        "size": "quick" if quick else "full",
        "settings": {**size, "reg": REG, "init_std": INIT_STD, "delta": DELTA},
        "data": data["info"],
        "domain_choice": (
            "sub-population split on a real feature: within each digit class the "
            f"{TARGET_FRACTION:.0%} of images with the most ink (thick strokes) are the "
            "target; covariate shift with identical class proportions"
        ),
        "loss_for_bounds": "0-1 loss (misclassification), in [0, 1]",
    }

    # -- 1. Estimate both stages of the dense model ---------------------------
    params0 = {"W": jnp.zeros((p, N_CLASSES - 1)), "b": jnp.zeros(N_CLASSES - 1)}
    with step(f"logistic regression (d = {p * 9 + 9}): minima, H and C of both domains"):
        m_s = jaxou.train_to_minimum(logistic_loss, params0, src, steps=200)
        m_t = jaxou.train_to_minimum(logistic_loss, m_s.params, ttr, steps=200)
        theta_s, unravel = jaxou.flatten_params(m_s.params)
        theta_t, _ = jaxou.flatten_params(m_t.params)
        H_s, C_s = _dense_estimates(jaxou, logistic_loss, m_s.params, src)
        H_t, C_t = _dense_estimates(jaxou, logistic_loss, m_t.params, ttr)
        G_s = np.asarray(jaxou.per_example_grads(logistic_loss, m_s.params, src))
        G_t = np.asarray(jaxou.per_example_grads(logistic_loss, m_t.params, ttr))
    d = theta_s.size
    errors = _zero_one(logistic_predict, unravel)
    ls, lt = np.linalg.eigvalsh(H_s), np.linalg.eigvalsh(H_t)
    th_s, th_t = np.asarray(theta_s), np.asarray(theta_t)
    report["dense_model"] = {
        "dim": d,
        "grad_norm_source_minimum": m_s.grad_norm,
        "grad_norm_target_minimum": m_t.grad_norm,
        "hessian_eig_source": [ls[0], ls[-1]],
        "hessian_eig_target": [lt[0], lt[-1]],
        "noise_cov_eig_source": np.linalg.eigvalsh(C_s)[[0, -1]],
        "noise_cov_eig_target": np.linalg.eigvalsh(C_t)[[0, -1]],
        "minimum_shift_norm": np.linalg.norm(th_t - th_s),
        "target_test_error_source_minimum": errors(theta_s[None], *tte)[0],
        "target_test_error_target_minimum": errors(theta_t[None], *tte)[0],
        "source_train_error_source_minimum": errors(theta_s[None], *src)[0],
        "gradient_noise": {
            **_noise_normality(G_s, C_s, "source", excess_kurtosis),
            **_noise_normality(G_t, C_t, "target", excess_kurtosis),
        },
    }

    # -- 2. Pre-training: real SGD on the source, many seeds --------------------
    lr_s = 0.2 / ls[-1]
    b_s = 32
    steps_s = int(math.ceil(8 / (lr_s * ls[0])))
    stage_s = jaxou.SGDStage(H_s, C_s, th_s, lr_s, b_s)
    init = jaxou.Gaussian.isotropic(jnp.zeros(d), INIT_STD)
    key, k0, k1 = jax.random.split(key, 3)
    theta0 = INIT_STD * jax.random.normal(k0, (S, d), theta_s.dtype)
    with step(f"pre-training: SGD on the source, {S} seeds × {steps_s} steps"):
        pre = np.asarray(
            jaxou.sample_sgd(
                logistic_loss,
                theta0,
                src,
                unravel=unravel,
                lr=lr_s,
                batch_size=b_s,
                steps=steps_s,
                key=k1,
            )
        )
    pre_law = stage_s.marginal(init, lr_s * steps_s)
    dm, dc = discrete_marginal(
        H_s, C_s, th_s, lr_s, b_s, np.zeros(d), INIT_STD**2 * np.eye(d), steps_s
    )
    report["pretrain"] = {
        "lr": lr_s,
        "batch_size": b_s,
        "steps": steps_s,
        "lr_times_lambda_max": lr_s * ls[-1],
        "ou_prediction": compare_law(pre, pre_law.mean, pre_law.cov, rng=rng),
        "discrete_quadratic_prediction": compare_law(pre, dm, dc, rng=rng),
    }

    # -- 3. Fine-tuning over a grid of lr/B ------------------------------------
    grid = [(a, b, False) for b in size["grid_batch"] for a in size["grid_lr_lambda"]]
    grid.append((size["large_lr_lambda"], min(size["grid_batch"]), True))
    t_ft = 2.0 / lt[0]  # continuous time of fine-tuning: e^{-2} of the slowest mode left
    points = []
    panels = []
    hess_at = _hessian_at(logistic_loss, unravel, ttr)
    for i, (a, b, large) in enumerate(grid):
        lr = a / lt[-1]
        steps = int(math.ceil(t_ft / lr))
        key, k2, k3 = jax.random.split(key, 3)
        with step(
            f"fine-tuning {i + 1}/{len(grid)}: lr·λmax = {a:g}, B = {b}, {S} seeds × {steps} steps"
        ):
            fine = np.asarray(
                jaxou.sample_sgd(
                    logistic_loss,
                    pre,
                    ttr,
                    unravel=unravel,
                    lr=lr,
                    batch_size=b,
                    steps=steps,
                    key=k2,
                )
            )
            stage_t = jaxou.SGDStage(H_t, C_t, th_t, lr, b)
            model = jaxou.TwoStage(init, stage_s, stage_t, lr_s * steps_s, lr * steps)
            prior, post = model.laws()
            dm2, dc2 = discrete_marginal(H_t, C_t, th_t, lr, b, dm, dc, steps)
            point = _grid_point(
                jaxou, fine, prior, post, dc2, dm2, errors, ttr, tte, n_t, k3, rng, lr, b
            )
            point.update(
                lr=lr,
                batch_size=b,
                steps=steps,
                lr_times_lambda_max=a,
                large_lr=large,
                t_finetune=lr * steps,
                discrete_quadratic_prediction=compare_law(fine, dm2, dc2, rng=rng),
                finite_discrete_stationary=bool(a < 2),
            )
            # Non-quadratic regions: how much the Hessian changes where SGD is.
            H_here = np.asarray(hess_at(jnp.asarray(fine[:4])))
            point["hessian_rel_change_at_samples"] = float(
                np.mean([np.linalg.norm(h - H_t) / np.linalg.norm(H_t) for h in H_here])
            )
            kurt, kse = excess_kurtosis((fine - fine.mean(0)) @ _top(post.cov, 3))
            point["sample_excess_kurtosis_top3"] = kurt
            point["sample_excess_kurtosis_se"] = kse
        points.append(point)
        if i == 0 or large:
            panels.append(
                (
                    f"fine-tuned, lr·λmax = {a:g}, B = {b}",
                    fine,
                    np.asarray(post.mean),
                    np.asarray(post.cov),
                    dc2,
                )
            )
    report["finetune_grid"] = points
    report["finetune_summary"] = _summarise_grid(points, spearmanr)
    report["domain_discrepancy_reference"] = _discrepancy(jaxou, stage_s, H_t, C_t, th_t, points)

    # -- 4. The operator path: an MLP ------------------------------------------
    with step("MLP: operator estimation and SGD"):
        report["mlp"], mlp_panel = _mlp_study(size, rng, key, step)
    panels.append(mlp_panel)

    report["ou_model_failures"] = _failures(report)
    report["elapsed_s"] = time.perf_counter() - t_start
    figures = {"covariances.png": plot_covariances(panels, TITLE)}
    gap_png, bound_png = plot_grid(points, TITLE)
    figures["gap_vs_lr_over_b.png"] = gap_png
    figures["bound_vs_gap.png"] = bound_png
    return report, figures


class _NullProgress:
    def __call__(self, _):
        import contextlib

        return contextlib.nullcontext()


def _top(cov, k):
    lam, V = np.linalg.eigh(np.asarray(cov))
    return V[:, ::-1][:, :k]


def _noise_normality(G, C, name, excess_kurtosis) -> dict:
    """Excess kurtosis of the per-example gradients along the top 5 eigenvectors of C
    (0 for Gaussian noise), and what it becomes for a mini-batch mean of B (κ/B)."""
    Gc = G - G.mean(0)
    k, se = excess_kurtosis(Gc @ _top(C, 5))
    return {
        f"{name}_per_example_excess_kurtosis_top5": k,
        f"{name}_excess_kurtosis_se_if_gaussian": se,
        f"{name}_per_example_excess_kurtosis_max": float(np.max(k)),
    }


def _dense_estimates(jaxou, loss, params, data) -> tuple[np.ndarray, np.ndarray]:
    """The dense H and C at `params`, as NumPy arrays."""
    H = jaxou.estimate_hessian(loss, params, data, jaxou.DenseHessian())
    C = jaxou.estimate_noise_cov(loss, params, data, jaxou.DenseNoise())
    return np.asarray(H.as_matrix()), np.asarray(C.as_matrix())


def _hessian_at(loss, unravel, data):
    import jax
    import jax.numpy as jnp

    x, y = data

    @jax.jit
    def hessians(thetas):
        L = lambda t: jnp.mean(jax.vmap(lambda a, b: loss(unravel(t), a, b))(x, y))  # noqa: E731
        return jax.vmap(jax.hessian(L))(thetas)

    return hessians


def _grid_point(jaxou, fine, prior, post, dc2, dm2, errors, ttr, tte, n_t, key, rng, lr, b):
    import jax

    from ._analysis import compare_law

    ou = compare_law(fine, post.mean, post.cov, rng=rng)
    train_sgd = np.asarray(errors(fine, *ttr))
    test_sgd = np.asarray(errors(fine, *tte))
    gaps = test_sgd - train_sgd
    S = fine.shape[0]
    # Q, the OU law for which the bound is a theorem: risks from samples of Q.
    q = np.asarray(
        post.mean + jax.random.normal(key, fine.shape, fine.dtype) @ np.linalg.cholesky(post.cov).T
    )
    train_q = float(np.mean(errors(q, *ttr)))
    test_q = float(np.mean(errors(q, *tte)))
    kl = float(jaxou.kl(post, prior))
    bound = lambda r, kind: float(  # noqa: E731
        jaxou.pac_bayes_bound(kl, n_t, DELTA, empirical_risk=r, kind=kind)
    )
    out = {
        "lr_over_b": lr / b,
        "ou_prediction": ou,
        "kl_posterior_prior": kl,
        "train_risk_sgd": train_sgd.mean(),
        "test_risk_sgd": test_sgd.mean(),
        "gap_sgd": gaps.mean(),
        "gap_sgd_se": gaps.std(ddof=1) / math.sqrt(S),
        "train_risk_q": train_q,
        "test_risk_q": test_q,
        "gap_q": test_q - train_q,
        "bound_kl": bound(train_q, "kl"),
        "bound_mcallester": bound(train_q, "mcallester"),
        "bound_kl_with_sgd_train_risk": bound(float(train_sgd.mean()), "kl"),
    }
    out["bound_holds_q"] = bool(test_q <= out["bound_kl"])
    out["bound_holds_sgd"] = bool(out["test_risk_sgd"] <= out["bound_kl_with_sgd_train_risk"])
    out["bound_minus_test_risk_q"] = out["bound_kl"] - test_q
    out["bound_over_test_risk_q"] = out["bound_kl"] / max(test_q, 1e-12)
    out["bound_minus_gap_sgd"] = out["bound_kl"] - out["gap_sgd"]
    return out


def _summarise_grid(points, spearmanr) -> dict:
    x = [q["lr_over_b"] for q in points]
    gap = [q["gap_sgd"] for q in points]
    bound = [q["bound_kl"] for q in points]
    small = [i for i, q in enumerate(points) if not q["large_lr"]]

    def rho(a, b):
        r = spearmanr(a, b)
        return {"rho": float(r.statistic), "p_value": float(r.pvalue), "n": len(a)}

    return {
        "spearman_lr_over_b_vs_gap": rho(x, gap),
        "spearman_bound_vs_gap": rho(bound, gap),
        "spearman_lr_over_b_vs_gap_small_lr_only": rho(
            [x[i] for i in small], [gap[i] for i in small]
        ),
        "spearman_bound_vs_gap_small_lr_only": rho(
            [bound[i] for i in small], [gap[i] for i in small]
        ),
        "bound_holds_all_q": all(q["bound_holds_q"] for q in points),
        "bound_holds_all_sgd": all(q["bound_holds_sgd"] for q in points),
        "bound_over_test_risk_q_range": [
            min(q["bound_over_test_risk_q"] for q in points),
            max(q["bound_over_test_risk_q"] for q in points),
        ],
    }


def _discrepancy(jaxou, stage_s, H_t, C_t, th_t, points) -> dict:
    ref = points[0]
    stage_t = jaxou.SGDStage(H_t, C_t, th_t, ref["lr"], ref["batch_size"])
    stage_s2 = jaxou.SGDStage(
        stage_s.hessian, stage_s.noise_cov, stage_s.minimum, ref["lr"], ref["batch_size"]
    )
    parts = jaxou.domain_discrepancy(stage_s2, stage_t)
    return {
        "lr": ref["lr"],
        "batch_size": ref["batch_size"],
        "total": parts.total,
        "covariance": parts.covariance,
        "shift": parts.shift,
    }


def _mlp_study(size, rng, key, step) -> tuple[dict, tuple]:
    import jax
    import jax.numpy as jnp

    import jaxou

    from ._analysis import compare_law

    data = load_domains(size["mlp_pca"], size["n_target_train"], np.random.default_rng(0))
    src, ttr = data["source"], data["target_train"]
    p, h, k = size["mlp_pca"], size["mlp_hidden"], size["mlp_k"]
    ks = jax.random.split(key, 6)
    params0 = {
        "W1": jax.random.normal(ks[0], (p, h)) / math.sqrt(p),
        "b1": jnp.zeros(h),
        "W2": jax.random.normal(ks[1], (h, N_CLASSES - 1)) / math.sqrt(h),
        "b2": jnp.zeros(N_CLASSES - 1),
    }
    n_train = size["mlp_train_steps"]
    m_s = jaxou.train_to_minimum(mlp_loss, params0, src, steps=n_train)
    m_t = jaxou.train_to_minimum(mlp_loss, m_s.params, ttr, steps=n_train)
    theta_s, unravel = jaxou.flatten_params(m_s.params)
    d = theta_s.size
    H, C = _dense_estimates(jaxou, mlp_loss, m_t.params, ttr)
    theta_t, _ = jaxou.flatten_params(m_t.params)
    est = jaxou.estimate_stage(
        mlp_loss,
        m_t.params,
        ttr,
        jaxou.LanczosHessian(rank=k, probes=size["mlp_probes"], floor=REG),
        jaxou.SketchedNoise(rank=k),
        lr=1.0,  # the stage's lr and B are not used here
        batch_size=1.0,
        train_steps=0,
        key=ks[2],
    )
    Hs, Cs = est.stage.hessian, est.stage.noise_cov
    lam = np.linalg.eigvalsh(H)[::-1]
    lc = np.linalg.eigvalsh(C)[::-1]
    V = np.linalg.eigh(H)[1][:, ::-1][:, :k]
    resid = np.diag(H - (V * lam[:k]) @ V.T)
    stderr = np.asarray(est.hessian_stderr)
    resolved = np.asarray(Hs.diagonal) >= stderr  # the floor rule left these as measured
    z = (np.asarray(Hs.diagonal) - resid)[resolved] / stderr[resolved]
    Hd, Cd = np.asarray(Hs.as_matrix()), np.asarray(Cs.as_matrix())
    out: dict[str, Any] = {
        "dim": d,
        "hidden": h,
        "pca_features": p,
        "grad_norm_source_minimum": m_s.grad_norm,
        "grad_norm_target_minimum": m_t.grad_norm,
        "hessian_min_eig_dense": lam[-1],
        "hessian_max_eig_dense": lam[0],
        "lanczos_k": k,
        "lanczos_top_rel_err_max": float(
            np.max(np.abs(np.diag(np.asarray(Hs.core)) - lam[:k]) / lam[:k])
        ),
        "hessian_trace_fraction_top_k": float(lam[:k].sum() / lam.sum()),
        "hutchinson_probes": size["mlp_probes"],
        "hutchinson_residual_diag_z_abs_max": float(np.max(np.abs(z))),
        "hutchinson_residual_diag_z_rms": float(np.sqrt(np.mean(z**2))),
        "hutchinson_floored_entries": est.hessian_floored,
        "operator_hessian_rel_frobenius": np.linalg.norm(Hd - H) / np.linalg.norm(H),
        "sketched_noise_top_rel_err_max": float(
            np.max(np.abs(np.diag(np.asarray(Cs.core)) - lc[:k]) / lc[:k])
        ),
        "noise_cov_trace_fraction_top_k": float(lc[:k].sum() / lc.sum()),
        "operator_noise_cov_rel_frobenius": np.linalg.norm(Cd - C) / np.linalg.norm(C),
    }
    # Real SGD: fine-tune from the source minimum, many seeds.
    lr = 0.2 / lam[0]
    b = 16
    steps = int(min(math.ceil(2.0 / (lr * lam[-1])), size["mlp_max_steps"]))
    S = size["mlp_seeds"]
    start = jnp.broadcast_to(theta_s, (S, d))
    samples = np.asarray(
        jaxou.sample_sgd(
            mlp_loss, start, ttr, unravel=unravel, lr=lr, batch_size=b, steps=steps, key=ks[4]
        )
    )
    point = jaxou.Gaussian.point(theta_s)
    out.update(lr=lr, batch_size=b, steps=steps, seeds=S, lr_times_lambda_max=lr * lam[0])
    dense_law = jaxou.SGDStage(H, C, theta_t, lr, b).marginal(point, lr * steps)
    Pj = _top(dense_law.cov, min(10, d))
    out["projection"] = "top-10 eigenvectors of the predicted (dense) covariance"
    out["ou_prediction_dense"] = compare_law(
        samples, dense_law.mean, dense_law.cov, rng=rng, project=Pj
    )
    try:  # the same law from the operators (Lanczos H, sketched C)
        s_law = jaxou.SGDStage(Hs, Cs, theta_t, lr, b).marginal(point, lr * steps)
        out["ou_prediction_operator"] = compare_law(
            samples, s_law.mean, s_law.cov_matrix(), rng=rng, project=Pj
        )
        out["operator_stage_error"] = None
    except ValueError as err:
        out["ou_prediction_operator"] = None
        out["operator_stage_error"] = " ".join(str(err).split())
    panel = (
        f"MLP (d = {d}), fine-tuned, top-10 subspace",
        samples @ Pj,
        np.asarray(dense_law.mean) @ Pj,
        Pj.T @ np.asarray(dense_law.cov) @ Pj,
        None,
    )
    return out, panel


def _failures(report) -> list[str]:
    """Where the OU model's predictions miss, in numbers (no thresholds tuned: each
    miss is stated against the sampling floor of the same statistic)."""
    notes = []
    for i, q in enumerate(report["finetune_grid"]):
        ou = q["ou_prediction"]
        floor = ou["cov_rel_frobenius_sampling_floor"]
        tag = f"grid point {i} (lr·λmax = {q['lr_times_lambda_max']:.3g}, B = {q['batch_size']})"
        if ou["cov_rel_frobenius"] > 2 * floor:
            notes.append(
                f"{tag}: covariance relative Frobenius error {ou['cov_rel_frobenius']:.3g} "
                f"vs sampling floor {floor:.3g}; discrete-time quadratic model "
                f"{q['discrete_quadratic_prediction']['cov_rel_frobenius']:.3g}; "
                f"Hessian changes by {q['hessian_rel_change_at_samples']:.3g} (relative) "
                "where the samples are"
            )
        if abs(ou["mean_offset_chi2_z"]) > 5:
            notes.append(f"{tag}: mean offset χ² z-score {ou['mean_offset_chi2_z']:.3g}")
        if not q["bound_holds_q"]:
            notes.append(f"{tag}: the PAC-Bayes bound fails on held-out data")
    g = report["dense_model"]["gradient_noise"]
    for name in ("source", "target"):
        kmax = g[f"{name}_per_example_excess_kurtosis_max"]
        se = g[f"{name}_excess_kurtosis_se_if_gaussian"]
        notes.append(
            f"{name} per-example gradient noise: max excess kurtosis along the top-5 "
            f"noise directions {kmax:.3g} (0 for Gaussian; SE {se:.2g}); "
            "a mini-batch mean of B divides it by B"
        )
    return notes
