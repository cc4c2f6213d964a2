"""The `jaxou` command line: `jaxou run`, its configuration file, its outputs and
its error handling.

One subprocess runs the default problem end to end (module-scoped fixture); the
rest runs in-process through `jaxou._cli.main`, on a small problem whose shapes
are shared so that the compiled solve is reused.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import numpy as np
import pytest

import jaxou
from jaxou._cli import jsonable, main, write_atomic
from jaxou._config import SCHEMA, ConfigError, default_config, load_config, parse_override

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "default.toml"
FILES = ("summary.json", "arrays.npz", "stationary_laws.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A small problem: every successful in-process run uses d = 4 (one compilation).
SMALL = """
[problem]
dim = 4
seed = 3

[pretrain]
lr = 0.1
batch_size = 16
duration = 30.0
n_samples = 50000
hessian_min_eig = 0.05
hessian_max_eig = 2.0

[finetune]
lr = 0.02
batch_size = 8
duration = 5.0
n_samples = 200
shift = 0.2
rotation = 0.5
scale = 0.8
"""


def _cli(*argv: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from jaxou._cli import main; sys.exit(main())",
        *argv,
    ]


# ---------------------------------------------------------------------------
# The default problem, run once as a user would.


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "results"
    proc = subprocess.run(
        _cli("run", "--json", "--out", str(out)),
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path_factory.getbasetemp(),
    )
    return proc, out


def test_default_run_succeeds_and_writes_outputs(default_run):
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in FILES:
        assert (out / name).is_file(), name
    assert (out / "stationary_laws.png").read_bytes()[:8] == PNG_MAGIC
    # --json: stdout is exactly the JSON summary, the same as summary.json.
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    # Progress went to stderr.
    assert "solving" in proc.stderr and "plotting" in proc.stderr
    # No temporary files left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


def test_default_run_monte_carlo_check(default_run):
    """The default run samples both stages (exact OU sampler) and finds the empirical
    laws at the end of each stage in agreement with the analytic ones."""
    proc, _ = default_run
    mc = json.loads(proc.stdout)["monte_carlo"]
    assert mc["n_paths"] == 4096 and mc["method"] == "exact"
    assert mc["passed"] is True
    for stage in ("pretrained", "finetuned"):
        assert 0 < mc["kl"][stage] < mc["kl_threshold"]
    assert mc["max_z_mean"] < mc["z_threshold"] and mc["max_z_var"] < mc["z_threshold"]
    assert "Monte Carlo check" in proc.stderr


def test_monte_carlo_check_in_human_summary(tmp_path, capsys):
    code, captured, out = _run_small(tmp_path, capsys, SMALL, "--mc-paths", "512")
    assert code == 0, captured.err
    assert json.loads(captured.out)["monte_carlo"]["n_paths"] == 512
    code = main(["run", str(tmp_path / "small.toml"), "--out", str(out), "-q", "--mc-paths", "512"])
    text = capsys.readouterr().out
    assert code == 0
    assert "Monte Carlo check (512 paths, exact sampler" in text
    assert "largest deviation: mean" in text


def test_default_summary_fields(default_run):
    summary = json.loads(default_run[0].stdout)
    assert summary["jaxou_version"] == jaxou.__version__
    p = summary["problem"]
    assert p["dim"] == 50
    assert p["pretrain"]["lr"] == 0.05 and p["pretrain"]["batch_size"] == 128
    assert p["finetune"]["lr"] == 0.01 and p["finetune"]["batch_size"] == 32
    assert p["pretrain"]["n_samples"] == 10**6 and p["finetune"]["n_samples"] == 10**4
    # Finite durations by default (a Monte Carlo check simulates both stages).
    assert math.isfinite(p["pretrain"]["duration"]) and math.isfinite(p["finetune"]["duration"])
    assert p["pretrain"]["steps"] == pytest.approx(200 / 0.05)
    for law in ("source", "target"):
        stats = summary["stationary"][law]
        assert set(stats) >= {"trace", "eig_min", "eig_max", "mean_norm"}
        assert 0 < stats["eig_min"] < stats["eig_max"]
        # Not isotropic: the noise is aligned with, not proportional to, the Hessian.
        assert stats["eig_max"] / stats["eig_min"] > 10
    for law in ("pretrained", "finetuned"):
        assert set(summary["end_of_stage"][law]) >= {
            "trace",
            "eig_min",
            "eig_max",
            "mean_norm",
            "distance_to_minimum",
            "kl_to_stationary",
        }
    disc = summary["domain_discrepancy"]
    assert disc["total"] == pytest.approx(disc["covariance"] + disc["shift"], rel=1e-12)
    assert disc["covariance"] > 0 and disc["shift"] > 0
    b = summary["bound"]
    assert b["delta"] == 0.05
    for stage in ("pretrain", "finetune"):
        kl = b[stage]["kl"]
        assert kl["total"] == pytest.approx(kl["covariance"] + kl["shift"], rel=1e-12)
        for kind in ("mcallester", "kl"):
            entry = b[stage]["bounds"][kind]
            assert entry["bound"] == pytest.approx(entry["term"] + b[stage]["empirical_risk"])
        # kl-inversion is never looser than McAllester.
        assert b[stage]["bounds"]["kl"]["bound"] <= b[stage]["bounds"]["mcallester"]["bound"]
    # With N_T ≪ N_S the fine-tuning term dominates (computed, not assumed).
    assert b["dominant_stage"] == "finetune"
    assert b["finetune_dominates"] == {"mcallester": True, "kl": True}
    assert b["term_ratio"] > 1


def _np_kl(mp, Sp, mq, Sq):
    """KL(N(mp, Sp) ‖ N(mq, Sq)), covariance and shift parts, in plain NumPy."""
    d = mp.size
    M = np.linalg.solve(Sq, Sp)
    cov = 0.5 * (np.trace(M) - d - np.linalg.slogdet(M)[1])
    diff = mp - mq
    shift = 0.5 * diff @ np.linalg.solve(Sq, diff)
    return cov + shift, cov, shift


def _mcallester_term(kl, n, delta):
    return math.sqrt((kl + math.log(2 * math.sqrt(n) / delta)) / (2 * n))


def test_default_arrays_agree_with_independent_reference(default_run):
    """arrays.npz against NumPy: the Lyapunov equations, the spectrum of the
    default Hessian, the KL parts and McAllester's formula."""
    proc, out = default_run
    summary = json.loads(proc.stdout)
    a = np.load(out / "arrays.npz")
    d = 50
    for key in ("pretrain_hessian", "finetune_hessian", "stationary_source_cov", "finetuned_cov"):
        assert a[key].shape == (d, d)
    assert a["pretrain_minimum"].shape == (d,)
    lam = np.linalg.eigvalsh(a["pretrain_hessian"])
    np.testing.assert_allclose(lam, np.logspace(-3, 1, d), rtol=1e-10)
    R = a["rotation"]
    np.testing.assert_allclose(R @ R.T, np.eye(d), atol=1e-12)
    np.testing.assert_allclose(
        a["finetune_hessian"], 1.5 * R @ a["pretrain_hessian"] @ R.T, atol=1e-12
    )
    for stage, law, lr, bs in (
        ("pretrain", "stationary_source", 0.05, 128),
        ("finetune", "stationary_target", 0.01, 32),
    ):
        H, C, S = a[f"{stage}_hessian"], a[f"{stage}_noise_cov"], a[f"{law}_cov"]
        np.testing.assert_allclose(H @ S + S @ H, lr / bs * C, atol=1e-14, rtol=0)
        np.testing.assert_allclose(a[f"{law}_mean"], a[f"{stage}_minimum"])
        # Noise aligned with but not proportional to H: C H⁻¹ is not a multiple of I.
        CHinv = C @ np.linalg.inv(H)
        assert np.linalg.cond(CHinv) > 10
    total, cov, shift = _np_kl(
        a["stationary_target_mean"],
        a["stationary_target_cov"],
        a["stationary_source_mean"],
        a["stationary_source_cov"],
    )
    disc = summary["domain_discrepancy"]
    np.testing.assert_allclose(
        [disc["total"], disc["covariance"], disc["shift"]], [total, cov, shift], rtol=1e-8
    )
    b = summary["bound"]
    kl1 = _np_kl(a["pretrained_mean"], a["pretrained_cov"], a["init_mean"], a["init_cov"])[0]
    kl2 = _np_kl(
        a["finetuned_mean"], a["finetuned_cov"], a["pretrained_mean"], a["pretrained_cov"]
    )[0]
    assert b["pretrain"]["kl"]["total"] == pytest.approx(kl1, rel=1e-8)
    assert b["finetune"]["kl"]["total"] == pytest.approx(kl2, rel=1e-8)
    assert b["pretrain"]["bounds"]["mcallester"]["term"] == pytest.approx(
        _mcallester_term(kl1, 10**6, 0.05), rel=1e-8
    )
    assert b["finetune"]["bounds"]["mcallester"]["term"] == pytest.approx(
        _mcallester_term(kl2, 10**4, 0.05), rel=1e-8
    )


# ---------------------------------------------------------------------------
# In-process runs on a small problem.


def _run_small(tmp_path, capsys, text=SMALL, *extra):
    cfg = tmp_path / "small.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    code = main(["run", str(cfg), "--json", "--out", str(out), "-q", "--mc-paths", "0", *extra])
    captured = capsys.readouterr()
    return code, captured, out


def test_override_config_matches_library(tmp_path, capsys):
    """A config changes the problem, and the numbers are those of the public API
    applied to the matrices written in arrays.npz."""
    code, captured, out = _run_small(tmp_path, capsys)
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["problem"]["dim"] == 4
    assert summary["problem"]["pretrain"]["lr"] == 0.1
    assert summary["config_file"].endswith("small.toml")
    a = np.load(out / "arrays.npz")
    np.testing.assert_allclose(
        np.linalg.eigvalsh(a["pretrain_hessian"]), np.logspace(np.log10(0.05), np.log10(2.0), 4)
    )

    pre = jaxou.SGDStage(
        a["pretrain_hessian"], a["pretrain_noise_cov"], a["pretrain_minimum"], 0.1, 16
    )
    fine = jaxou.SGDStage(
        a["finetune_hessian"], a["finetune_noise_cov"], a["finetune_minimum"], 0.02, 8
    )
    init = jaxou.Gaussian.isotropic(np.zeros(4), 0.1)
    model = jaxou.TwoStage(init, pre, fine, 30.0, 5.0)

    # The reference, through the public API only (one compiled program, to keep
    # the test fast).
    @eqx.filter_jit
    def reference(model):
        pretrained, finetuned = model.laws()
        bounds = {
            kind: jaxou.two_stage_bound(model, 50000, 200, 0.05, kind=kind)
            for kind in ("mcallester", "kl")
        }
        return {
            "disc": jaxou.domain_discrepancy(model.pretrain, model.finetune),
            "source": model.pretrain.stationary().cov,
            "finetuned": finetuned.cov,
            "parts": jaxou.kl_parts(finetuned, pretrained),
            "bounds": bounds,
            "pb": jaxou.pac_bayes_bound(bounds["kl"].finetune_kl.total, 200, 0.05, kind="kl"),
        }

    ref = reference(model)
    disc = ref["disc"]
    got = summary["domain_discrepancy"]
    np.testing.assert_allclose(
        [got["total"], got["covariance"], got["shift"]],
        [float(disc.total), float(disc.covariance), float(disc.shift)],
        rtol=1e-10,
    )
    np.testing.assert_allclose(a["stationary_source_cov"], ref["source"], rtol=1e-10)
    np.testing.assert_allclose(a["finetuned_cov"], ref["finetuned"], rtol=1e-10, atol=1e-15)
    b = summary["bound"]
    assert b["finetune"]["kl"]["shift"] == pytest.approx(float(ref["parts"].shift), rel=1e-10)
    for kind, r in ref["bounds"].items():
        for stage in ("pretrain", "finetune"):
            assert b[stage]["bounds"][kind]["bound"] == pytest.approx(
                float(getattr(r, f"{stage}_bound")), rel=1e-10
            )
            assert b[stage]["kl"]["total"] == pytest.approx(
                float(getattr(r, f"{stage}_kl").total), rel=1e-10
            )
    assert b["finetune"]["bounds"]["kl"]["bound"] == pytest.approx(float(ref["pb"]), rel=1e-10)


def test_lr_override_rescales_stationary_covariance(tmp_path, capsys):
    """--set pretrain.lr doubles the source stationary covariance (Σ∞ ∝ lr/B) and
    leaves the target one alone; `inf` durations reach stationarity."""
    code, captured, _ = _run_small(tmp_path, capsys)
    assert code == 0
    base = json.loads(captured.out)
    code, captured, _ = _run_small(
        tmp_path, capsys, SMALL, "--set", "pretrain.lr=0.2", "--set", "finetune.duration=inf"
    )
    assert code == 0, captured.err
    new = json.loads(captured.out)
    src0, src1 = base["stationary"]["source"], new["stationary"]["source"]
    assert src1["trace"] == pytest.approx(2 * src0["trace"], rel=1e-10)
    assert new["stationary"]["target"]["trace"] == pytest.approx(
        base["stationary"]["target"]["trace"], rel=1e-12
    )
    assert new["problem"]["finetune"]["duration"] == "inf"
    assert new["end_of_stage"]["finetuned"]["kl_to_stationary"] == pytest.approx(0, abs=1e-9)


def test_large_learning_rate_warns(tmp_path, capsys):
    """lr × λ_max(H) >= 2: a warning on stderr (even with --quiet), not an error."""
    code, captured, _ = _run_small(tmp_path, capsys, SMALL, "--set", "pretrain.lr=1.5", "--no-plot")
    assert code == 0
    assert "warning: pretrain: lr × λ_max(H) = 3" in captured.err
    assert json.loads(captured.out)["problem"]["pretrain"][
        "lr_times_max_hessian_eig"
    ] == pytest.approx(3.0)


def test_explicit_matrices(tmp_path, capsys):
    H = [[2.0, 0.3, 0.0, 0.0], [0.3, 1.0, 0.1, 0.0], [0.0, 0.1, 0.5, 0.0], [0.0, 0.0, 0.0, 0.1]]
    C = [[1.0, 0.0, 0.2, 0.0], [0.0, 0.5, 0.0, 0.0], [0.2, 0.0, 0.7, 0.0], [0.0, 0.0, 0.0, 0.3]]
    text = f"""
[pretrain]
hessian = {H}
noise_cov = {C}
minimum = [1.0, 0.0, -1.0, 0.5]

[finetune]
minimum = [1.0, 0.5, -1.0, 0.5]
"""
    code, captured, out = _run_small(tmp_path, capsys, text, "--no-plot")
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["problem"]["dim"] == 4  # inferred from the arrays
    assert summary["problem"]["origin"]["pretrain.hessian"] == "explicit"
    assert summary["problem"]["origin"]["finetune.hessian"] == "generated"
    assert summary["problem"]["finetune"]["shift_norm"] == pytest.approx(0.5)
    a = np.load(out / "arrays.npz")
    np.testing.assert_array_equal(a["pretrain_hessian"], np.array(H))
    S = a["stationary_source_cov"]
    np.testing.assert_allclose(
        np.array(H) @ S + S @ np.array(H), 0.05 / 128 * np.array(C), atol=1e-15
    )
    assert not (out / "stationary_laws.png").exists()


def test_human_summary(tmp_path, capsys):
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    code = main(["run", str(cfg), "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 0
    for phrase in (
        "Stationary laws",
        "Laws at the end of each stage",
        "Domain discrepancy",
        "covariance",
        "shift",
        "mcallester",
        "kl-inversion",
        "term dominates",
    ):
        assert phrase in captured.out
    with pytest.raises(json.JSONDecodeError):
        json.loads(captured.out)
    assert "building" in captured.err and "wrote" in captured.err
    # --quiet silences progress.
    main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet", "--no-plot"])
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------
# Bad configurations: one line on stderr naming the field, exit 2, no outputs.

BAD = [
    ("[pretrain]\nbatch_size = -4\n", "pretrain.batch_size must be > 0, got -4"),
    ("[pretrain]\nlearning_rate = 0.1\n", "did you mean pretrain.lr"),
    ("[pretrain]\nbatchsize = 8\n", "did you mean pretrain.batch_size"),
    ("[pretrian]\nlr = 0.1\n", "did you mean [pretrain]"),
    ("dim = 3\n", "[problem] dim"),
    ('[pretrain]\nlr = "fast"\n', "pretrain.lr must be a number"),
    ("[pretrain]\nbatch_size = 12.5\n", "pretrain.batch_size must be an integer"),
    ("[output]\nplot = 1\n", "output.plot must be true or false"),
    (
        "[pretrain]\nhessian = [[1.0, 2.0], [2.0, 1.0]]\n",
        "pretrain.hessian is not positive definite",
    ),
    ("[pretrain]\nhessian = [[1.0, 2.0], [0.0, 1.0]]\n", "pretrain.hessian is not symmetric"),
    (
        "[finetune]\nnoise_cov = [[1.0, 0.0], [0.0, -1.0]]\n",
        "finetune.noise_cov is not positive semi-definite",
    ),
    (
        "[finetune]\nhessian = [[1.0, 0.0], [0.0]]\n",
        "finetune.hessian has rows of different lengths",
    ),
    ("[problem]\ndim = 3\n[pretrain]\nminimum = [1.0, 2.0]\n", "pretrain.minimum has dimension 2"),
    (
        "[pretrain]\nhessian = [[1.0]]\nhessian_max_eig = 3.0\n",
        "pretrain.hessian_max_eig cannot be combined",
    ),
    ("[bound]\ndelta = 1.5\n", "bound.delta must be < 1, got 1.5"),
    ("[bound]\ndelta = 0\n", "bound.delta must be > 0"),
    ('[bound]\nkind = "mcalester"\n', "did you mean 'mcallester'"),
    ("[bound]\nempirical_risk_target = 2\n", "bound.empirical_risk_target must be <= 1"),
    ('[finetune]\nduration = "forever"\n', "finetune.duration"),
    ("[finetune]\nduration = -1.0\n", "finetune.duration must be >= 0"),
    (
        "[pretrain]\nhessian_min_eig = 5.0\nhessian_max_eig = 1.0\n",
        "pretrain.hessian_max_eig must be >=",
    ),
    ("[simulate]\nn_paths = 0\n", "simulate.n_paths must be >= 1"),
    ('[simulate]\nmethod = "rk4"\n', "simulate.method must be one of"),
    ("[simulate]\ndt = -0.1\n", "simulate.dt must be > 0"),
    ("[pretrain\nlr = 1\n", "is not valid TOML"),
]


def _assert_one_line_error(code, captured, expected):
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("jaxou: config error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("text, expected", BAD, ids=[e for _, e in BAD])
def test_bad_config(tmp_path, capsys, text, expected):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    code = main(["run", str(cfg), "--out", str(out)])
    _assert_one_line_error(code, capsys.readouterr(), expected)
    assert not out.exists()  # validated before anything was computed or written


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "does-not-exist.toml"], "does not exist"),
        (["run", "--set", "pretrain.lr=-1"], "pretrain.lr must be > 0, got -1"),
        (["run", "--set", "lr=1"], "e.g. pretrain.lr or finetune.lr"),
        (["run", "--set", "pretrain.batch_size"], "must look like table.key=value"),
        (["run", "--set", "problem.dim=0"], "problem.dim must be >= 1, got 0"),
        (["run", "--mc-paths", "1"], "--mc-paths must be 0 (no check) or >= 2, got 1"),
    ],
)
def test_bad_arguments(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    _assert_one_line_error(code, capsys.readouterr(), expected)
    assert not (tmp_path / "results").exists()


def test_output_dir_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("user data")
    code = main(["run", "--out", str(target)])
    _assert_one_line_error(code, capsys.readouterr(), "exists and is not a directory")
    assert target.read_text() == "user data"


def test_failed_run_keeps_existing_outputs(tmp_path, capsys):
    """Nothing a user saved is lost when a run fails."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.json").write_text('{"old": true}')
    (out / "notes.txt").write_text("mine")
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pretrain]\nbatch_size = -4\n")
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    capsys.readouterr()
    assert (out / "summary.json").read_text() == '{"old": true}'
    assert (out / "notes.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pretrain]\nbatch_size = -4\n")
    with pytest.raises(ConfigError, match="pretrain.batch_size"):
        main(["run", str(cfg), "--debug"])


def test_library_errors_become_one_line(tmp_path, capsys, monkeypatch):
    """ValueError/TypeError and equinox run-time errors from the library: one
    line, exit 2; anything else is an internal error, exit 1."""
    import equinox as eqx
    import jax.numpy as jnp

    import jaxou._problem

    def value_error(config):
        raise ValueError("SGDStage: hessian is not positive definite (smallest eigenvalue -1)")

    def eqx_error(config):
        x = jnp.array(1.0)
        eqx.error_if(x, x > 0, "lyapunov: the drift matrix A is not stable")
        raise AssertionError("error_if did not raise")

    def bug(config):
        raise KeyError("oops")

    for fn, code_expected, expected in (
        (value_error, 2, "jaxou: error: SGDStage: hessian is not positive definite"),
        (eqx_error, 2, "jaxou: error: lyapunov: the drift matrix A is not stable"),
        (bug, 1, "jaxou: internal error: KeyError"),
    ):
        monkeypatch.setattr(jaxou._problem, "build_problem", fn)
        code = main(["run", "--out", str(tmp_path / "o"), "-q"])
        captured = capsys.readouterr()
        assert code == code_expected
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), captured.err
        assert "Traceback" not in captured.err
        assert not (tmp_path / "o").exists()


def test_library_warnings_are_one_line_and_close_the_progress_line(tmp_path, capsys, monkeypatch):
    """A library warning inside a progress step: the step's open line is ended, the
    warning printed as `jaxou: warning: ...` without Python's source line, and the
    step's line repeated with its status; Python's handler is restored after."""
    import warnings

    import jaxou._problem
    from jaxou._cli import Progress

    def warns(config):
        with Progress()("estimating"):
            warnings.warn("LanczosHessian: 3 of 10 entries\n  were floored", stacklevel=2)
        raise ValueError("stop here")

    monkeypatch.setattr(jaxou._problem, "build_problem", warns)
    before = warnings.showwarning
    assert main(["run", "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    i = next(k for k, line in enumerate(lines) if line.endswith("jaxou: estimating ..."))
    assert lines[i + 1] == "jaxou: warning: LanczosHessian: 3 of 10 entries were floored"
    assert lines[i + 2].startswith("jaxou: estimating ... done (")
    assert not any("UserWarning" in line or "warn(" in line for line in lines)
    assert warnings.showwarning is before


# ---------------------------------------------------------------------------
# Help, version, import weight.


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "run" in text and "two-stage" in text and "Exit codes" in text

    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("CONFIG.toml", "--json", "--out", "--set", "--quiet", "--debug", "summary.json"):
        assert option in text

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert jaxou.__version__ in capsys.readouterr().out

    assert main([]) == 2  # no command: the help, on stderr
    assert "COMMAND" in capsys.readouterr().err


def test_import_jaxou_is_light():
    code = "import sys, jaxou, jaxou._cli; assert 'matplotlib' not in sys.modules, 'matplotlib'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------
# Configuration and helpers, without running anything.


def test_example_config_reproduces_the_defaults():
    example = load_config(EXAMPLE)
    default = default_config()
    assert example.to_dict() == default.to_dict()
    # ... and spells out every key of every table with a non-None default.
    for table, fields in SCHEMA.items():
        for key, spec in fields.items():
            if spec.default is not None:
                assert example.sections[table].is_set(key), (
                    f"{table}.{key} missing from the example"
                )


def test_config_values():
    cfg = load_config(
        None,
        [
            parse_override("finetune.duration=inf"),
            parse_override('pretrain.duration="inf"'),
            parse_override("pretrain.n_samples=1e6"),
            parse_override("output.dir=my results"),
        ],
    )
    assert cfg.finetune.duration == math.inf and cfg.pretrain.duration == math.inf
    assert cfg.pretrain.n_samples == 10**6 and isinstance(cfg.pretrain.n_samples, int)
    assert cfg.output.dir == "my results"
    assert cfg.pretrain.is_set("duration") and not cfg.pretrain.is_set("lr")
    assert cfg.simulate.chunk_size is None and cfg.simulate.method == "euler"
    with pytest.raises(ConfigError, match=r"simulate\.chunk_size must be >= 1"):
        load_config(None, [("simulate", "chunk_size", 0)])


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(str(path), fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.json"]
    write_atomic(str(path), b"new")
    assert path.read_text() == "new"


def test_jsonable_is_strict_json():
    value = jsonable({"a": np.float64(np.inf), "b": np.array([1.0, np.nan]), "c": np.bool_(True)})
    assert value == {"a": "inf", "b": [1.0, "nan"], "c": True}
    json.dumps(value, allow_nan=False)


# ---------------------------------------------------------------------------
# jaxou simulate


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_simulate_command_exact_agrees_with_analytic(tmp_path, capsys, dtype):
    """`jaxou simulate` with the exact sampler: files written, settings recorded, and the
    KL of the empirical fit at both stage ends within 5 sd of a perfect sampler's."""
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "sim"
    argv = ["simulate", str(cfg), "--json", "--out", str(out), "-q", "--saves", "6"]
    sets = {"method": '"exact"', "n_paths": "3000", "dtype": f'"{dtype}"'}
    for key, value in sets.items():
        argv += ["--set", f"simulate.{key}={value}"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary == json.loads((out / "simulate_summary.json").read_text())
    assert summary["settings"]["dtype"] == dtype and summary["settings"]["n_paths"] == 3000
    assert summary["settings"]["saves"] == 7  # 6 evenly spaced times and the stage boundary
    floor, sd = summary["kl_floor"]["mean"], summary["kl_floor"]["std"]
    for stage in ("pretrained", "finetuned"):
        assert abs(summary["kl_to_analytic"][stage] - floor) < 5 * sd, summary
    arrays = np.load(out / "simulate_arrays.npz")
    assert arrays["mean"].dtype == np.float64 and arrays["mean"].shape == (7, 4)
    assert (out / "simulate.png").read_bytes()[:8] == PNG_MAGIC


def test_simulate_command_default_settings():
    cfg = load_config(None)
    assert cfg.simulate.dtype == "float32" and cfg.simulate.n_paths == 4096
    with pytest.raises(ConfigError, match=r"simulate\.dtype must be one of"):
        load_config(None, [("simulate", "dtype", "float16")])


# Resume (jaxou._resume): a killed run resumes, a foreign folder is refused, a failing
# run leaves what earlier runs wrote intact.


def _simulate_argv(cfg, out, *extra):
    sets = {"method": '"exact"', "n_paths": "768", "chunk_size": "256", "dtype": '"float64"'}
    argv = ["simulate", str(cfg), "--out", str(out), "--saves", "6", "--json"]
    for key, value in sets.items():
        argv += ["--set", f"simulate.{key}={value}"]
    return argv + list(extra)


def test_simulate_command_resumes_an_interrupted_run(tmp_path, capsys, monkeypatch):
    import jax

    import jaxou._plot
    import jaxou._simulate as sim_module
    from jaxou._problem import build_problem

    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "sim"
    real = sim_module.run_chunk
    calls = []

    def interrupted(plan, i, **kwargs):
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(plan, i, **kwargs)

    monkeypatch.setattr(sim_module, "run_chunk", interrupted)
    assert main(_simulate_argv(cfg, out)) == 130
    assert "interrupted" in capsys.readouterr().err
    chunks = sorted(p.name for p in (out / "simulate_chunks").iterdir())
    assert chunks == ["chunk_000000.npz", "manifest.json"]  # no half-written file
    assert not (out / "simulate_summary.json").exists()

    calls.clear()
    counting = lambda plan, i, **kwargs: calls.append(i) or real(plan, i, **kwargs)
    monkeypatch.setattr(sim_module, "run_chunk", counting)
    assert main(_simulate_argv(cfg, out)) == 0
    captured = capsys.readouterr()
    assert "resuming: 1 of 3 chunks already done" in captured.err
    assert calls == [1, 2]  # only the missing chunks
    summary = json.loads(captured.out)
    assert summary["paths_computed"] == 512 and summary["settings"]["chunks"] == 3
    # The same statistics as one uninterrupted library call.
    model, _ = build_problem(load_config(cfg))
    ts = np.load(out / "simulate_arrays.npz")["ts"]
    ref = jaxou.simulate(
        model, jax.random.key(0), n_paths=768, solver=jaxou.ExactOU(), ts=ts, chunk_size=256
    )
    arrays = np.load(out / "simulate_arrays.npz")
    np.testing.assert_allclose(arrays["mean"], ref.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(arrays["cov"], ref.cov, rtol=0, atol=1e-12)

    # A run that fails later (here in the figure) leaves the earlier outputs and the
    # chunks as they were.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    chunk_bytes = (out / "simulate_chunks" / "chunk_000001.npz").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("no figure today")

    monkeypatch.setattr(jaxou._plot, "plot_simulation", broken)
    assert main(_simulate_argv(cfg, out, "-q")) == 1
    assert "no figure today" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / "simulate_chunks" / "chunk_000001.npz").read_bytes() == chunk_bytes


def test_simulate_command_refuses_a_foreign_folder(tmp_path, capsys):
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "sim"
    (out / "simulate_chunks").mkdir(parents=True)
    (out / "simulate_chunks" / "chunk_000000.npz").write_bytes(b"someone else's")
    (out / "simulate_chunks" / "notes.txt").write_text("keep me")
    assert main(_simulate_argv(cfg, out, "-q")) == 2
    assert "holds chunks of a different simulation" in capsys.readouterr().err
    assert (out / "simulate_chunks" / "chunk_000000.npz").read_bytes() == b"someone else's"
    # --fresh discards the chunk files, and only those.
    assert main(_simulate_argv(cfg, out, "-q", "--fresh", "--no-plot")) == 0
    assert (out / "simulate_chunks" / "notes.txt").read_text() == "keep me"
    names = sorted(p.name for p in (out / "simulate_chunks").iterdir())
    assert names == [f"chunk_00000{i}.npz" for i in range(3)] + ["manifest.json", "notes.txt"]


def test_fingerprint_and_chunk_store(tmp_path):
    from jaxou._config import ConfigError
    from jaxou._resume import ChunkStore, fingerprint

    a = np.array([1.0, 2.0])
    b = np.nextafter(a, 3.0)  # one ulp apart
    assert fingerprint({"x": a}, 3) == fingerprint({"x": a.copy()}, 3)
    assert fingerprint({"x": a}, 3) != fingerprint({"x": b}, 3)
    assert fingerprint({"x": a}, 3) != fingerprint({"x": a.astype(np.float32)}, 3)
    store = ChunkStore(str(tmp_path / "c"), "f1", 2, what="test")
    assert store.done() == []
    store.save(1, {"y": a})
    assert store.done() == [1]
    again = ChunkStore(str(tmp_path / "c"), "f1", 2, what="test")
    np.testing.assert_array_equal(again.load(1)["y"], a)
    with pytest.raises(ConfigError, match="different test"):
        ChunkStore(str(tmp_path / "c"), "f2", 2, what="test")
    assert ChunkStore(str(tmp_path / "c"), "f2", 2, what="test", fresh=True).done() == []
