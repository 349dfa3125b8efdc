"""CUDA-only checks (skipped without a GPU): streams, determinism, memory,
the backend rule for cases the CUDA kernel does not cover."""

from __future__ import annotations

import pytest
import torch

import pyfastattn
from pyfastattn import reference

from ._helpers import assert_tolerance, make_qkv, naive_attention

pytestmark = pytest.mark.gpu


def test_cuda_kernel_runs_on_the_current_stream():
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        q1, k1, v1 = make_qkv(4, 1024, 1024, 8, 8, 128, dtype=torch.bfloat16, device="cuda")
    with torch.cuda.stream(s2):
        q2, k2, v2 = make_qkv(4, 512, 777, 8, 2, 64, dtype=torch.float16, device="cuda")
    with pyfastattn.backend("kernel"):
        with torch.cuda.stream(s1):
            o1 = pyfastattn.attention(q1, k1, v1, causal=True)
        with torch.cuda.stream(s2):
            o2 = pyfastattn.attention(q2, k2, v2)
    torch.cuda.synchronize()
    for o, (q, k, v), causal in ((o1, (q1, k1, v1), True), (o2, (q2, k2, v2), False)):
        ref, _ = reference.attention(q.double(), k.double(), v.double(), window_right=0 if causal else -1,
                                     bottom_right=True)  # fmt: skip
        base = naive_attention(
            q, k, v, scale=q.shape[-1] ** -0.5, window_right=0 if causal else -1, bottom_right=True
        )
        assert_tolerance("stream", o, ref, base, q.dtype)


def test_cuda_forward_bit_identical_10_runs():
    q, k, v = make_qkv(2, 1000, 1100, 8, 4, 128, dtype=torch.bfloat16, device="cuda")
    with pyfastattn.backend("kernel"):
        first = pyfastattn.attention(q, k, v, causal=True, return_lse=True)
        for _ in range(9):
            o, lse = pyfastattn.attention(q, k, v, causal=True, return_lse=True)
            assert torch.equal(o, first[0]) and torch.equal(lse, first[1])


def test_cuda_memory_flat_over_many_calls():
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, dtype=torch.float16, device="cuda")
    with pyfastattn.backend("kernel"):
        for _ in range(100):
            pyfastattn.attention(q, k, v)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(10_000):
            pyfastattn.attention(q, k, v)
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 1 << 20


def test_cuda_unsupported_cases_follow_the_backend_rule():
    q, k, v = make_qkv(1, 8, 8, 1, 1, 320, dtype=torch.float16, device="cuda")
    with pyfastattn.backend("kernel"), pytest.raises(RuntimeError, match="head_dim"):
        pyfastattn.attention(q, k, v)
    q32 = q.float()
    with pyfastattn.backend("kernel"), pytest.raises(RuntimeError, match="float32"):
        pyfastattn.attention(q32, q32, q32)
    with pytest.warns(UserWarning, match="reference"):
        pyfastattn._backend._warned.clear()
        out = pyfastattn.attention(q, k, v)
    assert out.shape == q.shape


@pytest.mark.parametrize("d", [32, 40, 64, 96, 111, 128, 200, 256])
def test_cuda_head_dims_including_padded(d):
    q, k, v = make_qkv(2, 97, 113, 4, 2, d, dtype=torch.bfloat16, device="cuda", strided=True)
    with pyfastattn.backend("kernel"):
        out, lse = pyfastattn.attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), window_right=0, bottom_right=True)
    base = naive_attention(q, k, v, scale=d**-0.5, window_right=0, bottom_right=True)
    assert_tolerance(f"d{d}", out, ref, base, q.dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_cuda_declines_what_the_device_cannot_hold(monkeypatch):
    """The per-device shared-memory check, on any GPU: capped at 99 KB (sm_86 /
    sm_89) through PYFASTATTN_TEST_SMEM_LIMIT, the d = 256 backward (149 KB) is
    declined before launch -- a RuntimeError that says why under "kernel", the
    reference's gradients and one warning under "auto" -- while its forward
    (64 KB) still runs the kernel. Capped at 40000 bytes, the d = 128 forward
    (48 KB) is declined too, and "auto" falls back to the reference."""
    monkeypatch.setenv("PYFASTATTN_TEST_SMEM_LIMIT", str(99 * 1024))
    cap = torch.cuda.get_device_capability()
    monkeypatch.setattr(pyfastattn.functional, "CUDA_VERIFIED_CAPABILITIES", (cap,))
    q, k, v = (
        t.requires_grad_() for t in make_qkv(1, 33, 40, 2, 1, 256, dtype=torch.bfloat16, device="cuda")
    )
    dout = torch.randn_like(q)
    with pyfastattn.backend("kernel"):
        out = pyfastattn.attention(q, k, v, causal=True)
        with pytest.raises(RuntimeError, match="does not support this case.*shared memory"):
            torch.autograd.grad(out, (q, k, v), dout)
    pyfastattn._backend._warned.clear()
    with pytest.warns(UserWarning, match="shared memory"):
        out = pyfastattn.attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference.attention(qf, kf, vf, window_right=0, bottom_right=True)
    for got, want in zip(grads, torch.autograd.grad(ref_out, (qf, kf, vf), dout.float())):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)

    monkeypatch.setenv("PYFASTATTN_TEST_SMEM_LIMIT", "40000")
    q, k, v = make_qkv(1, 33, 40, 2, 1, 128, dtype=torch.bfloat16, device="cuda")
    with pyfastattn.backend("kernel"), pytest.raises(RuntimeError, match="shared memory"):
        pyfastattn.attention(q, k, v)
    pyfastattn._backend._warned.clear()
    with pytest.warns(UserWarning, match="shared memory"):
        out = pyfastattn.attention(q, k, v)
    ref, _ = reference.attention(q.float(), k.float(), v.float(), bottom_right=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
