"""pyfastattn.testing: the tolerance rule every kernel test and the benchmarks'
correctness gate rely on, including its special values (NaN, infinities) on
both the one-pass fast path and the masked path."""

import math

import torch

from pyfastattn.testing import max_error, rounding_floor, tolerance_failure

NAN, INF = float("nan"), float("inf")


def t64(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_max_error_plain():
    assert max_error(torch.tensor([1.0, 2.0]), t64(1.5, 2.0)) == 0.5


def test_max_error_matching_nan_and_equal_infinities_are_exact():
    assert max_error(torch.tensor([1.0, NAN, INF, -INF]), t64(1.25, NAN, INF, -INF)) == 0.25
    assert max_error(torch.tensor([NAN, INF]), t64(NAN, INF)) == 0.0


def test_max_error_nan_pattern_differs_is_nan():
    assert math.isnan(max_error(torch.tensor([NAN, 1.0]), t64(1.0, 1.0)))
    assert math.isnan(max_error(torch.tensor([1.0, 1.0]), t64(NAN, 1.0)))


def test_max_error_unequal_infinity_is_infinite():
    assert max_error(torch.tensor([INF, 1.0]), t64(-INF, 1.0)) == INF
    assert max_error(torch.tensor([INF, 1.0]), t64(3.0, 1.0)) == INF


def test_rounding_floor_ignores_non_finite():
    x = 1.0 + 2.0**-10  # not representable in bf16 (8 bits of mantissa)
    plain = rounding_floor(t64(x, 2.0), torch.bfloat16)
    assert plain > 0
    assert rounding_floor(t64(x, 2.0, NAN, INF), torch.bfloat16) == plain
    assert rounding_floor(t64(NAN, INF), torch.bfloat16) == 0.0
    assert rounding_floor(t64(), torch.bfloat16) == 0.0


def test_tolerance_failure_rule():
    torch.manual_seed(0)
    ref = torch.randn(256, 64, dtype=torch.float64)
    base = ref.to(torch.bfloat16)  # plain torch's error: one rounding
    assert tolerance_failure("o", base, ref, base, torch.bfloat16) is None
    bad = base.clone()
    bad[3, 5] += 0.5
    msg = tolerance_failure("o", bad, ref, base, torch.bfloat16)
    assert msg is not None and msg.startswith("o: max error")
    nan = base.clone()
    nan[0, 0] = NAN
    assert "NaN pattern differs" in tolerance_failure("o", nan, ref, base, torch.bfloat16)


def test_low_precision_has_flashattention_absolute_term():
    # A reference that is exactly zero (dQ of rows that see one key): an
    # online-softmax backward gets it to rounding, which the rule must allow
    # (FlashAttention's 2 (r + 0.3 - 0.3 - r) at its largest, one step at
    # 0.3: 2^-9 in bf16, 2^-12 in fp16), and nothing much beyond it.
    ref = torch.zeros(4, dtype=torch.float64)
    for dtype, ok, bad in ((torch.bfloat16, 1.5e-3, 4e-3), (torch.float16, 2e-4, 4e-4)):
        assert tolerance_failure("dq", torch.full((4,), ok, dtype=dtype), ref, ref.to(dtype), dtype) is None
        assert (
            tolerance_failure("dq", torch.full((4,), bad, dtype=dtype), ref, ref.to(dtype), dtype) is not None
        )
    # fp32 keeps its relative floor only (1e-5 of 1 + max|ref|)
    assert tolerance_failure("dq", torch.full((4,), 1e-4), ref, ref.float(), torch.float32) is not None


def test_baseline_nan_rows_do_not_zero_its_error():
    # Naive attention turns a fully masked row into NaN where the reference is
    # finite: plain torch's error is then taken over its other elements.
    ref = t64(0.0, 0.5, 1.0, 2.0)
    base = torch.tensor([NAN, 0.5 + 0.1, 1.0, 2.0])
    assert (
        tolerance_failure("out", torch.tensor([0.0, 0.5 + 0.15, 1.0, 2.0]), ref, base, torch.float32) is None
    )
    assert (
        tolerance_failure("out", torch.tensor([0.0, 0.5 + 0.25, 1.0, 2.0]), ref, base, torch.float32)
        is not None
    )


def test_flash_attention_atol_is_the_rounding_noise_at_magnitude_plus_0_3():
    from pyfastattn.testing import flash_attention_atol

    # r = 0.25: 0.55 lies in [0.5, 1), where fp16's step is 2^-11 and bf16's 2^-8
    r = t64(0.25, -0.1, NAN, INF)
    for dtype, step in ((torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)):
        assert flash_attention_atol(r, dtype) == step, dtype
    assert flash_attention_atol(r, torch.float32) == 0.0
    assert flash_attention_atol(torch.zeros(0, dtype=torch.float64), torch.bfloat16) == 0.0
