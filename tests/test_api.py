"""The public surface: DESIGN.md's contract exists, every public name is documented,
and importing jaxou stays light."""

import inspect
import re
import subprocess
import sys
import types

import jaxou

CONTRACT = {
    "lyapunov": ["A", "Q", "solver"],
    "Gaussian": ["mean", "cov"],
    "kl": ["p", "q"],
    "w2": ["p", "q"],
    "OUProcess": ["drift", "mean", "diffusion"],
    "SGDStage": ["hessian", "noise_cov", "minimum", "lr", "batch_size"],
    "TwoStage": ["init", "pretrain", "finetune", "t_pretrain", "t_finetune"],
    "pac_bayes_bound": ["kl", "n", "delta", "empirical_risk", "kind"],
    "domain_discrepancy": ["source", "target"],
}


def public_names():
    return [
        n
        for n in dir(jaxou)
        if not n.startswith("_") and not isinstance(getattr(jaxou, n), types.ModuleType)
    ]


def test_contract_names_and_parameters():
    for name, params in CONTRACT.items():
        obj = getattr(jaxou, name)
        sig = inspect.signature(obj)
        for p in params:
            assert p in sig.parameters, f"jaxou.{name} lacks parameter {p!r}"
    assert "OUProcess" in dir(jaxou) and hasattr(jaxou.OUProcess, "stationary")
    for method in ("stationary", "marginal", "transition"):
        assert callable(getattr(jaxou.OUProcess, method))
    assert callable(jaxou.SGDStage.stationary)
    assert isinstance(jaxou.SGDStage.process, property)


def test_all_lists_exactly_the_public_names():
    assert len(jaxou.__all__) == len(set(jaxou.__all__)), "duplicates in jaxou.__all__"
    assert sorted(jaxou.__all__) == sorted(public_names())


def test_operator_contract():
    sig = inspect.signature(jaxou.DiagonalPlusLowRank)
    assert list(sig.parameters)[:3] == ["diagonal", "factor", "core"]
    assert sig.parameters["core"].default is None
    M = jaxou.DiagonalPlusLowRank([1.0, 2.0], [[1.0], [0.0]])
    assert M.as_matrix().tolist() == [[2.0, 0.0], [0.0, 2.0]]


def test_every_public_name_is_documented():
    undocumented = [
        n for n in public_names() if not (inspect.getdoc(getattr(jaxou, n)) or "").strip()
    ]
    assert undocumented == [], f"public names without a docstring: {undocumented}"


def test_import_is_light():
    code = "import sys, jaxou; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    assert out.stderr.strip() == ""


def test_sensitivity_docstring_lists_the_valid_names():
    from jaxou._sweep import HYPERPARAMETERS, TERMS

    doc = inspect.getdoc(jaxou.sensitivity)
    terms_part, wrt_part = doc.split("- `terms`:")[1].split("- `wrt`:")
    listed_terms = re.findall(r"`(\w+)`", terms_part)
    listed_wrt = re.findall(r"`(\w+)`", wrt_part.split("\n\n")[0])
    assert listed_terms == list(TERMS)
    assert [n for n in listed_wrt if n != "Hyperparameters"] == list(HYPERPARAMETERS)
