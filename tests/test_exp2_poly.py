"""The CPU kernels' exponential polynomial (csrc/cpu/simd.h kExp2Poly) is the
fit scripts/fit_exp2_poly.py makes, with the error simd.h's comment states."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fit_exp2_poly.py"


@pytest.fixture(scope="module")
def fit_module():
    spec = importlib.util.spec_from_file_location("fit_exp2_poly", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_simd_h_polynomial_error(fit_module):
    co = fit_module.simd_h_poly()
    assert len(co) == 6 and co[-1] == 1.0
    # simd.h: 1.1e-7 exact, 1.7e-7 by fp32 FMAs; the fp32 ulp of values in
    # [0.7, 1.4] is 6e-8 to 1.2e-7, so this is about one ulp.
    assert fit_module.max_rel_error(co, fp32_fma=False) < 1.15e-7
    assert fit_module.max_rel_error(co, fp32_fma=True) < 1.75e-7


def test_simd_h_polynomial_is_the_fit(fit_module):
    fitted = fit_module.fit(5)
    for a, b in zip(fit_module.simd_h_poly(), fitted):
        assert a == pytest.approx(b, rel=1e-6)
