"""The SDPA drop-in against torch itself: the same inputs to
``torch.nn.functional.scaled_dot_product_attention`` and to
``pyfastattn.scaled_dot_product_attention`` must give the same values (under
the tolerance rule), the same exception types, and the same output layout.

Covers torch's causal-bias objects, zero-sized dimensions, a mask together with
``is_causal``, ``dropout_p=1``, float32 masks with low-precision inputs, tensor
subclasses and sparse masks, and the memory layout of the output, on every path
(kernel, torch SDPA, reference)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import pyfastattn
from tests._helpers import assert_tolerance

sdpa = pyfastattn.scaled_dot_product_attention
LOW = [torch.float32, torch.bfloat16, torch.float16]


def _qkv(b, h, lq, sk, e, ev=None, dtype=torch.float32, requires_grad=False):
    ev = e if ev is None else ev
    q = torch.randn(b, h, lq, e, dtype=dtype)
    k = torch.randn(b, h, sk, e, dtype=dtype)
    v = torch.randn(b, h, sk, ev, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _grads(fn, q, k, v, g, **kw):
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


# ---------------------------------------------------------------------------
# 1. torch's CausalBias masks
# ---------------------------------------------------------------------------

BIAS_SHAPES = [(8, 8), (5, 13), (13, 5), (1, 17), (17, 1)]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("lq,sk", BIAS_SHAPES)
@pytest.mark.parametrize(
    "make_bias", [causal_upper_left, causal_lower_right], ids=["upper_left", "lower_right"]
)
def test_causal_bias_matches_torch(make_bias, lq, sk, dtype, poison):
    q, k, v = _qkv(2, 3, lq, sk, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, lq, 16, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "lower right ... NaNs" for lq > sk
        bias = make_bias(lq, sk)
        ours = _grads(sdpa, q, k, v, g, attn_mask=bias)
        again = sdpa(q, k, v, attn_mask=bias)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = _grads(F.scaled_dot_product_attention, q64, k64, v64, g.double(), attn_mask=bias)
        qb, kb, vb = (t.detach().requires_grad_() for t in (q, k, v))
        base = _grads(F.scaled_dot_product_attention, qb, kb, vb, g, attn_mask=bias)
    assert torch.equal(ours[0], again), "two calls with the same CausalBias differ"
    for name, a, r, b in zip(("out", "dq", "dk", "dv"), ours, ref, base):
        assert a.shape == r.shape
        assert_tolerance(f"{make_bias.__name__} {name}", a, r, b, dtype)


def test_causal_bias_with_is_causal_and_wrong_lengths_raise_like_torch():
    q, k, v = _qkv(1, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(8, 8), is_causal=True)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        sdpa(q, k, v, attn_mask=causal_upper_left(8, 8), is_causal=True)
    with pytest.raises(RuntimeError, match=r"CausalBias attn_mask is for .* \(6, 8\).*L = 8 and S = 8"):
        sdpa(q, k, v, attn_mask=causal_upper_left(6, 8))


# ---------------------------------------------------------------------------
# tensor subclasses and non-strided masks
# ---------------------------------------------------------------------------


class _Tagged(torch.Tensor):
    """A subclass that keeps torch's default __torch_function__ (real storage)."""


def test_subclass_goes_through_torch_function_like_torch():
    q, k, v = _qkv(1, 2, 9, 9, 8)
    qt = q.as_subclass(_Tagged)
    ours = sdpa(qt, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(qt, k, v, is_causal=True)
    assert type(ours) is type(theirs) is _Tagged
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), theirs.as_subclass(torch.Tensor))


def test_sparse_mask_is_densified():
    q, k, v = _qkv(1, 2, 7, 7, 8)
    m = torch.randn(7, 7).masked_fill(torch.rand(7, 7) > 0.5, 0.0)
    out = sdpa(q, k, v, attn_mask=m.to_sparse())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=m))


def test_kernel_refuses_non_strided_tensors():
    # The dispatcher already refuses a sparse tensor (no SparseCPU kernel); the
    # C++ layer checks the layout again for any path that gets past it.
    q, k, v = (t.transpose(1, 2) for t in _qkv(1, 2, 4, 4, 8))
    with pytest.raises((ValueError, NotImplementedError), match="dense strided|SparseCPU"):
        torch.ops.pyfastattn.attention_fwd(
            q, k, v, torch.ones(1, 1, 4, 4).to_sparse(), None, None, None, 4, 4, 0.3, 0.0, -1, -1, False
        )


# ---------------------------------------------------------------------------
# 2. zero-sized dimensions
# ---------------------------------------------------------------------------

ZERO_SHAPES = {  # (b, h, lq, sk, e, ev)
    "batch 0": (0, 4, 10, 10, 16, 16),
    "heads 0": (2, 0, 10, 10, 16, 16),
    "L 0": (2, 3, 0, 10, 16, 16),
    "S 0": (2, 3, 10, 0, 16, 16),
    "E 0": (2, 3, 10, 7, 0, 16),
    "Ev 0": (2, 3, 10, 7, 16, 0),
}


@pytest.mark.parametrize("mode", ["auto", "kernel", "reference"])
@pytest.mark.parametrize("case", list(ZERO_SHAPES))
def test_zero_sized_dims_match_torch(case, mode, poison):
    b, h, lq, sk, e, ev = ZERO_SHAPES[case]
    q, k, v = _qkv(b, h, lq, sk, e, ev, requires_grad=True)
    g = torch.randn(b, h, lq, ev)
    with pyfastattn.backend(mode):
        ours = _grads(sdpa, q, k, v, g)
    theirs = _grads(F.scaled_dot_product_attention, *(t.detach().requires_grad_() for t in (q, k, v)), g)
    for a, t in zip(ours, theirs):
        assert a.shape == t.shape
        torch.testing.assert_close(a, t)
    if case == "E 0":  # every score is 0: the mean of v over keys
        torch.testing.assert_close(ours[0], v.detach().mean(-2, keepdim=True).expand_as(ours[0]))


@pytest.mark.parametrize("case", list(ZERO_SHAPES))
def test_zero_sized_dims_native_api(case, poison):
    b, h, lq, sk, e, ev = ZERO_SHAPES[case]
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in _qkv(b, h, lq, sk, e, ev))
    out, lse = pyfastattn.attention(q, k, v, return_lse=True)
    ref = F.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert out.shape == (b, lq, h, ev) and lse.shape == (b, h, lq)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()


# ---------------------------------------------------------------------------
# 3. exception types, mask with is_causal, dropout_p = 1
# ---------------------------------------------------------------------------

BAD_CALLS = {
    "1-D query": lambda: ((torch.randn(8), torch.randn(8), torch.randn(8)), {}),
    "mixed dtypes": lambda: (
        (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8, dtype=torch.float64), torch.randn(1, 2, 4, 8)),
        {},
    ),
    "head dims differ": lambda: (
        (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 8)),
        {},
    ),
    "int64 mask": lambda: (
        (torch.randn(1, 2, 4, 8),) * 3,
        {"attn_mask": torch.zeros(4, 4, dtype=torch.int64)},
    ),
    "float16 mask, bfloat16 query": lambda: (
        (torch.randn(1, 2, 4, 8, dtype=torch.bfloat16),) * 3,
        {"attn_mask": torch.zeros(4, 4, dtype=torch.float16)},
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_invalid_input_raises_runtime_error_like_torch(case):
    args, kw = BAD_CALLS[case]()
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(*args, **kw)
    with pytest.raises(RuntimeError) as info:
        sdpa(*args, **kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, pyfastattn.InvalidArgumentError)


@pytest.mark.parametrize("mode", ["auto", "kernel", "reference"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_mask_with_is_causal_applies_both_like_torch(mask_kind, dtype, mode, poison):
    lq = sk = 19
    q, k, v = _qkv(2, 3, lq, sk, 16, dtype=dtype)
    if mask_kind == "bool":  # not itself causal: keys in the future are allowed by it
        m = torch.rand(lq, sk) > 0.3
        m[:, 0] = True
    else:
        m = torch.randn(lq, sk, dtype=dtype)
    with pyfastattn.backend(mode):
        out = sdpa(q, k, v, attn_mask=m, is_causal=True)
    tril = torch.ones(lq, sk, dtype=torch.bool).tril()
    both = m & tril if mask_kind == "bool" else m.double().masked_fill(~tril, float("-inf"))
    try:  # torch 2.13's default CPU path applies both
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
    except RuntimeError:  # later torch refuses the pair; pyfastattn keeps 2.13's meaning
        theirs = F.scaled_dot_product_attention(
            q, k, v, attn_mask=both if mask_kind == "bool" else both.to(dtype)
        )
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=both)
    assert_tolerance("mask+causal", out, ref, theirs, dtype)


def test_dropout_p_one_drops_everything_like_torch():
    q, k, v = _qkv(1, 2, 6, 6, 8, requires_grad=True)
    out = sdpa(q, k, v, dropout_p=1.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        sdpa(q, k, v, dropout_p=1.5)


@pytest.mark.parametrize("arg", ["dropout_p", "scale"])
@pytest.mark.parametrize("bad", ["0.1", [0.1]], ids=["str", "list"])
def test_non_numeric_float_argument_is_a_type_error_like_torch(bad, arg):
    # torch's argument parser: a TypeError (pyfastattn's message names the argument).
    q, k, v = _qkv(1, 2, 6, 6, 8)
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, k, v, **{arg: bad})
    with pytest.raises(TypeError, match=f"{arg} must be a float"):
        sdpa(q, k, v, **{arg: bad})
    if arg == "dropout_p":  # None is scale's default
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, k, v, dropout_p=None)
        with pytest.raises(TypeError, match="dropout_p must be a float, got NoneType None"):
            sdpa(q, k, v, dropout_p=None)


def test_bool_float_arguments_are_taken_like_torch():
    # torch takes a bool as 0.0 / 1.0: dropout_p False drops nothing, True
    # everything; scale True is 1.0.
    q, k, v = _qkv(1, 2, 6, 6, 8)
    torch.testing.assert_close(sdpa(q, k, v, scale=True), F.scaled_dot_product_attention(q, k, v, scale=True))
    torch.testing.assert_close(
        sdpa(q, k, v, dropout_p=False), F.scaled_dot_product_attention(q, k, v, dropout_p=False)
    )
    torch.testing.assert_close(
        sdpa(q, k, v, dropout_p=True), F.scaled_dot_product_attention(q, k, v, dropout_p=True)
    )


# ---------------------------------------------------------------------------
# float32 masks with low-precision inputs (torch accepts them)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("values", ["padding", "general"])
def test_float32_mask_with_low_precision_query_matches_torch(values, dtype, poison):
    q, k, v = _qkv(2, 3, 17, 23, 16, dtype=dtype)
    if values == "padding":  # 0 / -inf: exact in any dtype, runs on the kernel
        m = torch.zeros(2, 1, 1, 23).masked_fill(
            torch.arange(23) >= torch.tensor([23, 11]).view(2, 1, 1, 1), float("-inf")
        )
    else:  # values bf16 cannot hold: added in float32 as torch does
        m = torch.randn(17, 23) * 3 + 100.0
    out = sdpa(q, k, v, attn_mask=m)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m.double())
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert out.dtype == dtype
    assert_tolerance(f"fp32 mask {values}", out, ref, theirs, dtype)


# ---------------------------------------------------------------------------
# 4. output layout
# ---------------------------------------------------------------------------


def _layouts():
    yield "contiguous (B, H, L, E)", lambda t: t
    yield "(B, L, H, E) transposed", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)
    yield "(L, B, H, E) permuted", lambda t: t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)


@pytest.mark.parametrize("mode", ["auto", "kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(_layouts()), ids=lambda x: x[0] if isinstance(x, tuple) else str(x))
def test_output_layout_matches_torch(layout, dtype, mode, poison):
    _, relayout = layout
    q, k, v = (relayout(t) for t in _qkv(2, 3, 11, 11, 16, dtype=dtype))
    with pyfastattn.backend(mode):
        out = sdpa(q, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.stride() == theirs.stride(), f"{out.stride()} vs torch {theirs.stride()}"
    assert out.is_contiguous() == theirs.is_contiguous()
    assert torch.empty_like(out).stride() == torch.empty_like(theirs).stride()
    if theirs.is_contiguous():
        out.view(2, -1)  # user code like this must work as with torch


def test_output_layout_under_autograd_and_compile_fake():
    q, k, v = _qkv(2, 3, 11, 11, 16, requires_grad=True)
    out = sdpa(q, k, v)
    assert out.is_contiguous()
    out.view(2, -1).sum().backward()
    # the fake (meta) implementation allocates the same layout as the kernel
    qc = q.detach().transpose(1, 2)
    fake = torch.ops.pyfastattn.attention_fwd(
        qc.to("meta"), qc.to("meta"), qc.to("meta"), None, None, None, None, 11, 11, 0.25, 0.0, -1, -1, False
    )[0]
    real = torch.ops.pyfastattn.attention_fwd(
        qc, qc, qc, None, None, None, None, 11, 11, 0.25, 0.0, -1, -1, False
    )[0]
    assert fake.stride() == real.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_multihead_attention_float32_masks_with_low_precision_like_torch(dtype):
    """torch's MultiheadAttention (need_weights=False) takes float32 masks with
    bf16/fp16 inputs; so does ours, with the same numbers."""
    torch_mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).to(dtype)
    ours = pyfastattn.nn.MultiheadAttention(32, 4, batch_first=True).to(dtype)
    ours.load_state_dict(torch_mha.state_dict())
    x = torch.randn(2, 9, 32, dtype=dtype)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9)  # float32 0 / -inf
    general = torch.randn(9, 9) * 2
    kpm = torch.zeros(2, 9).masked_fill(torch.arange(9) >= 6, float("-inf"))
    for kw in ({"attn_mask": causal}, {"attn_mask": general}, {"key_padding_mask": kpm}):
        want = torch_mha(x, x, x, need_weights=False, **kw)[0]
        got = ours(x, x, x, need_weights=False, **kw)[0]
        m64 = {n: t.double() for n, t in kw.items()}
        ref_mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
        ref_mha.load_state_dict({n: t.double() for n, t in torch_mha.state_dict().items()})
        ref = ref_mha(x.double(), x.double(), x.double(), need_weights=False, **m64)[0]
        assert_tolerance(f"mha fp32 mask {list(kw)}", got, ref, want, dtype)
    with pytest.raises(RuntimeError, match="must be bool, float32 or have the query's dtype"):
        ours(x, x, x, need_weights=False, attn_mask=causal.double())


# ---------------------------------------------------------------------------
# A size-1 last dim with a stride other than 1 (torch calls such a tensor
# contiguous and .contiguous() returns it unchanged): accepted, as torch does
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "kernel"])
def test_size_one_last_dim_with_any_stride_like_torch(mode, poison):
    # a single key's value (S = 1, Ev = 1) sliced with a step, 3-D (past the fast path)
    q, k, v = torch.randn(1, 16, 16), torch.randn(1, 1, 16), torch.randn(1, 1, 2)[..., ::2]
    # a (L, 1) bool mask seen through a transpose (key length 1)
    q4, k4, v4 = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    m = torch.zeros(1, 5, dtype=torch.bool).t()
    m[1:] = True
    # the native API's Python path (seqused_k skips the fast path), v (B, S, H, 1) from a transpose
    qn, kn, vn = (
        torch.randn(2, 7, 1, 16),
        torch.randn(2, 5, 1, 16),
        torch.randn(2, 1, 5).transpose(1, 2)[:, :, None],
    )
    for t in (v, m, vn):
        assert t.is_contiguous() and t.stride(-1) != 1
    with pyfastattn.backend(mode):
        out = sdpa(q, k, v)
        out4 = sdpa(q4, k4, v4, attn_mask=m)
        outn = pyfastattn.attention(qn, kn, vn, seqused_k=torch.tensor([5, 3], dtype=torch.int32))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(out4, F.scaled_dot_product_attention(q4, k4, v4, attn_mask=m))
    keep = (torch.tensor([5, 3]).view(2, 1, 1, 1) > torch.arange(5)).expand(2, 1, 7, 5)
    theirs = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qn, kn, vn)), attn_mask=keep)
    torch.testing.assert_close(outn, theirs.transpose(1, 2))


def test_jit_trace_does_not_record_the_float32_mask_cast():
    # bf16 query with a float32 mask: the drop-in casts the mask to bf16 only
    # when every value survives the cast. A trace made with a 0 / -inf example
    # mask must not record that cast for the masks it is later given.
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.bfloat16) for _ in range(3))
    exact = torch.zeros(1, 1, 8, 8)
    exact[..., 5:] = float("-inf")

    def f(q, k, v, m):
        return pyfastattn.scaled_dot_product_attention(q, k, v, attn_mask=m)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(f, (q, k, v, exact), check_trace=False)
        fine = torch.randn(1, 1, 8, 8) * 3 + 0.001  # values bf16 cannot hold
        torch.testing.assert_close(traced(q, k, v, fine), f(q, k, v, fine), rtol=0, atol=0)
