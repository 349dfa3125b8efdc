"""pyfastattn.override_sdpa: torch.nn.functional.scaled_dot_product_attention
routed to the drop-in for a scope, and put back."""

import math
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import pyfastattn
import pyfastattn.sdpa_override as so

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _torch_function_is_back():
    assert F.scaled_dot_product_attention is TORCH_SDPA
    yield
    # every test leaves torch's own function in place, whatever it did
    if F.scaled_dot_product_attention is not TORCH_SDPA:
        F.scaled_dot_product_attention = TORCH_SDPA
        pytest.fail("the override was left installed")


def _truth(q, k, v, causal=False, mask=None):
    """float64 attention in torch's (B, H, L, E) layout."""
    qd, kd, vd = (t.double() for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, -1) @ vd


def _spy():
    """Counts the calls that reach pyfastattn's drop-in through the override."""
    return mock.patch.object(
        so, "scaled_dot_product_attention", wraps=pyfastattn.scaled_dot_product_attention
    )


def test_with_block_routes_and_restores():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 24) for _ in range(3))
    with _spy() as spy:
        with pyfastattn.override_sdpa() as handle:
            assert F.scaled_dot_product_attention is so.routed_scaled_dot_product_attention
            assert torch.nn.functional.scaled_dot_product_attention is so.routed_scaled_dot_product_attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            assert handle.active
        assert not handle.active
        assert spy.call_count == 1
    assert F.scaled_dot_product_attention is TORCH_SDPA
    ref = pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out.double(), _truth(q, k, v, causal=True), rtol=1e-5, atol=1e-5)


def test_every_argument_reaches_the_drop_in():
    torch.manual_seed(1)
    q = torch.randn(2, 4, 9, 16)
    k, v = torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    mask = torch.rand(2, 1, 9, 13) > 0.3
    mask[..., 0] = True
    with pyfastattn.override_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, 0.3, True)  # positional, as torch's
        out_kw = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, out_kw, rtol=0, atol=0)
    expect = TORCH_SDPA(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_restored_after_an_exception():
    with pytest.raises(KeyError):
        with pyfastattn.override_sdpa():
            raise KeyError("inside the block")
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_handle_without_with_and_restore_twice():
    handle = pyfastattn.override_sdpa()
    try:
        assert F.scaled_dot_product_attention is so.routed_scaled_dot_product_attention
    finally:
        handle.restore()
    handle.restore()  # a second restore does nothing
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert "active=False" in repr(handle)


def test_nested_overrides_restore_in_order():
    outer = pyfastattn.override_sdpa()
    inner = pyfastattn.override_sdpa()
    inner.restore()
    assert F.scaled_dot_product_attention is so.routed_scaled_dot_product_attention
    outer.restore()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_restore_refuses_to_clobber_a_later_replacement():
    def other(*args, **kwargs):
        return TORCH_SDPA(*args, **kwargs)

    handle = pyfastattn.override_sdpa()
    F.scaled_dot_product_attention = other
    try:
        with pytest.raises(RuntimeError, match="replaced again"):
            handle.restore()
        assert handle.active
    finally:
        F.scaled_dot_product_attention = so.routed_scaled_dot_product_attention
        handle.restore()


def test_fallbacks_to_torch_do_not_come_back_through_the_override():
    # float64 and a mask that wants a gradient are not the kernel's: the drop-in
    # hands them to torch's SDPA, which must be torch's own function, not the
    # override (else: RecursionError).
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 11, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(1, 2, 11, 11, dtype=torch.float64, requires_grad=True)
    with pyfastattn.override_sdpa(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = F.scaled_dot_product_attention(q, k, v)
        out_m = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, _truth(q, k, v))
    torch.testing.assert_close(out_m, _truth(q, k, v, mask=mask.detach()))
    (g,) = torch.autograd.grad(out_m.sum(), mask)
    assert torch.isfinite(g).all()


def test_torch_function_subclasses_get_torch_s_own_function():
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    q, k, v = (torch.randn(1, 2, 5, 8).as_subclass(Logged) for _ in range(3))
    with pyfastattn.override_sdpa():
        out = F.scaled_dot_product_attention(q, k, v)
    assert TORCH_SDPA in seen
    assert so.routed_scaled_dot_product_attention not in seen
    torch.testing.assert_close(out.as_subclass(torch.Tensor).double(), _truth(q, k, v), rtol=1e-5, atol=1e-5)


def test_torch_function_modes_get_torch_s_own_function():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    with _spy() as spy, pyfastattn.override_sdpa():
        with torch.device("cpu"):  # a TorchFunctionMode
            out = F.scaled_dot_product_attention(q, k, v)
        assert spy.call_count == 0
        F.scaled_dot_product_attention(q, k, v)
        assert spy.call_count == 1
    torch.testing.assert_close(out.double(), _truth(q, k, v), rtol=1e-5, atol=1e-5)


def test_causal_bias_masks_run_the_drop_in():
    from torch.nn.attention.bias import causal_lower_right

    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16) for n in (4, 10, 10))
    with _spy() as spy, pyfastattn.override_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(4, 10))
    assert spy.call_count == 1
    vis = torch.arange(10)[None, :] <= torch.arange(4)[:, None] + 6
    torch.testing.assert_close(out.double(), _truth(q, k, v, mask=vis), rtol=1e-5, atol=1e-5)


def test_multihead_attention_python_path_is_routed():
    # nn.MultiheadAttention outside its fast path (training mode) runs
    # F.multi_head_attention_forward, which looks the function up by name.
    torch.manual_seed(4)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).train()
    x = torch.randn(2, 7, 32)
    ref, _ = mha(x, x, x, need_weights=False)
    with _spy() as spy, pyfastattn.override_sdpa():
        out, _ = mha(x, x, x, need_weights=False)
    assert spy.call_count == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gradients_through_the_override_match_torch():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 19, 16, requires_grad=True) for _ in range(3))
    with pyfastattn.override_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = TORCH_SDPA(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_function_under_the_override():
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    with pyfastattn.override_sdpa():
        out = torch.compile(f, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out.double(), 2 * _truth(q, k, v, causal=True), rtol=1e-5, atol=1e-5)


def test_reference_backend_under_the_override():
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    with pyfastattn.backend("reference"), pyfastattn.override_sdpa():
        out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.double(), _truth(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_override_on_cuda_matches_torch_within_its_error(dtype):
    # On a GPU the drop-in runs the CUDA kernel where verified, else hands the
    # call to torch's SDPA: either way the override must give torch's numbers
    # (within the tolerance rule: at most twice torch's own error).
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 4, 333, 64, device="cuda", dtype=dtype) for _ in range(3))
    with pyfastattn.override_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    theirs = TORCH_SDPA(q, k, v, is_causal=True)
    truth = _truth(q.cpu(), k.cpu(), v.cpu(), causal=True)
    err = (out.cpu().double() - truth).abs().max().item()
    base = (theirs.cpu().double() - truth).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)
