"""Context-parallel attention on CPU over gloo, in real processes.

Each test spawns 2 or 4 processes (torch.multiprocessing, one thread each),
shards a full sequence with ``shard_sequence``, runs ``ring_attention`` or
``ulysses_attention``, gathers outputs and input gradients, and compares them
on rank 0 with the float64 reference on the full sequence under the tolerance
rule (error <= 2x plain PyTorch's error in the same dtype + rounding floor).
The merge op is tested in-process against its reference.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyfastattn
from pyfastattn import reference
from pyfastattn.distributed import (
    _merge_ops,
    merge_attention_states,
    merge_attention_states_reference,
    ring_attention,
    shard_sequence,
    ulysses_attention,
    unshard_sequence,
)
from pyfastattn.testing import tolerance_failure

from ._helpers import naive_attention

# ---------------------------------------------------------------------------
# merge_attention_states (in process)
# ---------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _parts(b=2, s=13, h=3, d=20, dtype=torch.float32, split=6):
    import pyfastattn

    q = torch.randn(b, s, h, d, dtype=dtype)
    k = torch.randn(b, 17, h, d, dtype=dtype)
    v = torch.randn(b, 17, h, d, dtype=dtype)
    full = pyfastattn.attention(q, k, v, return_lse=True)
    a = pyfastattn.attention(q, k[:, :split], v[:, :split], return_lse=True)
    bb = pyfastattn.attention(q, k[:, split:], v[:, split:], return_lse=True)
    ref = reference.attention(q.double(), k.double(), v.double(), scale=1 / math.sqrt(d))
    return a, bb, full, ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_full_attention(dtype, poison):
    (oa, la), (ob, lb), (of, lf), (oref, lref) = _parts(dtype=dtype)
    out, lse = merge_attention_states(oa, la, ob, lb)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # the merged result is as good as the single call: same rule, same baseline
    fail = tolerance_failure("merged out", out, oref, of, dtype)
    assert fail is None, fail
    assert (lse.double() - lref).abs().max() < 1e-5
    r_out, r_lse = merge_attention_states_reference(oa, la, ob, lb)
    assert (out.double() - r_out.double()).abs().max() <= (2e-6 if dtype == torch.float32 else 1e-2)
    assert (lse - r_lse).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_mixed_dtype_accumulator(dtype):
    (oa, la), (ob, lb), _, (oref, _) = _parts(dtype=dtype)
    out, lse = merge_attention_states(oa.float(), la, ob, lb)
    assert out.dtype == torch.float32
    r_out, _ = merge_attention_states_reference(oa.float(), la, ob, lb)
    assert (out - r_out).abs().max() < 2e-6


def test_merge_fully_masked_rows_give_no_nan(poison):
    oa = torch.randn(1, 4, 2, 8)
    ob = torch.randn(1, 4, 2, 8)
    la = torch.randn(1, 2, 4)
    lb = torch.randn(1, 2, 4)
    la[0, 0, 1] = float("-inf")  # only b saw keys
    lb[0, 1, 2] = float("-inf")  # only a saw keys
    la[0, 1, 3] = lb[0, 1, 3] = float("-inf")  # nobody did
    oa[0, 1, 0] = float("nan")  # garbage where a part has weight 0 is never read
    ob[0, 2, 1] = float("nan")
    oa[0, 3, 1] = ob[0, 3, 1] = float("nan")
    out, lse = merge_attention_states(oa, la, ob, lb)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0, 1, 0], ob[0, 1, 0])
    assert torch.equal(out[0, 2, 1], oa[0, 2, 1])
    assert torch.equal(out[0, 3, 1], torch.zeros(8)) and lse[0, 1, 3] == float("-inf")
    r_out, r_lse = merge_attention_states_reference(oa, la, ob, lb)
    assert torch.allclose(out, r_out, atol=1e-6) and torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    # gradients: finite everywhere, zero for a part of weight 0
    oa2, ob2 = oa.nan_to_num(0).requires_grad_(), ob.nan_to_num(0).requires_grad_()
    la2, lb2 = la.clone().requires_grad_(), lb.clone().requires_grad_()
    o2, l2 = merge_attention_states(oa2, la2, ob2, lb2)
    (o2.sum() + l2.nan_to_num(0, 0, 0).sum()).backward()
    for t in (oa2, ob2, la2, lb2):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(oa2.grad[0, 1, 0], torch.zeros(8))


def test_merge_head_dim_one_with_a_stride():
    """A head-dim-1 output viewed with a step (a size-1 last dim with stride 2,
    which torch calls contiguous) merges like its contiguous copy."""
    (oa, la), (ob, lb), _, _ = _parts(d=1)
    va, vb = (t.as_strided(t.shape, (*t.stride()[:3], 2)) for t in (oa.contiguous(), ob.contiguous()))
    assert va.stride(-1) == 2 and va.is_contiguous() and torch.equal(va, oa)
    out, lse = merge_attention_states(va, la, vb, lb)
    want, want_lse = merge_attention_states(oa, la, ob, lb)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_merge_bad_input_is_invalid_argument_error():
    """The package's errors for bad arguments are pyfastattn.InvalidArgumentError
    (a ValueError and a RuntimeError), as everywhere else in pyfastattn."""
    (oa, la), (ob, lb), _, _ = _parts()
    with pytest.raises(pyfastattn.InvalidArgumentError, match=r"lse_b.shape must be"):
        merge_attention_states(oa, la, ob, lb[:, :, :-1])
    with pytest.raises(pyfastattn.InvalidArgumentError, match=r"rank must be an int"):
        shard_sequence(torch.zeros(1, 8, 1, 4), world_size=2, rank=5)


def test_merge_packed_layout():
    oa, ob = torch.randn(7, 3, 5), torch.randn(7, 3, 5)
    la, lb = torch.randn(3, 7), torch.randn(3, 7)
    out, lse = merge_attention_states(oa, la, ob, lb)
    r_out, r_lse = merge_attention_states_reference(oa[None], la[None], ob[None], lb[None])
    assert out.shape == (7, 3, 5) and lse.shape == (3, 7)
    assert torch.allclose(out, r_out[0], atol=1e-6) and torch.allclose(lse, r_lse[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_gradients(dtype):
    torch.manual_seed(1)
    args = [
        torch.randn(2, 5, 3, 4, dtype=dtype),
        torch.randn(2, 3, 5),
        torch.randn(2, 5, 3, 4, dtype=dtype),
        torch.randn(2, 3, 5),
    ]
    g_out, g_lse = torch.randn(2, 5, 3, 4), torch.randn(2, 3, 5)

    def grads(fn):
        xs = [a.clone().requires_grad_() for a in args]
        o, lse = fn(*xs)
        ((o.float() * g_out).sum() + (lse * g_lse).sum()).backward()
        return [x.grad.float() for x in xs]

    got = grads(merge_attention_states)
    want = grads(
        lambda a, b, c, d: merge_attention_states_reference(a.double(), b.double(), c.double(), d.double())
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g, w in zip(got, want):
        assert (g - w).abs().max() < tol * (1 + w.abs().max())


@pytest.mark.skipif(not _merge_ops.has_kernel("cpu"), reason="extension not built")
def test_merge_opcheck():
    args = (
        torch.randn(2, 5, 3, 4),
        torch.randn(2, 3, 5),
        torch.randn(2, 5, 3, 4, dtype=torch.bfloat16),
        torch.randn(2, 3, 5),
    )
    torch.library.opcheck(torch.ops.pyfastattn.merge_attention_states.default, args)
    strided = (
        torch.randn(2, 3, 5, 4).transpose(1, 2),
        torch.randn(2, 5, 3).transpose(1, 2),
        torch.randn(2, 5, 3, 4),
        torch.randn(2, 3, 5),
    )
    torch.library.opcheck(torch.ops.pyfastattn.merge_attention_states.default, strided)


def test_merge_bad_input():
    oa, la = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match=r"lse_b.shape must be \(1, 2, 4\)"):
        merge_attention_states(oa, la, oa, torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="out_b.shape must equal out_a.shape"):
        merge_attention_states(oa, la, torch.randn(1, 4, 2, 7), la)
    with pytest.raises(ValueError, match="lse_a.dtype must be torch.float32"):
        merge_attention_states(oa, la.half(), oa, la)
    with pytest.raises(ValueError, match="out_a must have 4 dims"):
        merge_attention_states(oa[0, 0], la, oa, la)


# ---------------------------------------------------------------------------
# layout helpers (pure)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_unshard_roundtrip(zigzag, world):
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    shards = [shard_sequence(x, r, world, zigzag=zigzag) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, zigzag=zigzag), x)
    if zigzag and world == 2:  # chunks of 6: rank 0 holds 0 and 3, rank 1 holds 1 and 2
        assert torch.equal(shards[0][0, :, 0], torch.cat([x[0, 0:6, 0], x[0, 18:24, 0]]))
    y = torch.randn(2, 21, 3)
    with pytest.raises(ValueError, match=r"sequence length 21\) must be a multiple of"):
        shard_sequence(y, 0, world if world > 1 else 2, zigzag=zigzag)
    padded = [shard_sequence(y, r, world, zigzag=zigzag, pad=True) for r in range(world)]
    assert torch.equal(unshard_sequence(padded, zigzag=zigzag, seqlen=21), y)
    with pytest.raises(ValueError, match="rank must be an int in"):
        shard_sequence(x, world, world)


# ---------------------------------------------------------------------------
# multi-process: ring and Ulysses against the full-sequence reference
# ---------------------------------------------------------------------------


def _spawn(fn, world: int, *args, timeout: float | None = None) -> None:
    """Runs ``fn(rank, world, store, *args)`` in ``world`` processes; with a
    ``timeout`` (seconds) a hang fails the test instead of the run."""
    with tempfile.TemporaryDirectory() as d:
        args = (world, os.path.join(d, "store"), *args)
        if timeout is None:
            mp.spawn(fn, args=args, nprocs=world, join=True)
            return
        ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                    p.join()
                raise AssertionError(f"{fn.__name__} (world {world}) hung: still running after {timeout} s")


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    # the poison fixture, in the worker: every torch.empty is NaN, so a row the
    # ring or a kernel forgets to write fails; also the deterministic backward
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _gather(x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return out


# (name, method, dtype, causal, window, hq, hk, seqlen, zigzag, softcap)
CASES = [
    ("ring fp32", "ring", torch.float32, False, (-1, -1), 4, 4, 24, True, 0.0),
    ("ring fp32 causal zigzag GQA", "ring", torch.float32, True, (-1, -1), 4, 2, 24, True, 0.0),
    ("ring bf16 causal zigzag", "ring", torch.bfloat16, True, (-1, -1), 4, 4, 24, True, 0.0),
    ("ring bf16 GQA", "ring", torch.bfloat16, False, (-1, -1), 4, 1, 24, True, 0.0),
    ("ring fp32 odd length padded", "ring", torch.float32, False, (-1, -1), 2, 2, 21, True, 0.0),
    ("ring bf16 causal odd length padded", "ring", torch.bfloat16, True, (-1, -1), 2, 1, 21, True, 0.0),
    ("ring fp32 causal contiguous", "ring", torch.float32, True, (-1, -1), 2, 2, 24, False, 0.0),
    ("ring fp32 window softcap", "ring", torch.float32, False, (5, 2), 2, 2, 24, True, 5.0),
    ("ring fp32 causal window", "ring", torch.float32, True, (4, -1), 2, 1, 24, True, 0.0),
    ("ulysses fp32", "ulysses", torch.float32, False, (-1, -1), 4, 4, 24, False, 0.0),
    ("ulysses fp32 causal GQA", "ulysses", torch.float32, True, (-1, -1), 4, 2, 24, False, 0.0),
    ("ulysses bf16 causal MQA", "ulysses", torch.bfloat16, True, (-1, -1), 4, 1, 24, False, 0.0),
    ("ulysses fp32 window softcap", "ulysses", torch.float32, False, (3, 5), 4, 2, 24, False, 2.0),
    ("ulysses bf16 odd length padded", "ulysses", torch.bfloat16, False, (-1, -1), 4, 2, 21, False, 0.0),
]


def _run_case(rank, world, case) -> list[str]:
    name, method, dtype, causal, window, hq, hk, seqlen, zigzag, softcap = case
    b, d = 2, 16
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(b, seqlen, hq, d, generator=g).to(dtype)
    k = torch.randn(b, seqlen, hk, d, generator=g).to(dtype)
    v = torch.randn(b, seqlen, hk, d, generator=g).to(dtype)
    dout = torch.randn(b, seqlen, hq, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)
    wl, wr = window[0], 0 if causal else window[1]

    shard = lambda t: shard_sequence(t, rank, world, zigzag=zigzag, pad=True)  # noqa: E731
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    fn = ring_attention if method == "ring" else ulysses_attention
    kw = dict(causal=causal, window_size=window, softcap=softcap, seqlen=seqlen, return_lse=True)
    if method == "ring":
        kw["zigzag"] = zigzag
    out, lse = fn(ql, kl, vl, **kw)
    out.backward(shard(dout))
    got = {
        "out": unshard_sequence(_gather(out), zigzag=zigzag, seqlen=seqlen),
        "lse": unshard_sequence(_gather(lse), dim=2, zigzag=zigzag, seqlen=seqlen),
        "dq": unshard_sequence(_gather(ql.grad), zigzag=zigzag, seqlen=seqlen),
        "dk": unshard_sequence(_gather(kl.grad), zigzag=zigzag, seqlen=seqlen),
        "dv": unshard_sequence(_gather(vl.grad), zigzag=zigzag, seqlen=seqlen),
    }
    if rank != 0:
        return []

    def grads(attn, qq, kk, vv):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (qq, kk, vv))
        o = attn(qq, kk, vv)
        o.backward(dout.to(o.dtype))
        return o, qq.grad, kk.grad, vv.grad

    mask_kw = dict(scale=scale, softcap=softcap, window_left=wl, window_right=wr, bottom_right=False)
    ref = grads(
        lambda a, b_, c: reference.attention(a, b_, c, **mask_kw)[0], q.double(), k.double(), v.double()
    )
    _, ref_lse = reference.attention(q.double(), k.double(), v.double(), **mask_kw)
    base = grads(lambda a, b_, c: naive_attention(a, b_, c, **mask_kw), q, k, v)
    failures = []
    for key, r, bl in zip(("out", "dq", "dk", "dv"), ref, base):
        f = tolerance_failure(f"{name} P={world} {key}", got[key], r, bl, dtype)
        if f:
            failures.append(f)
    lse_err = (got["lse"].double() - ref_lse).abs().max().item()
    if not lse_err < 1e-4:
        failures.append(f"{name} P={world} lse: max error {lse_err:.3e}")
    return failures


def _worker_cases(rank, world, store, cases, backend="auto"):
    _init(rank, world, store)
    pyfastattn.set_backend(backend)
    failures = []
    for case in cases:
        failures += _run_case(rank, world, case)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    if failures:
        raise AssertionError("\n".join(failures))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_context_parallel_matches_full_sequence(world, method):
    _spawn(_worker_cases, world, [c for c in CASES if c[1] == method])


# float64 runs on the reference path (forward and the ring's reference block
# backward); the rule's fp64 floor (1e-12 relative) checks the algebra itself.
REFERENCE_CASES = [
    ("ring fp64 causal window odd length", "ring", torch.float64, True, (4, -1), 4, 2, 21, True, 0.0),
    ("ring fp64 window softcap", "ring", torch.float64, False, (3, 5), 2, 1, 24, True, 3.0),
    ("ulysses fp64 causal odd length", "ulysses", torch.float64, True, (-1, -1), 4, 2, 21, False, 0.0),
]


def test_context_parallel_reference_backend_fp64():
    _spawn(_worker_cases, 2, REFERENCE_CASES, "reference")


def _worker_errors(rank, world, store):
    _init(rank, world, store)
    x = torch.randn(1, 6, 3, 8)
    with pytest.raises(ValueError, match=r"q heads divisible by the group size: Hq = 3, group size = 2"):
        ulysses_attention(x, x, x)
    with pytest.raises(ValueError, match=r"k heads to be a multiple or a divisor .* Hk = 3"):
        ulysses_attention(torch.randn(1, 6, 6, 8), x, x)
    with pytest.raises(ValueError, match="local sequence length must be even"):
        ring_attention(torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8))
    # shapes that differ between ranks: every rank raises, naming the field and each rank's value
    s = 4 if rank == 0 else 6
    t = torch.randn(1, s, 2, 8)
    with pytest.raises(ValueError, match=r"S_local must be the same on every rank .* rank 0: 4, rank 1: 6"):
        ring_attention(t, t, t)
    # float options too: a softcap or scale that differs between ranks gave each rank its own answer
    t = torch.randn(1, 4, 2, 8)
    with pytest.raises(
        ValueError, match=r"softcap must be the same on every rank .* rank 0: 1.0, rank 1: 2.0"
    ):
        ring_attention(t, t, t, softcap=1.0 + rank)
    with pytest.raises(
        ValueError, match=r"softmax_scale must be the same on every rank .* rank 0: 0.5, rank 1: 0.25"
    ):
        ulysses_attention(t, t, t, softmax_scale=0.5 / (1 + rank))
    # return_lse adds an all-to-all in Ulysses: on one rank only, the others never answer it
    with pytest.raises(
        ValueError, match=r"return_lse must be the same on every rank .* rank 0: 1, rank 1: 0"
    ):
        ulysses_attention(t, t, t, return_lse=rank == 0)
    with pytest.raises(ValueError, match=r"seqlen must be an int in \[0, world_size \* S_local = 12\]"):
        ring_attention(torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8), seqlen=13)
    # found before any communication, not by a block in the middle of the ring
    x = torch.ones(1, 4, 2, 8, dtype=torch.int64)
    for fn in (ring_attention, ulysses_attention):
        with pytest.raises(ValueError, match=r"q.dtype must be a floating-point dtype, got torch.int64"):
            fn(x, x, x)
    # a graph on one rank only: that rank's backward would wait for the others forever
    for fn in (ring_attention, ulysses_attention):
        t = torch.randn(1, 4, 2, 8, requires_grad=rank == 0)
        with pytest.raises(
            ValueError, match=r"requires grad .* must be the same on every rank .* rank 0: 1, rank 1: 0"
        ):
            fn(t, t, t)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def test_context_parallel_bad_input():
    _spawn(_worker_errors, 2)


def test_needs_process_group():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        ring_attention(x, x, x)


def _compare_causal(label, got, q, k, v, dout, *, baseline: bool) -> list[str]:
    """Rank 0's check of gathered fp32 ``got`` = (out, dq, dk, dv) against
    causal attention of the full q, k, v (backward with ``dout``) in the
    float64 reference; ``baseline``: with plain PyTorch's fp32 error as the
    tolerance's baseline (else the rounding floor alone). Returns failures."""
    d = q.shape[-1]
    scale = 1.0 if d == 0 else 1 / math.sqrt(d)  # d = 0: every score is 0 whatever the scale
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    o, _ = reference.attention(*ref, scale=scale, window_right=0)
    o.backward(dout.double())
    bases = [None] * 4
    if baseline:
        base = [t.detach().requires_grad_() for t in (q, k, v)]
        ob = naive_attention(*base, scale=scale, window_right=0)
        ob.backward(dout)
        bases = [ob, *(t.grad for t in base)]
    failures = []
    for name, x, r, bl in zip(("out", "dq", "dk", "dv"), got, (o, *(t.grad for t in ref)), bases):
        f = tolerance_failure(f"{label} {name}", x, r, bl, torch.float32)
        if f:
            failures.append(f)
    return failures


def _finish(failures: list[str]) -> None:
    """A worker's end: no rank tears gloo down while another still talks to
    it; then this rank's failures, if any."""
    dist.barrier()
    dist.destroy_process_group()
    if failures:
        raise AssertionError("\n".join(failures))


def _worker_strided_head_dim(rank, world, store):
    # q, k, v whose head dim is not unit-stride (views of (..., D, H)-major
    # storage): the forward copies them for the kernel, but the ring's backward
    # passed the saved q to the kernel backward as it was, which raised "q must
    # be contiguous in its last dimension" in the middle of the ring (its
    # first K/V hop already posted).
    _init(rank, world, store)
    g = torch.Generator().manual_seed(5)
    b, s, h, d = 1, 8 * world, 2, 16
    q, k, v, dout = (torch.randn(b, s, h, d, generator=g) for _ in range(4))
    failures = []
    for method in ("ring", "ulysses"):
        zigzag = method == "ring"
        leaves = [
            shard_sequence(t, rank, world, zigzag=zigzag).transpose(-1, -2).contiguous() for t in (q, k, v)
        ]
        leaves = [t.requires_grad_() for t in leaves]
        fn = ring_attention if method == "ring" else ulysses_attention
        out = fn(*(t.transpose(-1, -2) for t in leaves), causal=True)
        out.backward(shard_sequence(dout, rank, world, zigzag=zigzag))
        got = [
            unshard_sequence(_gather(t), zigzag=zigzag)
            for t in (out, *(t.grad.transpose(-1, -2) for t in leaves))
        ]
        if rank == 0:
            failures += _compare_causal(f"{method} strided head dim", got, q, k, v, dout, baseline=True)
    _finish(failures)


def test_context_parallel_head_dim_with_a_stride():
    _spawn(_worker_strided_head_dim, 2)


def _worker_empty_sizes(rank, world, store):
    # Sizes pyfastattn.attention takes (its reference handles them) crashed
    # the context-parallel paths: an empty batch in the ring's backward (the
    # kernel backward refused the empty, stride-0 dout, with the first K/V hop
    # already posted), head dim 0 with the default scale in both
    # (ZeroDivisionError from 1/sqrt(0); every score is 0 whatever the scale).
    _init(rank, world, store)
    g = torch.Generator().manual_seed(3)
    s = 4 * world
    failures = []
    for method, b, d in (("ring", 0, 8), ("ring", 1, 0), ("ulysses", 1, 0)):
        zigzag = method == "ring"
        q, k = (torch.randn(b, s, 2, d, generator=g) for _ in range(2))
        v, dout = (torch.randn(b, s, 2, 8, generator=g) for _ in range(2))
        leaves = [shard_sequence(t, rank, world, zigzag=zigzag).requires_grad_() for t in (q, k, v)]
        fn = ring_attention if method == "ring" else ulysses_attention
        out = fn(*leaves, causal=True)
        out.sum().backward() if b == 0 else out.backward(shard_sequence(dout, rank, world, zigzag=zigzag))
        got = [unshard_sequence(_gather(t), zigzag=zigzag) for t in (out, *(t.grad for t in leaves))]
        if rank == 0:
            failures += _compare_causal(f"{method} b={b} d={d}", got, q, k, v, dout, baseline=False)
    _finish(failures)


def test_context_parallel_empty_batch_and_head_dim():
    _spawn(_worker_empty_sizes, 2)


def _injected_kernel_error(*a, **kw):
    raise RuntimeError("injected kernel error")


def _causal_case(seed, b, s, h, d):
    """q, k, v, dout (B, S, H, D) fp32 drawn from ``seed``, and the float64
    causal reference: (out, lse, dq, dk, dv), detached."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(b, s, h, d, generator=g) for _ in range(4))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = reference.attention(*ref, scale=1 / math.sqrt(d), window_right=0)
    o_ref.backward(dout.double())
    return (q, k, v, dout), (o_ref.detach(), lse_ref.detach(), *(t.grad for t in ref))


def _assert_close_on(rank, got, want, what, tol=1e-4):
    err = (got.double() - want.double()).abs().max().item()
    assert err < tol, f"rank {rank} {what}: max error {err:.3e}"


def _worker_error_mid_ring(rank, world, store):
    # A ring call whose local work raises on one rank (injected here; a kernel
    # error or out-of-memory in practice) raised there at once, leaving its
    # posted send/receive unwaited while the other ranks waited for hops it
    # would never send: the backward hung (and a stale hop could meet the
    # next call's). Now the failing rank keeps the ring moving and raises at
    # its end; the group stays usable for the next call.
    import pyfastattn.distributed.ring as ring_mod

    _init(rank, world, store)
    (q, k, v, dout), (o_ref, _, *grads) = _causal_case(11, 1, 8 * world, 2, 16)
    want = [shard_sequence(t.float(), rank, world) for t in (o_ref, *grads)]
    shard = lambda t: shard_sequence(t, rank, world).requires_grad_()  # noqa: E731
    injected = _injected_kernel_error

    def check(got, want_, what):
        _assert_close_on(rank, got, want_, what)

    def good_call():  # forward and backward, both right on every rank
        leaves = [shard(t) for t in (q, k, v)]
        out = ring_attention(*leaves, causal=True)
        out.backward(shard_sequence(dout, rank, world))
        for name, x, w in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)), want):
            check(x, w, f"good call after a failure: {name}")

    # forward: rank 0's local kernel fails at the first block
    saved = ring_mod.block_forward
    if rank == 0:
        ring_mod.block_forward = injected
    leaves = [shard(t) for t in (q, k, v)]
    if rank == 0:
        with pytest.raises(RuntimeError, match="injected kernel error"):
            ring_attention(*leaves, causal=True)
    else:
        check(ring_attention(*leaves, causal=True), want[0], "other rank's out")
    ring_mod.block_forward = saved
    good_call()

    # backward: rank 0's block backward fails
    saved = ring_mod.block_backward
    if rank == 0:
        ring_mod.block_backward = injected
    leaves = [shard(t) for t in (q, k, v)]
    out = ring_attention(*leaves, causal=True)
    if rank == 0:
        with pytest.raises(RuntimeError, match="injected kernel error"):
            out.backward(shard_sequence(dout, rank, world))
    else:
        out.backward(shard_sequence(dout, rank, world))
        check(leaves[0].grad, want[1], "other rank's dq")
        # dK/dV that passed through the failing rank: NaN, not silently short of its share
        assert torch.isnan(leaves[1].grad).all() and torch.isnan(leaves[2].grad).all()
    ring_mod.block_backward = saved
    good_call()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ring_error_on_one_rank_leaves_group_usable(world):
    _spawn(_worker_error_mid_ring, world, timeout=120)


def _worker_error_mid_ulysses(rank, world, store):
    # A Ulysses call whose local kernel raises on one rank (injected; a kernel
    # error or out-of-memory in practice) raised there between the two
    # all-to-alls, and the other ranks waited in the second one forever (in
    # the backward: in the input gradients' all-to-alls). Now the failing rank
    # runs the same collectives with NaN in place of its heads and raises
    # after them; the group stays usable.
    import pyfastattn.distributed.ulysses as uly

    _init(rank, world, store)
    h = 2 * world
    mine = slice(0, h // world)  # the heads rank 0 computes
    rest = slice(h // world, h)
    (q, k, v, dout), (o_ref, lse_ref, *grads) = _causal_case(12, 1, 4 * world, h, 16)
    sh = lambda t: shard_sequence(t, rank, world, zigzag=False)  # noqa: E731
    want = [sh(t.float()) for t in (o_ref, *grads)]
    want_lse = sh(lse_ref.float().transpose(1, 2)).transpose(1, 2)
    real = uly._run_local
    injected = _injected_kernel_error

    class RaiseInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("injected kernel error")

    def injected_backward(*a, **kw):
        out, lse = real(*a, **kw)
        return RaiseInBackward.apply(out), lse

    def check(got, want_, what):
        _assert_close_on(rank, got, want_, what)

    def good_call():
        leaves = [sh(t).requires_grad_() for t in (q, k, v)]
        out, lse = ulysses_attention(*leaves, causal=True, return_lse=True)
        out.backward(sh(dout))
        check(lse, want_lse, "good call: lse")
        for name, x, w in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)), want):
            check(x, w, f"good call after a failure: {name}")

    good_call()
    # forward: rank 0's local kernel fails; with and without the lse's all-to-all
    for return_lse in (False, True):
        if rank == 0:
            uly._run_local = injected
        leaves = [sh(t).requires_grad_() for t in (q, k, v)]
        if rank == 0:
            with pytest.raises(RuntimeError, match="injected kernel error"):
                ulysses_attention(*leaves, causal=True, return_lse=return_lse)
        else:
            res = ulysses_attention(*leaves, causal=True, return_lse=return_lse)
            out = res[0] if return_lse else res
            assert torch.isnan(out[:, :, mine]).all(), "rank 0's heads must be NaN"
            check(out[:, :, rest], want[0][:, :, rest], "other rank's out, other heads")
            if return_lse:
                assert torch.isnan(res[1][:, mine]).all()
                check(res[1][:, rest], want_lse[:, rest], "other rank's lse, other heads")
        uly._run_local = real
        good_call()

    # backward: rank 0's local backward fails
    if rank == 0:
        uly._run_local = injected_backward
    leaves = [sh(t).requires_grad_() for t in (q, k, v)]
    out = ulysses_attention(*leaves, causal=True)
    uly._run_local = real
    check(out, want[0], "out before the failing backward")
    if rank == 0:
        with pytest.raises(RuntimeError, match="injected kernel error"):
            out.backward(sh(dout))
    else:
        out.backward(sh(dout))
        for name, x, w in zip(("dq", "dk", "dv"), (t.grad for t in leaves), want[1:]):
            assert torch.isnan(x[:, :, mine]).all(), f"{name}: rank 0's heads must be NaN"
            check(x[:, :, rest], w[:, :, rest], f"other rank's {name}, other heads")
    good_call()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ulysses_error_on_one_rank_leaves_group_usable(world):
    _spawn(_worker_error_mid_ulysses, world, timeout=120)
