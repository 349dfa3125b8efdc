"""Bad input gets a clear error naming the argument, with expected and actual
values; never a crash, a hang, or a read outside a tensor."""

from __future__ import annotations

import pytest
import torch

import pyfastattn

from ._helpers import make_qkv, op_call_in_subprocess

sdpa = pyfastattn.scaled_dot_product_attention
attn = pyfastattn.attention


def qkv4(b=2, s=8, h=2, d=16, **kw):
    return [t.transpose(1, 2) for t in make_qkv(b, s, s, h, h, d, **kw)]


@pytest.mark.parametrize("backend", ["auto", "kernel", "reference"])
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: sdpa(torch.randn(4), torch.randn(4), torch.randn(4)), "query must have at least 2 dims"),
        (
            lambda: sdpa(*qkv4()[:2], qkv4(s=9)[2]),
            r"value.shape\[-2\] must equal key.shape\[-2\] \(8\), got 9",
        ),
        (
            lambda: sdpa(qkv4()[0], qkv4(d=8)[1], qkv4()[2]),
            r"key.shape\[-1\] must equal query.shape\[-1\] \(16\), got 8",
        ),
        (
            lambda: sdpa(qkv4(h=4)[0], *qkv4(h=3)[1:], enable_gqa=True),
            r"query heads \(4\) must be a multiple of key heads \(3\)",
        ),
        (lambda: sdpa(qkv4(h=4)[0], *qkv4(h=2)[1:]), "enable_gqa"),
        (lambda: sdpa(qkv4(b=2)[0], *qkv4(b=3)[1:]), "do not broadcast"),
        (
            lambda: sdpa(*qkv4()[:2], qkv4(dtype=torch.float64)[2]),
            r"value.dtype must equal query.dtype \(torch.float32\), got torch.float64",
        ),
        (lambda: sdpa(*qkv4()[:2], qkv4()[2].to("meta")), "value.device must equal query.device"),
        (lambda: sdpa(*qkv4(), attn_mask=torch.ones(7, 8, dtype=torch.bool)), "not broadcastable"),
        (
            lambda: sdpa(*qkv4(), attn_mask=torch.ones(8, 8, dtype=torch.int64)),
            r"attn_mask.dtype must be torch.bool, torch.float32 or query.dtype \(torch.float32\), got torch.int64",
        ),
        (lambda: sdpa(*qkv4(), attn_mask=torch.ones(1, 1, 1, 1, 8, 8)), "at most 4 dims"),
        (lambda: sdpa(*qkv4(), dropout_p=1.5), r"dropout_p must be in \[0, 1\], got 1.5"),
        (lambda: sdpa(*qkv4(), dropout_p="0.1"), r"dropout_p must be a float, got str '0.1'"),
        (lambda: sdpa(*qkv4(), dropout_p=None), r"dropout_p must be a float, got NoneType None"),
        (lambda: sdpa(*[t.int() for t in qkv4()]), "floating-point"),
        (lambda: attn(*make_qkv(2, 8, 8, 2, 2, 16)[:2], torch.randn(2, 8, 2)), "v must have 4 dims"),
        (
            lambda: attn(torch.randn(2, 8, 2, 16), torch.randn(3, 8, 2, 16), torch.randn(3, 8, 2, 16)),
            r"k.shape\[0\] \(batch\) must equal q.shape\[0\] \(2\), got 3",
        ),
        (lambda: attn(*make_qkv(2, 8, 8, 3, 2, 16)), r"q heads \(3\) must be a multiple of k heads \(2\)"),
        (lambda: attn(*make_qkv(1, 8, 8, 2, 2, 16), window_size=(1,)), "window_size must be a pair"),
        (lambda: attn(*make_qkv(1, 8, 8, 2, 2, 16), softcap=-1.0), "softcap must be"),
        (
            lambda: attn(*make_qkv(1, 8, 8, 2, 2, 16), softmax_scale=float("nan")),
            "softmax_scale must be a finite",
        ),
        (
            lambda: attn(*make_qkv(2, 8, 8, 2, 2, 16), seqused_k=torch.tensor([3, 9], dtype=torch.int32)),
            r"seqused_k\[1\] = 9 must be in \[0, 8\]",
        ),
        (
            lambda: attn(*make_qkv(2, 8, 8, 2, 2, 16), seqused_k=torch.tensor([3, 4])),
            "seqused_k must be int32",
        ),
    ],
)
def test_dense_errors(make, match, backend):
    with pyfastattn.backend(backend), pytest.raises((ValueError, TypeError), match=match):
        make()


def _packed(total_q=10, total_k=12):
    return torch.randn(total_q, 2, 16), torch.randn(total_k, 2, 16), torch.randn(total_k, 2, 16)


def cu(*vals, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype)


@pytest.mark.parametrize("backend", ["auto", "kernel", "reference"])
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(cu_seqlens_q=cu(0, 4, 10)), "must be given together"),
        (
            dict(cu_seqlens_q=cu(0, 4, 10, dtype=torch.int64), cu_seqlens_k=cu(0, 6, 12)),
            r"cu_seqlens_q.dtype must be torch.int32, got torch.int64",
        ),
        (dict(cu_seqlens_q=cu(0, 6, 4), cu_seqlens_k=cu(0, 6, 12)), "cu_seqlens_q must be non-decreasing"),
        (dict(cu_seqlens_q=cu(1, 4, 10), cu_seqlens_k=cu(0, 6, 12)), r"cu_seqlens_q\[0\] must be 0, got 1"),
        (
            dict(cu_seqlens_q=cu(0, 4, 10), cu_seqlens_k=cu(0, 6, 13)),
            r"cu_seqlens_k\[-1\] = 13 runs past the packed tensor's 12 rows",
        ),
        (
            dict(cu_seqlens_q=cu(0, 4, 10), cu_seqlens_k=cu(0, 6, 12), max_seqlen_q=5),
            r"max_seqlen_q \(5\) is smaller than the longest sequence \(6\)",
        ),
        (dict(cu_seqlens_q=cu(0, 4, 10), cu_seqlens_k=cu(0, 12)), "cu_seqlens_k must have 3 elements"),
        (
            dict(cu_seqlens_q=cu(0, 4, 10), cu_seqlens_k=cu(0, 6, 12).to("meta")),
            "cu_seqlens_k.device must equal q.device",
        ),
        (
            dict(cu_seqlens_q=cu(0, 4, 10), cu_seqlens_k=cu(0, 6, 12), seqused_k=cu(3, 7)),
            r"seqused_k\[1\] = 7 must be in \[0, 6\]",
        ),
    ],
)
def test_varlen_errors(kw, match, backend):
    with pyfastattn.backend(backend), pytest.raises(ValueError, match=match):
        attn(*_packed(), **kw)


def test_kernel_backend_rejects_unsupported_dtype_auto_falls_back():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, dtype=torch.float64)
    with pyfastattn.backend("kernel"), pytest.raises(RuntimeError, match="float64"):
        attn(q, k, v)
    with pytest.warns(UserWarning):
        pyfastattn._backend._warned.clear()
        attn(q, k, v)


# Direct op calls bypass the Python checks: the C++ layer must still refuse
# anything that would read outside a tensor. Run in a subprocess so that a
# segfault fails the test instead of killing the run.
HOSTILE_OP_CALLS = {
    "cu_seqlens_past_end": (
        "q, k, v = (torch.randn(10, 2, 16) for _ in range(3))\n"
        "op(q, k, v, None, cu(0, 4, 10_000), cu(0, 4, 10), None, 10_000, 10, 0.25, 0.0, -1, -1, True)",
        "cu_seqlens_q[-1] = 10000 runs past",
    ),
    "cu_seqlens_decreasing": (
        "q, k, v = (torch.randn(10, 2, 16) for _ in range(3))\n"
        "op(q, k, v, None, cu(0, 8, 2), cu(0, 4, 10), None, 10, 10, 0.25, 0.0, -1, -1, True)",
        "non-decreasing",
    ),
    "max_seqlen_near_int32_max": (  # ceil-divs over it would wrap to a negative block count
        "q, k, v = (torch.randn(10, 2, 16) for _ in range(3))\n"
        "op(q, k, v, None, cu(0, 4, 10), cu(0, 4, 10), None, 10, 2**31 - 100, 0.25, 0.0, -1, -1, True)",
        "must be at most 2147418111",
    ),
    "max_seqlen_too_small": (
        "q, k, v = (torch.randn(10, 2, 16) for _ in range(3))\n"
        "op(q, k, v, None, cu(0, 4, 10), cu(0, 4, 10), None, 2, 10, 0.25, 0.0, -1, -1, True)",
        "max_seqlen_q (2) is smaller",
    ),
    "cu_seqlens_wrong_dtype": (
        "q, k, v = (torch.randn(10, 2, 16) for _ in range(3))\n"
        "op(q, k, v, None, cu(0, 4, 10).long(), cu(0, 4, 10), None, 10, 10, 0.25, 0.0, -1, -1, True)",
        "cu_seqlens_q.dtype must be torch.int32",
    ),
    "seqused_past_end": (
        "q, k, v = (torch.randn(2, 8, 2, 16) for _ in range(3))\n"
        "op(q, k, v, None, None, None, cu(8, 100), 8, 8, 0.25, 0.0, -1, -1, True)",
        "seqused_k[1] = 100 must be in [0, 8]",
    ),
    "mask_too_small": (
        "q, k, v = (torch.randn(2, 8, 2, 16) for _ in range(3))\n"
        "op(q, k, v, torch.ones(2, 2, 8, 4, dtype=torch.bool), None, None, None, 8, 8, 0.25, 0.0, -1, -1, False)",
        "attn_mask.shape[3] must be 8",
    ),
    "mask_wrong_batch": (
        "q, k, v = (torch.randn(2, 8, 2, 16) for _ in range(3))\n"
        "op(q, k, v, torch.ones(3, 2, 8, 8, dtype=torch.bool), None, None, None, 8, 8, 0.25, 0.0, -1, -1, False)",
        "attn_mask.shape[0] must be 2 or 1",
    ),
    "k_too_short": (
        "q = torch.randn(2, 8, 2, 16); k = torch.randn(2, 4, 2, 16); v = torch.randn(2, 8, 2, 16)\n"
        "op(q, k, v, None, None, None, None, 8, 8, 0.25, 0.0, -1, -1, False)",
        "v.shape[1] must equal k.shape[1]",
    ),
    "bwd_lse_wrong_shape": (
        "q, k, v = (torch.randn(2, 8, 2, 16) for _ in range(3))\n"
        "torch.ops.pyfastattn.attention_bwd(q, q, k, v, q, torch.zeros(2, 2, 3), None, None, None, None, 8, 8, 0.25, 0.0, -1, -1, False, False)",
        "lse.shape must be",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_OP_CALLS))
def test_hostile_metadata_in_subprocess(name):
    body, expected = HOSTILE_OP_CALLS[name]
    prelude = "op = torch.ops.pyfastattn.attention_fwd\ndef cu(*v):\n    return torch.tensor(v, dtype=torch.int32)\n"
    r = op_call_in_subprocess(body, prelude)
    assert "ERROR:" in r.stdout and expected in r.stdout, r.stdout + r.stderr[-2000:]


# The CPU kernel's A/B switches (read once per process, hence subprocesses):
# a value that is none of the accepted ones is a ValueError naming the
# variable and every accepted value, never a silent default.
@pytest.mark.parametrize(
    ("var", "good", "shape_q", "shape_k"),
    [
        # Sq1, 4 query rows per kv head over 600 keys: a call the few-rows route takes.
        ("PYFASTATTN_CPU_FEW_ROWS", ("kvcache", "tiled"), (1, 1, 8, 64), (1, 600, 2, 64)),
        # S1024: the forward packs K and V once per call.
        ("PYFASTATTN_CPU_KV_PACK", ("on", "off", "always"), (1, 1024, 8, 64), (1, 1024, 8, 64)),
    ],
)
def test_cpu_env_switch_rejects_unknown_values(var, good, shape_q, shape_k):
    body = f'q = torch.randn{shape_q}; k = torch.randn{shape_k}\nwith pyfastattn.backend("kernel"):\n    pyfastattn.attention(q, k, k)'
    for value in ("bogus",) + tuple(good):
        out = op_call_in_subprocess(body, env={var: value}).stdout.strip().splitlines()[-1]
        if value != "bogus":
            assert out == "NO ERROR", out
            continue
        # A ValueError (InvalidArgumentError is one, and a RuntimeError too).
        assert out.startswith(("ERROR: ValueError: ", "ERROR: InvalidArgumentError: ")), out
        accepted = ", ".join(f"'{g}'" for g in good[1:-1])
        accepted = f"'{good[0]}' (the default)" + (f", {accepted}" if accepted else "") + f" or '{good[-1]}'"
        assert f"{var} must be {accepted}, got 'bogus'" in out, out


def _kv_call(**kw):
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    kc, vc = torch.randn(2, 32, 2, 16), torch.randn(2, 32, 2, 16)
    args = dict(cache_seqlens=torch.tensor([3, 4], dtype=torch.int32))
    args.update(kw)
    return pyfastattn.attention_with_kvcache(q, kc, vc, k, v, **args)


i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731


@pytest.mark.parametrize("backend", ["auto", "kernel", "reference"])
@pytest.mark.parametrize(
    "make, match",
    [
        # values the C++ layer reads (the fast path, then the op)
        (lambda: _kv_call(cache_seqlens=i32(3, 32)), r"cache_seqlens\[1\] \+ seqlen_new = 32 \+ 1 = 33"),
        (
            lambda: _kv_call(cache_leftpad=i32(4, 0)),
            r"cache_leftpad\[0\] must be in \[0, cache_seqlens\[0\] = 3\]",
        ),
        (lambda: _kv_call(cache_batch_idx=i32(0, 2)), r"cache_batch_idx\[1\] must be in \[0, 2\)"),
        # past the fast path (ALiBi), the same checks in the op
        (lambda: _kv_call(cache_seqlens=i32(-1, 3), alibi_slopes=torch.ones(4)), r"cache_seqlens\[0\]"),
        (
            lambda: attn(
                *_packed(), cu_seqlens_q=cu(0, 4, 10), cu_seqlens_k=cu(0, 6, 12), max_seqlen_q=2**40
            ),
            "must be at most",
        ),
        (
            lambda: pyfastattn.feed_forward(torch.randn(3, 8), torch.randn(16, 7), None, torch.randn(8, 16)),
            "w1",
        ),
        (
            lambda: pyfastattn.gated_feed_forward(
                torch.randn(3, 8), *[torch.randn(16, 8)] * 2, torch.randn(8, 15)
            ),
            "w_down",
        ),
    ],
)
def test_errors_of_the_compiled_checks_are_invalid_argument_errors(make, match, backend):
    # Documented: every invalid argument raises InvalidArgumentError (a
    # RuntimeError as torch raises, and a ValueError), also when the check
    # that catches it is the C++ layer's rather than the Python one's.
    if backend == "reference" and "must be at most" in match:
        pytest.skip("the reference path has no length limit")
    with pyfastattn.backend(backend), pytest.raises(pyfastattn.InvalidArgumentError, match=match) as info:
        make()
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


def _fa():
    from pyfastattn import flash_attn_interface

    return flash_attn_interface


_q4 = torch.randn(1, 4, 2, 16)
_packed_q = torch.randn(8, 2, 16)
_cu = torch.tensor([0, 3, 8], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "bad", ["abc", "0.5", [1], True, None], ids=["str", "numeric_str", "list", "bool", "None"]
)
@pytest.mark.parametrize(
    "name, call",
    [
        ("softmax_scale", lambda x: attn(_q4, _q4, _q4, softmax_scale=x)),
        ("softcap", lambda x: attn(_q4, _q4, _q4, softcap=x)),
        ("dropout_p", lambda x: attn(_q4, _q4, _q4, dropout_p=x)),
        ("softmax_scale", lambda x: _fa().flash_attn_func(_q4, _q4, _q4, softmax_scale=x)),
        ("softcap", lambda x: _fa().flash_attn_func(_q4, _q4, _q4, softcap=x)),
        ("dropout_p", lambda x: _fa().flash_attn_func(_q4, _q4, _q4, dropout_p=x)),
        ("softcap", lambda x: _fa().flash_attn_with_kvcache(_q4, _q4, _q4, softcap=x)),
        ("softmax_scale", lambda x: pyfastattn.attention_with_kvcache(_q4, _q4, _q4, softmax_scale=x)),
        (
            "max_seqlen_q",
            lambda x: _fa().flash_attn_varlen_func(_packed_q, _packed_q, _packed_q, _cu, _cu, x, 5),
        ),
        (
            "max_seqlen_k",
            lambda x: _fa().flash_attn_varlen_func(_packed_q, _packed_q, _packed_q, _cu, _cu, 5, x),
        ),
        (
            "max_seqlen",
            lambda x: _fa().flash_attn_varlen_qkvpacked_func(torch.stack([_packed_q] * 3, 1), _cu, x),
        ),
    ],
)
def test_non_numeric_scalars_name_the_argument(name, call, bad, backend):
    # float() / int() / `>=` on these raised bare TypeError / ValueError from
    # Python's internals ("could not convert string to float: 'abc'", "'>='
    # not supported between instances of 'str' and 'int'"); a bool or a
    # numeric string passed as a number, and a float max_seqlen was truncated.
    if bad is None and name in ("softmax_scale",):
        call(bad)  # None is the default scale
        return
    with pyfastattn.backend(backend), pytest.raises(pyfastattn.InvalidArgumentError, match=name) as info:
        call(bad)
    msg = str(info.value)
    assert msg.startswith(name) and (type(bad).__name__ in msg or repr(bad) in msg), msg


@pytest.mark.parametrize("bad", [3.5, 5.0])
def test_varlen_max_seqlen_float_is_refused_not_truncated(bad):
    # int(3.5) = 3 gave "max_seqlen_q (3) is smaller than the longest
    # sequence (5)", and int(5.0) passed; FlashAttention takes ints only.
    with pytest.raises(
        pyfastattn.InvalidArgumentError, match=rf"max_seqlen_q must be an int, got float {bad}"
    ):
        _fa().flash_attn_varlen_func(_packed_q, _packed_q, _packed_q, _cu, _cu, bad, 5)


def test_varlen_max_seqlen_takes_integer_scalars():
    import numpy as np

    want = _fa().flash_attn_varlen_func(_packed_q, _packed_q, _packed_q, _cu, _cu, 5, 5)
    for n in (np.int64(5), torch.tensor(5), (_cu[1:] - _cu[:-1]).max()):
        got = _fa().flash_attn_varlen_func(_packed_q, _packed_q, _packed_q, _cu, _cu, n, n)
        assert torch.equal(got, want)
