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
    # auto on an unsupported head dim: torch's SDPA, said once (issue 14)
    with pytest.warns(UserWarning, match="scaled_dot_product_attention"):
        pyfastattn._backend._warned.clear()
        out = pyfastattn.attention(q, k, v)
    ref, _ = reference.attention(q.double(), k.double(), v.double())
    assert_tolerance("out", out, ref, naive_attention(q, k, v, scale=320**-0.5), q.dtype)


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


# Run in a child process: before the fix, a misaligned 16-byte cp.async was a
# fault that loses the CUDA context, and every later GPU test of the session
# would have failed with it.
_MISALIGNED = r"""
import torch, pyfastattn  # noqa: F401  (registers the ops)

torch.manual_seed(0)


def offset_view(shape, offset, dtype):
    # Contiguous, but data_ptr is `offset` elements past an aligned block:
    # t.contiguous() is a no-op on it.
    n = 1
    for s in shape:
        n *= s
    t = torch.randn(n + offset, device="cuda", dtype=dtype)[offset:].view(shape)
    assert t.is_contiguous() and t.data_ptr() % 16 != 0
    return t


for dtype in (torch.bfloat16, torch.float16):
    for offset in (1, 3, 4, 7):
        b, sq, sk, hq, hk, d = 2, 97, 130, 4, 2, 64
        q = offset_view((b, sq, hq, d), offset, dtype)
        k = offset_view((b, sk, hk, d), offset, dtype)
        v = offset_view((b, sk, hk, d), offset, dtype)
        args = (None, None, None, None, 0, 0, d**-0.5, 0.0, -1, 0, True)
        out, lse = torch.ops.pyfastattn.attention_fwd(q, k, v, *args)
        fresh = [t.clone() for t in (q, k, v)]
        out2, lse2 = torch.ops.pyfastattn.attention_fwd(*fresh, *args)
        assert torch.equal(out, out2) and torch.equal(lse, lse2), ("forward", dtype, offset)
        # backward: dout and out misaligned too, deterministic (bit-comparable)
        dout = offset_view(tuple(out.shape), offset, dtype)
        out_off = offset_view(tuple(out.shape), offset, dtype)
        out_off.copy_(out)
        g = torch.ops.pyfastattn.attention_bwd(dout, q, k, v, out_off, lse, *args, True)
        g2 = torch.ops.pyfastattn.attention_bwd(dout.clone(), *fresh, out.clone(), lse, *args, True)
        for a, c in zip(g, g2):
            assert torch.equal(a, c), ("backward", dtype, offset)
        # varlen (3-dim) views and the public API's autograd path
        qv = offset_view((sq, hq, d), offset, dtype).detach().requires_grad_()
        kv = offset_view((sk, hk, d), offset, dtype).detach().requires_grad_()
        cu_q = torch.tensor([0, 40, sq], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, 50, sk], dtype=torch.int32, device="cuda")
        with pyfastattn.backend("kernel"):
            o = pyfastattn.attention(qv, kv, kv, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                     max_seqlen_q=57, max_seqlen_k=80)
            o.sum().backward()
torch.cuda.synchronize()
assert torch.isfinite(torch.ones(4, device="cuda").sum())  # the context is still alive
print("OK")
"""


def test_cuda_misaligned_offset_views_are_copied_not_faulted():
    """q, k, v, out and dout that are contiguous views 1, 3, 4 and 7 elements
    past an aligned block (buf.view(-1)[4:].view(b, s, h, d)): the glue copies
    them into fresh tensors; the results equal those of aligned copies bit for
    bit, forward and deterministic backward, dense and varlen; and the CUDA
    context survives."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _MISALIGNED], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.parametrize("d", [64, 128])
def test_cuda_outputs_fully_written_under_nan_poison(d, poison):
    """Every torch.empty is NaN (the poison fixture) -- the kernel's outputs and
    workspaces included: forward and backward (deterministic, as poison turns
    deterministic algorithms on) must overwrite every element they return."""
    q, k, v = (
        t.requires_grad_() for t in make_qkv(2, 333, 517, 4, 2, d, dtype=torch.bfloat16, device="cuda")
    )
    with pyfastattn.backend("kernel"):
        out, lse = pyfastattn.attention(q, k, v, causal=True, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, t in (("out", out), ("lse", lse), ("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2])):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"
    ref, _ = reference.attention(q.double(), k.double(), v.double(), window_right=0, bottom_right=True)
    base = naive_attention(q, k, v, scale=d**-0.5, window_right=0, bottom_right=True)
    assert_tolerance(f"poisoned d{d}", out, ref, base, q.dtype)
