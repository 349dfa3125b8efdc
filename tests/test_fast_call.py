"""The small-call fast paths (csrc/attention/fast_call.cpp): taken for plain
CPU calls, bit-identical to the Python path, gradients as before, and never
taken (None) where the Python path must decide: invalid arguments (which then
raise the named InvalidArgumentError), subclasses, modes, other routes."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pyfastattn
from pyfastattn import _ops, functional, kvcache, reference
from pyfastattn.functional import InvalidArgumentError
from pyfastattn.testing import tolerance_failure

pytestmark = pytest.mark.skipif(
    functional._attention_fast is None, reason="the compiled extension (with its fast paths) is not built"
)

fast = functional._attention_fast
fast_kv = kvcache._kvcache_fast


def qkv(b=2, sq=3, sk=17, hq=4, hk=2, d=24, dtype=torch.float32, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(b, s, h, d, generator=g, dtype=dtype, **kw) for s, h in ((sq, hq), (sk, hk), (sk, hk))
    )


def python_path(monkeypatch, fn, *args, **kw):
    """``fn`` with the fast paths switched off: the Python path as before."""
    with monkeypatch.context() as m:
        m.setattr(functional, "_attention_fast", None)
        m.setattr(kvcache, "_kvcache_fast", None)
        return fn(*args, **kw)


def fast_args(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None, lse=False, dropout_p=0.0):
    return (q, k, v, causal, window, softcap, scale, lse, dropout_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(causal=True),
        dict(window_size=(5, 2)),
        dict(window_size=[3, -1], causal=True),
        dict(softcap=7.5, softmax_scale=0.3),
        dict(return_lse=True, causal=True),
        dict(softmax_scale=2),  # an int scale, as the Python path takes it
    ],
)
@pytest.mark.parametrize("shape", [(2, 3, 17, 4, 2, 24), (1, 1, 97, 8, 8, 64), (3, 17, 5, 3, 1, 40)])
def test_fast_path_taken_and_identical(monkeypatch, dtype, kw, shape):
    b, sq, sk, hq, hk, d = shape
    q, k, v = qkv(b, sq, sk, hq, hk, d, dtype=dtype)
    args = fast_args(
        q, k, v, kw.get("causal", False), kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0),
        kw.get("softmax_scale"), kw.get("return_lse", False),
    )  # fmt: skip
    assert fast(*args) is not None
    got = pyfastattn.attention(q, k, v, **kw)
    want = python_path(monkeypatch, pyfastattn.attention, q, k, v, **kw)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype
        assert torch.equal(g, w)


def test_fast_path_strided_views_keep_layout(monkeypatch):
    """SDPA-layout tensors reach attention as (B, S, H, D) views; the output
    comes back in q's layout as on the Python path."""
    q = torch.randn(2, 4, 5, 16).transpose(1, 2)
    k, v = (torch.randn(2, 4, 9, 16).transpose(1, 2) for _ in range(2))
    assert fast(*fast_args(q, k, v)) is not None
    got = pyfastattn.attention(q, k, v)
    want = python_path(monkeypatch, pyfastattn.attention, q, k, v)
    assert got.stride() == want.stride() and torch.equal(got, want)


def test_fast_path_matches_reference_fp64_truth():
    q, k, v = qkv(2, 5, 33, 6, 3, 20)
    got = pyfastattn.attention(q, k, v, causal=True, softcap=3.0)
    want, _ = reference.attention(
        q.double(), k.double(), v.double(), scale=20**-0.5, softcap=3.0, window_right=0, bottom_right=True
    )
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (*qkv()[:2], qkv(dtype=torch.float64)[2]), r"v.dtype must equal q.dtype \(torch.float32\)"),
        (lambda: (qkv()[0], *qkv(d=8)[1:]), r"k.shape\[-1\] must equal q.shape\[-1\] \(24\), got 8"),
        (lambda: (qkv(hq=3)[0], *qkv()[1:]), r"q heads \(3\) must be a multiple of k heads \(2\)"),
        (lambda: (qkv(b=3)[0], *qkv()[1:]), r"k.shape\[0\] \(batch\) must equal q.shape\[0\] \(3\), got 2"),
        (lambda: (qkv()[0], qkv()[1], qkv(sk=5)[2]), r"v.shape\[:-2\] must equal k.shape\[:-2\]"),
        (
            lambda: (qkv()[0], qkv()[1], qkv(hk=4)[2]),
            r"v.shape\[-2\] \(heads\) must equal k.shape\[-2\] \(2\)",
        ),
        (lambda: (qkv()[0][0], *qkv()[1:]), "q must have 4 dims"),
        (lambda: tuple(t.int() for t in qkv()), "floating-point"),
    ],
)
def test_invalid_tensors_fall_back_and_name_the_argument(make, match):
    q, k, v = make()
    assert fast(*fast_args(q, k, v)) is None
    with pytest.raises(InvalidArgumentError, match=match):
        pyfastattn.attention(q, k, v)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(window_size=(1,)), "window_size must be a pair"),
        (dict(window_size=(1.0, 2)), "window_size must be a pair"),
        (dict(softcap=-1.0), "softcap must be a finite number >= 0, got -1.0"),
        (dict(softcap=float("inf")), "softcap must be a finite number"),
        (dict(softmax_scale=float("nan")), "softmax_scale must be a finite number"),
        (dict(dropout_p=None), "dropout_p must be a number in"),
        (dict(dropout_p=True), "dropout_p must be a number in"),
        (dict(dropout_p=1.5), "dropout_p must be a number in"),
    ],
)
def test_invalid_arguments_fall_back_and_name_the_argument(kw, match):
    q, k, v = qkv()
    args = fast_args(
        q, k, v, False, kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0), kw.get("softmax_scale"),
        False, kw.get("dropout_p", 0.0),
    )  # fmt: skip
    assert fast(*args) is None
    with pytest.raises(InvalidArgumentError, match=match):
        pyfastattn.attention(q, k, v, **kw)


def test_other_routes_are_not_taken_by_the_fast_path():
    q, k, v = qkv()
    assert fast(*fast_args(q.double(), k.double(), v.double())) is None  # no fp64 kernel: the SDPA route
    assert fast(*fast_args(q[:, :0], k, v)) is None  # empty: the reference
    assert fast(*fast_args(q, k, v, dropout_p=0.1)) is None
    nc = torch.randn(2, 17, 2, 48)[..., ::2]  # last dim not contiguous: copied by the Python path
    assert fast(*fast_args(q, nc, v)) is None

    class Sub(torch.Tensor):  # a subclass (its __torch_function__ runs on the Python path)
        pass

    assert fast(*fast_args(q.as_subclass(Sub), k, v)) is None
    assert fast(*fast_args(q, k, v.as_subclass(Sub))) is None
    # nn.Parameter disables __torch_function__: torch treats it as a plain tensor, and so does the fast path
    assert fast(*fast_args(torch.nn.Parameter(q.clone()), k, v)) is not None
    assert fast(*fast_args(q.to("meta"), k.to("meta"), v.to("meta"))) is None


def test_grad_paths(monkeypatch):
    q, k, v = qkv(requires_grad=True)
    out = pyfastattn.attention(q, k, v, causal=True)
    assert out.grad_fn is not None
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    out2 = python_path(monkeypatch, pyfastattn.attention, q, k, v, causal=True)
    want = torch.autograd.grad(out2, (q, k, v), g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(qd, kd, vd, scale=24**-0.5, window_right=0, bottom_right=True)
    for a, b in zip(got, torch.autograd.grad(ref, (qd, kd, vd), g.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)
    # grad mode, inputs without grad; no_grad; inference_mode
    x = [t.detach() for t in (q, k, v)]
    assert not pyfastattn.attention(*x).requires_grad
    with torch.no_grad():
        assert pyfastattn.attention(q, k, v).grad_fn is None
    with torch.inference_mode():
        y = [t.detach().clone() for t in (q, k, v)]
        assert torch.equal(pyfastattn.attention(*y), pyfastattn.attention(*x))


def test_modes_and_profiler_see_the_op():
    q, k, v = qkv()
    seen = []

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Functions():
        assert fast(*fast_args(q, k, v)) is None  # a function mode: the Python path (torch.ops sees it)
        pyfastattn.attention(q, k, v)
    assert any("attention_fwd" in s for s in seen)
    seen.clear()
    with Dispatch():
        pyfastattn.attention(q, k, v)  # through the dispatcher: the mode sees the op
    assert "pyfastattn.attention_fwd.default" in seen
    with torch.profiler.profile() as prof:
        pyfastattn.attention(q, k, v)
    assert any(e.name == "pyfastattn::attention_fwd" for e in prof.events())


def test_reference_backend_skips_the_fast_path(monkeypatch):
    q, k, v = qkv()
    called = []
    monkeypatch.setattr(functional, "_attention_fast", lambda *a: called.append(a))
    with pyfastattn.backend("reference"):
        pyfastattn.attention(q, k, v)
    assert not called


# ---------------------------------------------------------------------------
# attention_with_kvcache
# ---------------------------------------------------------------------------


def kv_case(b=3, sq=1, hq=4, hk=2, d=16, cap=40, s_new=1, dtype=torch.float32, paged=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = r(b, sq, hq, d), r(b, s_new, hk, d), r(b, s_new, hk, d)
    table = None
    if paged:
        kc, vc = r(b * 5, 8, hk, d), r(b * 5, 8, hk, d)
        table = torch.randperm(b * 5, generator=g).to(torch.int32).view(b, 5)
    else:
        kc, vc = r(b, cap, hk, d), r(b, cap, hk, d)
    return q, kc, vc, k, v, table


KV_CALLS = [
    dict(cache_seqlens="t", causal=True),
    dict(cache_seqlens=7, causal=True, return_lse=True),
    dict(cache_seqlens="t", window_size=(3, 0), softcap=5.0),
    dict(cache_seqlens="t", cache_leftpad="lp", causal=True),
    dict(cache_seqlens="t", cache_batch_idx="bidx", softmax_scale=0.5),
    dict(cache_seqlens="t", paged=True, causal=True, num_splits=2),
    dict(cache_seqlens="t", rotary=True, causal=True),
    dict(cache_seqlens="t", rotary=True, rotary_interleaved=False),
    dict(cache_seqlens=None, no_new=True),
]


def kv_call(kw, dtype=torch.float32):
    kw = dict(kw)
    q, kc, vc, k, v, table = kv_case(paged=kw.pop("paged", False), dtype=dtype)
    b = q.shape[0]
    if kw.pop("no_new", False):
        k = v = None
    if kw.get("cache_seqlens") == "t":
        kw["cache_seqlens"] = torch.tensor([5, 0, 30], dtype=torch.int32)
    if kw.get("cache_leftpad") == "lp":
        kw["cache_leftpad"] = torch.tensor([2, 0, 11], dtype=torch.int32)
    if kw.get("cache_batch_idx") == "bidx":
        kw["cache_batch_idx"] = torch.tensor([2, 0, 1], dtype=torch.int32)
    if table is not None:
        kw["block_table"] = table
    if kw.pop("rotary", False):
        kw["rotary_cos"], kw["rotary_sin"] = torch.rand(48, 4), torch.rand(48, 4)
    assert b == 3
    return (q, kc, vc, k, v), kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", KV_CALLS)
def test_kvcache_fast_path_taken_and_identical(monkeypatch, kw, dtype):
    (q, kc, vc, k, v), call = kv_call(kw, dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    taken = []
    real = kvcache._kvcache_fast
    monkeypatch.setattr(kvcache, "_kvcache_fast", lambda *a: taken.append(real(*a)) or taken[-1])
    got = pyfastattn.attention_with_kvcache(q, kc, vc, k, v, **call)
    assert taken and taken[0] is not None
    want = python_path(monkeypatch, pyfastattn.attention_with_kvcache, q, kc2, vc2, k, v, **call)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the same append


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda a, kw: kw.update(cache_seqlens=torch.tensor([1, 2, 3])),
            "cache_seqlens must be int32 of shape",
        ),
        (
            lambda a, kw: kw.update(cache_seqlens=torch.tensor([1, 2], dtype=torch.int32)),
            "cache_seqlens must be",
        ),
        (lambda a, kw: kw.update(cache_leftpad=torch.zeros(3)), "cache_leftpad must be int32 of shape"),
        (lambda a, kw: kw.update(window_size=(1, 2, 3)), "window_size must be a pair"),
        (lambda a, kw: kw.update(softcap=-2.0), "softcap must be a finite number >= 0"),
        (lambda a, kw: kw.update(num_splits=-1), "num_splits must be an int >= 0"),
        (lambda a, kw: a.__setitem__(4, None), "k and v must be given together"),
        (lambda a, kw: a.__setitem__(3, a[3][:, :, :1]), r"k must have shape \(3, seqlen_new, 2, 16\)"),
        (
            lambda a, kw: a.__setitem__(1, a[1][:2]) or a.__setitem__(2, a[2][:2]),
            r"k_cache.shape\[0\] \(2\) must equal q.shape\[0\]",
        ),
        (
            lambda a, kw: a.__setitem__(0, a[0][..., :8]),
            r"k_cache.shape\[3\] \(head dim\) must equal q.shape\[3\]",
        ),
        (lambda a, kw: a.__setitem__(2, a[2].double()), r"v_cache.dtype must equal q.dtype"),
        (
            lambda a, kw: kw.update(rotary_cos=torch.rand(48, 4)),
            "rotary_cos and rotary_sin must be given together",
        ),
    ],
)
def test_kvcache_invalid_falls_back_and_names_the_argument(change, match):
    (q, kc, vc, k, v), kw = kv_call(dict(cache_seqlens="t", causal=True))
    a = [q, kc, vc, k, v]
    change(a, kw)
    full = dict(
        cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None, rotary_cos=None,
        rotary_sin=None, rotary_interleaved=True, causal=False, window_size=(-1, -1), softcap=0.0,
        softmax_scale=None, alibi_slopes=None, return_lse=False, num_splits=0,
    )  # fmt: skip
    full.update(kw)
    assert fast_kv(*a, *full.values()) is None
    with pytest.raises(InvalidArgumentError, match=match):
        pyfastattn.attention_with_kvcache(*a, **kw)


def test_kvcache_memory_checks_of_the_op_still_raise():
    """Values out of range are the op's check (ValueError naming the argument), on the fast path too."""
    (q, kc, vc, k, v), kw = kv_call(dict(cache_seqlens="t"))
    kw["cache_seqlens"] = torch.tensor([5, 0, 40], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_seqlens\[2\] \+ seqlen_new = 40 \+ 1 = 41 exceeds"):
        pyfastattn.attention_with_kvcache(q, kc, vc, k, v, **kw)
    assert _ops.has_kernel("attention_kvcache_fwd", "cpu")


# ---------------------------------------------------------------------------
# scaled_dot_product_attention (the drop-in)
# ---------------------------------------------------------------------------

sdpa_fast = functional._sdpa_fast


def bhsd(b=2, hq=4, hk=4, lq=5, sk=9, e=16, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(1)
    return tuple(
        torch.randn(b, h, s, e, generator=g, dtype=dtype, **kw) for h, s in ((hq, lq), (hk, sk), (hk, sk))
    )


# (b, hq, hk, lq, sk, e), keyword arguments of the drop-in
SDPA_CASES = [
    ((2, 4, 4, 5, 9, 16), {}),
    ((2, 4, 4, 9, 9, 16), dict(is_causal=True)),
    ((1, 8, 2, 1, 33, 64), dict(enable_gqa=True, scale=0.2)),
    ((1, 4, 4, 1, 40, 32), {}),  # MHA decode: (B, H, S, D) views stay on the decode path (csrc/ops.cpp)
    ((3, 3, 3, 17, 6, 40), dict(is_causal=True, scale=1)),  # Lq > Sk: torch's top-left causal
]


def assert_sdpa_fast_taken(q, k, v, kw):
    taken = sdpa_fast(q, k, v, 0.0, kw.get("is_causal", False), kw.get("scale"), kw.get("enable_gqa", False))
    assert taken is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, kw", SDPA_CASES)
def test_sdpa_fast_path_taken_and_identical(monkeypatch, dtype, shape, kw):
    q, k, v = bhsd(*shape, dtype=dtype)
    assert_sdpa_fast_taken(q, k, v, kw)
    got = pyfastattn.scaled_dot_product_attention(q, k, v, **kw)
    with monkeypatch.context() as m:
        m.setattr(functional, "_sdpa_fast", None)
        want = pyfastattn.scaled_dot_product_attention(q, k, v, **kw)
    assert got.shape == want.shape and got.stride() == want.stride() and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, kw", SDPA_CASES)
def test_sdpa_fast_path_matches_torch(dtype, shape, kw):
    """The drop-in on its fast path against torch's own SDPA on the same
    inputs: the values within the project's rule (truth: torch in float64,
    baseline: torch in the same dtype), and torch's shape and strides."""
    q, k, v = bhsd(*shape, dtype=dtype)
    assert_sdpa_fast_taken(q, k, v, kw)
    got = pyfastattn.scaled_dot_product_attention(q, k, v, **kw)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    truth = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    assert got.shape == theirs.shape and got.stride() == theirs.stride() and got.dtype == theirs.dtype
    failure = tolerance_failure("sdpa fast path", got, truth, theirs, dtype)
    assert failure is None, failure


def test_sdpa_fast_path_gradients(monkeypatch):
    q, k, v = bhsd(requires_grad=True)
    g = torch.randn(2, 4, 5, 16)
    got = torch.autograd.grad(pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g)
    with monkeypatch.context() as m:
        m.setattr(functional, "_sdpa_fast", None)
        out = pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    for a, b in zip(got, torch.autograd.grad(out, (q, k, v), g)):
        assert torch.equal(a, b)


def test_sdpa_other_cases_take_the_python_path():
    q, k, v = bhsd()
    assert sdpa_fast(q, k, v, 0.1, False, None, False) is None  # dropout
    assert (
        sdpa_fast(*bhsd(hk=1), 0.0, False, None, False) is None
    )  # one key head broadcast without enable_gqa
    assert sdpa_fast(q, k[:1], v[:1], 0.0, False, None, False) is None  # broadcast batch
    assert sdpa_fast(q[0], k[0], v[0], 0.0, False, None, False) is None  # 3-D
    assert sdpa_fast(q.double(), k.double(), v.double(), 0.0, False, None, False) is None
    for bad, match in (
        (dict(scale=float("inf")), "scale must be a finite number"),
        (dict(dropout_p=2.0), r"dropout_p must be in \[0, 1\], got 2.0"),
    ):
        with pytest.raises(InvalidArgumentError, match=match):
            pyfastattn.scaled_dot_product_attention(q, k, v, **bad)
    with pytest.raises(
        InvalidArgumentError, match=r"key.shape\[-1\] must equal query.shape\[-1\] \(16\), got 8"
    ):
        pyfastattn.scaled_dot_product_attention(q, bhsd(e=8)[1], v)
    with pytest.raises(
        InvalidArgumentError, match=r"query heads \(4\) must be a multiple of key heads \(3\)"
    ):
        pyfastattn.scaled_dot_product_attention(q, *bhsd(hk=3)[1:], enable_gqa=True)


def test_call_overhead_benchmark_runs():
    """benchmarks/call_overhead.py in smoke form: every case prints its times and ratios."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "benchmarks", "call_overhead.py"),
            "--rounds",
            "1",
            "--calls",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    for case in ("decode MHA B1 H8 Sq1 Sk128 D64 no_grad", "fwd+bwd causal B1 H8 S64 D64", "kvcache decode"):
        assert case in out, out
    assert out.count("pyfastattn/sdpa") >= 10, out
