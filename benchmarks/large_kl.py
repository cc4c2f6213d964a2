"""KL between two stationary laws of the large-scale problem (d = 2,000, h spread over
10^3, k = 20, m = 50, 10 % of c zero) from LowRankADI, against the dense computation
(SciPy Lyapunov solves + jaxou.kl_parts), for the default tolerance and rtol = 1e-6,
1e-10. Prints the KL, its relative error and the time. About 8 minutes on 2 cores.

    OPENBLAS_NUM_THREADS=1 python benchmarks/large_kl.py
"""

import argparse
import time

import jax
import numpy as np
import scipy.linalg as sl

argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
).parse_args()  # no options: --help prints the above instead of starting the run
jax.config.update("jax_enable_x64", True)
import jaxou  # noqa: E402  (after x64 is switched on)

d, k, m = 2000, 20, 50
rng = np.random.default_rng(0)


def problem(scale):
    h = np.exp(rng.uniform(np.log(1e-3), 0, d))
    h[:2] = [1e-3, 1.0]
    U = np.linalg.qr(rng.standard_normal((d, k)))[0]
    H = jaxou.DiagonalPlusLowRank(h, U, np.diag(np.logspace(0, -2, k) * scale))
    return H


c = rng.uniform(0.5, 1.0, d)
c[rng.choice(d, d // 10, replace=False)] = 0
Z = rng.standard_normal((d, m)) / np.sqrt(m)
C = jaxou.DiagonalPlusLowRank(c, Z)
H1, H2 = problem(1.0), problem(2.0)
t0 = time.time()
s1 = jaxou.SGDStage(H1, C, np.zeros(d), 0.05, 32.0)
s2 = jaxou.SGDStage(H2, C, 0.01 * np.ones(d), 0.02, 16.0)
p1, p2 = s1.stationary(), s2.stationary()
parts = jaxou.kl_parts(p2, p1)
print("operator", parts, time.time() - t0, p1.cov.rank, p2.cov.rank)
t0 = time.time()
X1 = sl.solve_continuous_lyapunov(np.asarray(H1.as_matrix()), 0.05 / 32 * np.asarray(C.as_matrix()))
X2 = sl.solve_continuous_lyapunov(np.asarray(H2.as_matrix()), 0.02 / 16 * np.asarray(C.as_matrix()))
X1 = (X1 + X1.T) / 2
X2 = (X2 + X2.T) / 2
print("cond", np.linalg.cond(X1))
ref = jaxou.kl_parts(jaxou.Gaussian(0.01 * np.ones(d), X2), jaxou.Gaussian(np.zeros(d), X1))
print("dense", ref, time.time() - t0)
print(
    "rel err total",
    abs(float(parts.total) - float(ref.total)) / float(ref.total),
    "cov",
    abs(float(parts.covariance) - float(ref.covariance)) / float(ref.covariance),
    "shift",
    abs(float(parts.shift) - float(ref.shift)) / float(ref.shift),
)
for rtol in (1e-6, 1e-10):
    s1 = jaxou.SGDStage(H1, C, np.zeros(d), 0.05, 32.0, solver=jaxou.LowRankADI(rtol=rtol))
    s2 = jaxou.SGDStage(H2, C, 0.01 * np.ones(d), 0.02, 16.0, solver=jaxou.LowRankADI(rtol=rtol))
    t0 = time.time()
    q = jaxou.kl_parts(s2.stationary(), s1.stationary())
    print(
        rtol,
        float(q.total),
        abs(float(q.total) - float(ref.total)) / float(ref.total),
        time.time() - t0,
    )
