"""Randomized differential tests of the public entry points as user code calls
them, against ground truths written independently of pyfastattn.reference:

* ``scaled_dot_product_attention`` against torch's own SDPA in float64 (math
  backend), in the layouts and corners real code produces: (B, S, H, D)
  storage viewed as (B, H, S, D), strided rows, stride-0 (expanded) K/V, 3-D
  and 5-D inputs, heads broadcast from 1, masks of every broadcast shape
  (expanded, float32 with low-precision inputs, rows that mask everything),
  a mask with ``is_causal``, L != S both ways, ``dropout_p=1``.
* ``attention`` and ``flash_attn_interface`` against FlashAttention 2's
  documented semantics written out in float64 (bottom-right causal and
  windows, softcap on scaled scores, GQA, varlen with packed tails,
  ``seqused_k`` with NaN in the keys past it, ALiBi, dropout with the
  returned keep pattern, FlashAttention's +inf LSE for rows without keys).
* ``attention_with_kvcache`` against flash_attn_with_kvcache's semantics
  (append, rotary, batch index, left padding, paged blocks), with NaN in the
  cache past ``cache_seqlens`` and garbage in the block table past each
  sequence's blocks, on the kernel and the PyTorch path; the caches must be
  written exactly where the new keys go.

Gradients are compared too. The kernels' backward, as FlashAttention's, takes
D = rowsum(dO * O) from the output rounded to its dtype; a gradient passes
against the exact gradient or against the exact gradient of that algorithm
(the truth minus d/d(q,k) sum(dD * lse)), under the tolerance rule of
pyfastattn.testing. A fixed seed per case: ``-k "sdpa and 17"`` reruns one;
CONTRIBUTING.md says how to run more cases, other seeds, instruction sets
and thread counts.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

import pyfastattn
import pyfastattn.flash_attn_interface as fai
from pyfastattn.testing import max_error, tolerance_failure

from ._helpers import fa_grad_correction

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# CI runs the defaults (about 5 s on one core). PYFASTATTN_API_FUZZ_CASES=N
# runs N cases of each kind, PYFASTATTN_API_FUZZ_SEED=S another draw of them.
DEFAULT_CASES = (60, 60, 40)
_n = os.environ.get("PYFASTATTN_API_FUZZ_CASES")
N_SDPA, N_NATIVE, N_KV = DEFAULT_CASES if _n is None else (int(_n),) * 3
SEED = int(os.environ.get("PYFASTATTN_API_FUZZ_SEED", 0)) * 100_000


def _ok(name, out, ref, baselines, dt, alt_ref=None):
    """None if ``out`` passes the tolerance rule against ``ref`` (or
    ``alt_ref``) with any of the plain-torch ``baselines``, else why not.
    Exact-zero truths get a tiny absolute floor (fp32 summation noise)."""
    fails = []
    for r in (ref, alt_ref):
        if r is None:
            continue
        for b in baselines or [None]:
            f = tolerance_failure(name, out, r, None if b is None or b.shape != r.shape else b.detach(), dt)
            if f is None:
                return None
            fails.append(f)
    if max_error(out, ref) <= (1e-12 if dt == torch.float64 else 3e-5):
        return None
    return fails[0]


# ---------------------------------------------------------------------------
# the SDPA drop-in against torch's SDPA in float64
# ---------------------------------------------------------------------------


def _draw_sdpa(rng):
    c = dict(dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    c["lead"] = [rng.choice([1, 2, 3]) for _ in range(rng.choice([0, 1, 1, 2]))]
    c["hk"] = rng.choice([1, 1, 2, 3])
    c["gqa"] = rng.random() < 0.3
    c["hq"] = c["hk"] * rng.choice([1, 2, 3]) if c["gqa"] else c["hk"]
    if not c["gqa"] and rng.random() < 0.15:
        c["hk"], c["hq"] = 1, rng.choice([2, 3])  # heads broadcast from 1, no enable_gqa
    sizes = [1, 2, 3, 7, 16, 17, 33, 65]
    c["L"], c["S"] = rng.choice(sizes), rng.choice(sizes)
    c["E"] = rng.choice([1, 3, 8, 13, 32, 40, 64])
    c["Ev"] = c["E"] if rng.random() < 0.6 else rng.choice([1, 5, 24])
    c["layout"] = rng.choice(["contig", "bshd", "rows", "expanded", "step"])
    c["mask"] = rng.choice([None, None, "bool", "float", "float32", "bool_fullrow", "float_neginf_row"])
    c["mask_shape"] = rng.choice(["LS", "1LS", "HLS", "full", "B11S", "expanded"])
    c["causal"] = rng.random() < 0.35
    c["scale"] = rng.choice([None, None, 0.5, 2.0])
    c["dropout"] = rng.choice([0.0] * 9 + [1.0])
    c["grad"] = rng.random() < 0.6
    c["seed"] = rng.randrange(1 << 30)
    return c


def _sdpa_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, lead, hq, hk, L, S, E, Ev = (c[x] for x in ("dtype", "lead", "hq", "hk", "L", "S", "E", "Ev"))

    def lay(shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)
        if c["layout"] == "bshd":  # stored (..., S, H, D), viewed (..., H, S, D)
            return t.transpose(-3, -2).contiguous().transpose(-3, -2)
        if c["layout"] == "rows":  # rows padded in memory
            w = torch.zeros(*shape[:-1], shape[-1] + 3, dtype=dt)
            w[..., : shape[-1]] = t
            return w[..., : shape[-1]]
        if c["layout"] == "step":  # every other element of the last dim
            w = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dt)
            w[..., ::2] = t
            return w[..., ::2]
        return t

    q, k, v = lay((*lead, hq, L, E)), lay((*lead, hk, S, E)), lay((*lead, hk, S, Ev))
    if c["layout"] == "expanded" and lead and lead[0] > 1:
        k, v = k[:1].expand_as(k), v[:1].expand_as(v)
    mask = None
    if c["mask"] is not None:
        shape = {"LS": (L, S), "1LS": (1, L, S), "HLS": (hq, L, S), "full": (*lead, hq, L, S),
                 "B11S": (*lead, 1, 1, S), "expanded": (L, S)}[c["mask_shape"]]  # fmt: skip
        if c["mask"].startswith("bool"):
            m = torch.rand(*shape, generator=g) > 0.3
            if c["mask"] == "bool_fullrow" and m.shape[-2] > 0:
                m[..., 0, :] = False
            else:
                m[..., 0] = True
        else:
            m = torch.randn(*shape, generator=g, dtype=torch.float64)
            m = m.masked_fill(torch.rand(*shape, generator=g) > 0.7, float("-inf"))
            m[..., 0] = 0.0
            if c["mask"] == "float_neginf_row" and m.shape[-2] > 0:
                m[..., 0, :] = float("-inf")
            m = m.to(torch.float32 if c["mask"] == "float32" else dt)
        if c["mask_shape"] == "expanded":
            m = m[:1].expand(L, S)
        mask = m
    return q, k, v, mask


def _sdpa_probs(q, k, mask, kw):
    """softmax(q k^T * scale) in the inputs' precision, is_causal (top-left)
    and the mask applied, k repeated to q's heads; rows that see no key are
    0. Returns (p, scale)."""
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    scale = q.shape[-1] ** -0.5 if kw["scale"] is None else kw["scale"]
    s = (q @ k.transpose(-1, -2)) * scale
    if kw["is_causal"]:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    alive = torch.isfinite(s.detach()).any(-1, keepdim=True)
    return torch.softmax(torch.where(alive, s, torch.zeros_like(s)), -1) * alive, scale


def _sdpa_naive(q, k, v, mask, kw):
    """Plain torch in the inputs' precision (the tolerance rule's baseline);
    rows that see no key give 0."""
    if kw["dropout_p"] >= 1:
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype) + 0 * (q.sum() + k.sum() + v.sum())
    if v.shape[-3] != q.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    return _sdpa_probs(q, k, mask, kw)[0].to(v.dtype) @ v


def _sdpa_fa_grads(q, k, v, mask, kw, dout):
    """dq, dk, dv by FlashAttention's backward formula in plain torch, in the
    inputs' precision: dS = P * (dP - rowsum(dO * O)). Where a row sees one
    key its gradient is exactly 0 in torch's softmax backward, while this
    formula (and every online-softmax backward, the kernel's too) leaves the
    rounding difference of two sums: the tolerance rule's "plain torch doing
    the same thing" for such rows. No dropout."""
    rep = q.shape[-3] // k.shape[-3]
    kr, vr = (k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)) if rep > 1 else (k, v)
    p, scale = _sdpa_probs(q, k, mask, kw)
    p = p.to(v.dtype)
    o = p @ vr
    dp = dout @ vr.transpose(-1, -2)
    ds = p * (dp - (dout * o).sum(-1, keepdim=True))
    dq = (ds @ kr) * scale
    dk = (ds.transpose(-1, -2) @ q) * scale
    dv = p.transpose(-1, -2) @ dout
    if rep > 1:
        dk = dk.unflatten(-3, (k.shape[-3], rep)).sum(-3)
        dv = dv.unflatten(-3, (k.shape[-3], rep)).sum(-3)
    return dq, dk, dv


def _sdpa_truth(q, k, v, mask, kw):
    """torch's SDPA (math) in float64, mask and is_causal both applied, rows
    that see no key -> 0 (pyfastattn's documented rule); and the lse."""
    L, S = q.shape[-2], k.shape[-2]
    m = None if mask is None or mask.dtype == torch.bool else mask.double()
    m = mask if m is None else m
    if kw["is_causal"]:
        tril = torch.ones(L, S, dtype=torch.bool).tril()
        m = (
            tril
            if m is None
            else (m & tril if m.dtype == torch.bool else m.masked_fill(~tril, float("-inf")))
        )
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=kw["dropout_p"], scale=kw["scale"],
                                             enable_gqa=kw["enable_gqa"])  # fmt: skip
    kk = k if k.shape[-3] == q.shape[-3] else k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    s = (q @ kk.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if kw["scale"] is None else kw["scale"])
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    alive = torch.isfinite(s.detach()).any(-1)
    lse = torch.logsumexp(torch.where(alive[..., None], s, torch.zeros_like(s)), -1)
    return out.masked_fill(~alive[..., None], 0.0), lse.masked_fill(~alive, float("-inf"))


@pytest.mark.parametrize("case", range(N_SDPA))
def test_sdpa_drop_in_against_torch_float64(case, poison):
    c = _draw_sdpa(random.Random(SEED + 1000 + case))
    dt = c["dtype"]
    q, k, v, mask = _sdpa_inputs(c)
    kw = dict(dropout_p=c["dropout"], is_causal=c["causal"], scale=c["scale"], enable_gqa=c["gqa"])
    if c["grad"]:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = pyfastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_(c["grad"]) for t in (q, k, v))
    ref, lse = _sdpa_truth(q64, k64, v64, mask, kw)
    assert out.shape == ref.shape and out.dtype == dt, (c, out.shape, ref.shape, out.dtype)
    with torch.no_grad():
        base = _sdpa_naive(q.detach(), k.detach(), v.detach(), mask, kw)
    f = _ok("out", out.detach(), ref.detach(), [base], dt)
    assert f is None, f"{c}: {f}"
    if not c["grad"] or c["dropout"] >= 1:
        return
    dout = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(c["seed"] + 1), dtype=torch.float64
    ).to(dt)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    truth = torch.autograd.grad(ref, (q64, k64, v64), dout.double(), retain_graph=True)
    dD = (dout.double() * (out.detach().double() - ref.detach())).sum(-1)
    corr = fa_grad_correction(lse, dD, (q64, k64))
    fa = [t if cc is None else t - cc for t, cc in zip(truth, (*corr, None))]
    bl = [t.detach().requires_grad_() for t in (q, k, v)]
    bgrads = torch.autograd.grad(_sdpa_naive(*bl, mask, kw), bl, dout)
    fgrads = (None,) * 3
    if not c["dropout"]:
        fgrads = _sdpa_fa_grads(q.detach(), k.detach(), v.detach(), mask, kw, dout)
        # the baseline's formula itself, in float64, against the truth (a wrong
        # baseline would only loosen the rule)
        for t64_, f64 in zip(
            truth, _sdpa_fa_grads(q64.detach(), k64.detach(), v64.detach(), mask, kw, dout.double())
        ):
            assert (t64_ - f64).abs().max().item() <= 1e-9 * (1.0 + t64_.abs().max().item()), (
                f"{c}: FA baseline"
            )
    for name, a, r, r_fa, b, bf in zip(("dq", "dk", "dv"), grads, truth, fa, bgrads, fgrads):
        f = _ok(name, a, r, [b] if bf is None else [b, bf], dt, alt_ref=r_fa)
        assert f is None, f"{c}: {f}"


# ---------------------------------------------------------------------------
# attention / flash_attn_interface against FlashAttention 2's semantics
# ---------------------------------------------------------------------------


def _fa_one(q, k, v, *, scale, causal, wl, wr, softcap, used, slopes, keep, p_drop):
    """One sequence: q (sq, hq, d), k (sk, hk, d), v (sk, hk, dv) -> out
    (sq, hq, dv), lse (hq, sq). Query i sits at key i + len_k - sq; a key at or
    past ``used`` is never read (NaN there must not matter)."""
    sq, hq, _ = q.shape
    sk, hk = k.shape[0], k.shape[1]
    lk = sk if used is None else used
    k, v = k[:lk], v[:lk]  # FlashAttention never reads past the length
    if lk == 0:
        return q.new_zeros(sq, hq, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum()), q.new_full(
            (hq, sq), float("-inf")
        )
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(sq).view(-1, 1), torch.arange(lk).view(1, -1)
    off = lk - sq
    vis = torch.ones(sq, lk, dtype=torch.bool)
    wr = 0 if causal else wr
    if wr >= 0:
        vis &= j <= i + off + wr
    if wl >= 0:
        vis &= j >= i + off - wl
    if slopes is not None:
        s = s - slopes.to(s.dtype).view(-1, 1, 1) * (i + off - j).abs().to(s.dtype)
    s = s.masked_fill(~vis, float("-inf"))
    alive = vis.any(-1)
    s = torch.where(alive.view(1, -1, 1), s, torch.zeros_like(s))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * alive.view(1, -1, 1).to(s.dtype)
    if keep is not None:
        p = p * keep[..., :lk].to(p.dtype) * (0.0 if p_drop >= 1 else 1.0 / (1.0 - p_drop))
    return torch.einsum("hij,jhd->ihd", p, v), lse.masked_fill(~alive.view(1, -1), float("-inf"))


def _fa2_window(wl: int, wr: int, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """FlashAttention 2's own normalisation of window_size (mha_fwd and
    mha_varlen_fwd, then set_params_fprop; seqlen_k: k's length, max_seqlen_k
    for varlen), which flash_attn_interface's functions keep and the native
    API does not: a side of seqlen_k or more is no bound; causal sets the
    right side to 0; then a one-sided window gets seqlen_k on its open side.
    With Sq > 2 Sk a left-only window therefore hides every key from the
    first rows."""
    wl = -1 if wl >= seqlen_k else wl
    wr = -1 if wr >= seqlen_k else wr
    if causal:
        wr = 0
    if wl < 0 and wr >= 0:
        wl = seqlen_k
    if wl >= 0 and wr < 0:
        wr = seqlen_k
    return wl, wr


def _draw_native(rng):
    c = dict(dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    c["hk"] = rng.choice([1, 1, 2, 3])
    c["hq"] = c["hk"] * rng.choice([1, 1, 2, 4])
    c["d"] = rng.choice([1, 3, 8, 24, 40, 64, 72, 128])
    c["dv"] = c["d"] if rng.random() < 0.7 else rng.choice([1, 8, 33])
    c["varlen"] = rng.random() < 0.3
    sizes = [0, 1, 1, 2, 5, 8, 17, 31, 65]
    if c["varlen"]:
        n = rng.choice([1, 2, 3])
        c["lq"], c["lk"] = [rng.choice(sizes) for _ in range(n)], [rng.choice(sizes) for _ in range(n)]
        c["tail_q"], c["tail_k"] = rng.choice([0, 0, 3]), rng.choice([0, 0, 2])
    else:
        c["b"], c["sq"], c["sk"] = rng.choice([1, 2, 3]), rng.choice(sizes[1:]), rng.choice(sizes[1:])
    c["causal"] = rng.random() < 0.4
    c["wl"], c["wr"] = rng.choice([-1, -1, -1, 0, 4, 16, 1000]), rng.choice([-1, -1, -1, 0, 7, 1000])
    c["softcap"] = rng.choice([0.0, 0.0, 0.0, 1.5, 30.0])
    c["scale"] = rng.choice([None, None, 0.3])
    c["used"] = rng.random() < 0.3
    c["alibi"] = rng.choice([None, None, None, "h", "bh"])
    c["dropout"] = rng.choice([0.0] * 6 + [0.2, 1.0])
    c["layout"] = rng.choice(["contig", "bhsd", "rows"])
    c["api"] = rng.choice(["attention", "attention", "fa"])
    c["grad"] = rng.random() < 0.5
    c["seed"] = rng.randrange(1 << 30)
    return c


@pytest.mark.parametrize("case", range(N_NATIVE))
def test_native_api_against_flash_attention_semantics(case, poison):
    c = _draw_native(random.Random(SEED + 2000 + case))
    g = torch.Generator().manual_seed(c["seed"])
    dt, hq, hk, d, dv = c["dtype"], c["hq"], c["hk"], c["d"], c["dv"]

    def lay(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)
        if c["layout"] == "bhsd" and t.dim() == 4:
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        if c["layout"] == "rows":
            w = torch.zeros(*shape[:-1], shape[-1] + 5, dtype=dt)
            w[..., : shape[-1]] = t
            return w[..., : shape[-1]]
        return t

    kw = dict(
        causal=c["causal"], window_size=(c["wl"], c["wr"]), softcap=c["softcap"], softmax_scale=c["scale"]
    )
    if c["varlen"]:
        lq, lk = c["lq"], c["lk"]
        nb = len(lq)
        q, k, v = (
            lay(sum(lq) + c["tail_q"], hq, d),
            lay(sum(lk) + c["tail_k"], hk, d),
            lay(sum(lk) + c["tail_k"], hk, dv),
        )
        cq = [0, *torch.tensor(lq).cumsum(0).tolist()]
        ck = [0, *torch.tensor(lk).cumsum(0).tolist()]
        kw.update(cu_seqlens_q=torch.tensor(cq, dtype=torch.int32), cu_seqlens_k=torch.tensor(ck, dtype=torch.int32),
                  max_seqlen_q=max(lq), max_seqlen_k=max(lk))  # fmt: skip
        spans = [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(nb)]
    else:
        nb, sq, sk = c["b"], c["sq"], c["sk"]
        q, k, v = lay(nb, sq, hq, d), lay(nb, sk, hk, d), lay(nb, sk, hk, dv)
        spans = None
    used = None
    if c["used"]:
        avail = lk if c["varlen"] else [sk] * nb
        used = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in avail]
        with torch.no_grad():  # keys past the lengths hold NaN: never read
            for i, u in enumerate(used):
                if c["varlen"]:
                    k[ck[i] + u : ck[i + 1]] = float("nan")
                    v[ck[i] + u : ck[i + 1]] = float("nan")
                else:
                    k[i, u:] = float("nan")
                    v[i, u:] = float("nan")
    slopes = (
        None if c["alibi"] is None else torch.rand(*((hq,) if c["alibi"] == "h" else (nb, hq)), generator=g)
    )
    api = "attention" if used is not None else c["api"]
    cf = c  # the window the truth applies: FlashAttention 2's normalisation for its interface
    if api == "fa":
        wl_fa, wr_fa = _fa2_window(c["wl"], c["wr"], c["causal"], max(lk) if c["varlen"] else sk)
        cf = {**c, "wl": wl_fa, "wr": wr_fa}
    if c["grad"]:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    p = c["dropout"]
    keep = None
    if api == "attention":
        used_t = None if used is None else torch.tensor(used, dtype=torch.int32)
        res = pyfastattn.attention(q, k, v, return_lse=True, seqused_k=used_t, alibi_slopes=slopes, dropout_p=p,
                                   return_dropout_mask=p > 0, **kw)  # fmt: skip
        out, lse = res[0], res[1]
        keep = res[2] if p > 0 else None
    else:
        fkw = dict(dropout_p=p, softmax_scale=c["scale"], causal=c["causal"], window_size=(c["wl"], c["wr"]),
                   softcap=c["softcap"], alibi_slopes=slopes, return_attn_probs=True)  # fmt: skip
        if c["varlen"]:
            out, lse, sdm = fai.flash_attn_varlen_func(q, k, v, kw["cu_seqlens_q"], kw["cu_seqlens_k"],
                                                       kw["max_seqlen_q"], kw["max_seqlen_k"], **fkw)  # fmt: skip
        else:
            out, lse, sdm = fai.flash_attn_func(q, k, v, **fkw)
        assert (sdm is None) == (p == 0)
        keep = None if sdm is None else ~torch.signbit(sdm)
        assert torch.isposinf(lse).any() or not torch.isneginf(lse).any(), "FlashAttention's LSE is +inf"
        lse = lse.masked_fill(torch.isposinf(lse), float("-inf"))
    q64, k64, v64 = (t.detach().double().requires_grad_(c["grad"]) for t in (q, k, v))
    scale = c["scale"] if c["scale"] is not None else d**-0.5
    ref, rlse = _fa_all(q64, k64, v64, cf, spans, nb, used, slopes, keep, scale)
    assert out.shape == ref.shape and lse.shape == rlse.shape, (
        c,
        out.shape,
        ref.shape,
        lse.shape,
        rlse.shape,
    )
    assert not torch.isnan(out).any(), f"{c}: NaN in the output"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), f"{c}: rows without keys differ"
    fin = torch.isfinite(rlse)
    if fin.any():
        err = (lse.double()[fin] - rlse[fin].detach()).abs().max().item()
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dt, 2e-2) * (1 + rlse[fin].abs().max().item())
        assert err <= tol, f"{c}: lse error {err:.3e} > {tol:.3e}"
    f = _ok("out", out.detach(), ref.detach(), None, dt)
    if f is not None:  # the low-precision baseline: the same truth computed in dt
        base = (
            ref.detach().to(dt)
            if dt == torch.float64
            else _fa_all(q, k, v, cf, spans, nb, used, slopes, keep, scale)[0]
        )
        f = _ok("out", out.detach(), ref.detach(), [base], dt)
    assert f is None, f"{c}: {f}"
    if not c["grad"] or out.numel() == 0:
        return
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dt)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    truth = torch.autograd.grad(ref, (q64, k64, v64), dout.double(), retain_graph=True, allow_unused=True)
    truth = [torch.zeros_like(t) if r is None else r for r, t in zip(truth, (q64, k64, v64))]
    dD = (dout.double() * (out.detach().double() - ref.detach())).sum(-1)
    dD = dD.transpose(0, 1) if spans else dD.transpose(1, 2)
    corr = fa_grad_correction(rlse, dD, (q64, k64))
    fa = [t if cc is None else t - cc for t, cc in zip(truth, (*corr, None))]
    bl = [t.detach().requires_grad_() for t in (q, k, v)]
    bo = _fa_all(*bl, cf, spans, nb, used, slopes, keep, scale)[0]
    bgrads = torch.autograd.grad(bo, bl, dout, allow_unused=True)
    for name, a, r, r_fa, b, t in zip(("dq", "dk", "dv"), grads, truth, fa, bgrads, (q, k, v)):
        if used is not None and name != "dq":  # keys past the lengths: exactly zero gradients
            past = torch.isnan(t.detach())
            assert torch.equal(a[past], torch.zeros_like(a[past])), f"{c}: {name} past seqused_k"
            a, r, r_fa = (x.masked_fill(past, 0) for x in (a, r, r_fa))
            b = None if b is None else b.masked_fill(past, 0)
        f = _ok(name, a, r, [b] if b is not None else None, dt, alt_ref=r_fa)
        assert f is None, f"{c}: {f}"


def _fa_all(q, k, v, c, spans, nb, used, slopes, keep, scale):
    """_fa_one over every sequence of the call, in the inputs' dtype (float64:
    the truth; the inputs' own: plain torch's error, for the tolerance rule),
    as (out, lse) in the call's layout (packed: rows past the last sequence
    are 0 with an lse of -inf)."""
    outs, lses = [], []
    for i in range(nb):
        a, b_, e, f = spans[i] if spans else (None,) * 4
        qs, ks, vs = (q[a:b_], k[e:f], v[e:f]) if spans else (q[i], k[i], v[i])
        kp = None if keep is None else keep[i, :, : qs.shape[0], : ks.shape[0]]
        sl = slopes if slopes is None or slopes.dim() == 1 else slopes[i]
        o, ls = _fa_one(qs, ks, vs, scale=scale, causal=c["causal"], wl=c["wl"], wr=c["wr"], softcap=c["softcap"],
                        used=None if used is None else used[i], slopes=sl, keep=kp, p_drop=c["dropout"])  # fmt: skip
        outs.append(o.to(q.dtype))
        lses.append(ls)
    if spans:
        hq = q.shape[1]
        return (
            torch.cat([*outs, q.new_zeros(c["tail_q"], hq, v.shape[-1])]),
            torch.cat([*lses, q.new_full((hq, c["tail_q"]), float("-inf"))], 1),
        )
    return torch.stack(outs), torch.stack(lses)


# ---------------------------------------------------------------------------
# attention_with_kvcache against flash_attn_with_kvcache's semantics
# ---------------------------------------------------------------------------


def _rotate(x, cos, sin, pos, interleaved):
    """x (S, H, D) float64 turned at int positions pos (S,)."""
    rd = 2 * cos.shape[1]
    c, s = cos[pos].double()[:, None], sin[pos].double()[:, None]
    x = x.clone()
    if interleaved:
        x0, x1 = x[..., 0:rd:2].clone(), x[..., 1:rd:2].clone()
        x[..., 0:rd:2], x[..., 1:rd:2] = x0 * c - x1 * s, x0 * s + x1 * c
    else:
        x0, x1 = x[..., : rd // 2].clone(), x[..., rd // 2 : rd].clone()
        x[..., : rd // 2], x[..., rd // 2 : rd] = x0 * c - x1 * s, x0 * s + x1 * c
    return x


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("case", range(N_KV))
def test_kvcache_against_flash_attention_semantics(case, mode):
    rng = random.Random(SEED + 3000 + case)
    dt = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    b, hk = rng.choice([1, 2, 3]), rng.choice([1, 2])
    hq, d = hk * rng.choice([1, 2, 4]), rng.choice([8, 16, 40, 64])
    sq, s_new = rng.choice([1, 1, 2, 5, 20]), rng.choice([0, 1, 1, 3])
    paged, bs, cap = rng.random() < 0.4, rng.choice([1, 3, 16]), rng.choice([20, 48])
    batch_idx = not paged and rng.random() < 0.3
    leftpad, rotary = rng.random() < 0.25, rng.choice([None, "inter", "half"]) if s_new else None
    causal, wl, softcap = rng.random() < 0.5, rng.choice([-1, -1, 2, 9]), rng.choice([0.0, 0.0, 5.0])
    alibi, fa = rng.random() < 0.2, rng.random() < 0.3
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    seqlens = [int(torch.randint(0, cap - s_new + 1, (1,), generator=g)) for _ in range(b)]
    lp = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in seqlens] if leftpad else [0] * b
    if paged:
        per = -(-cap // bs)
        cap = per * bs
        kc, vc = rnd(b * per + 2, bs, hk, d), rnd(b * per + 2, bs, hk, d)
        table = torch.randperm(b * per + 2, generator=g)[: b * per].view(b, per).to(torch.int32)
        loc = lambda i, t: (int(table[i, t // bs]), t % bs)  # noqa: E731
    else:
        kc, vc = rnd(b + 2 if batch_idx else b, cap, hk, d), rnd(b + 2 if batch_idx else b, cap, hk, d)
        table = None
        bidx = torch.randperm(b + 2, generator=g)[:b].to(torch.int32) if batch_idx else None
        loc = lambda i, t: (i if bidx is None else int(bidx[i]), t)  # noqa: E731
    # never read: cache positions past cache_seqlens + s_new, block-table entries past each sequence's blocks
    with torch.no_grad():
        for i in range(b):
            for t in range(seqlens[i] + s_new, cap):
                kc[loc(i, t)], vc[loc(i, t)] = float("nan"), float("nan")
    if paged:
        for i in range(b):
            table[i, -(-(seqlens[i] + s_new) // bs) :] = -1
    q, k, v = (
        rnd(b, sq, hq, d),
        (rnd(b, s_new, hk, d) if s_new else None),
        (rnd(b, s_new, hk, d) if s_new else None),
    )
    cos = sin = None
    if rotary:
        ang = torch.rand(cap + sq, d // 4, generator=g, dtype=torch.float64) * 6.28
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    slopes = torch.rand(hq, generator=g) if alibi else None
    kw = dict(cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), cache_leftpad=torch.tensor(lp, dtype=torch.int32)
              if leftpad else None, block_table=table, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "inter",
              causal=causal, window_size=(wl, -1), softcap=softcap, alibi_slopes=slopes)  # fmt: skip
    if not paged:
        kw["cache_batch_idx"] = bidx
    kc0, vc0 = kc.double(), vc.double()
    with pyfastattn.backend(mode):
        if fa:
            out, lse = fai.flash_attn_with_kvcache(q, kc, vc, k, v, return_softmax_lse=True, **kw)
            lse = lse.masked_fill(torch.isposinf(lse), float("-inf"))
        else:
            out, lse = pyfastattn.attention_with_kvcache(q, kc, vc, k, v, return_lse=True, **kw)
    wl_eff = wl if 0 <= wl < cap else -1
    per_row = causal or wl_eff >= 0
    outs, lses = [], []
    for i in range(b):
        for s in range(s_new):  # the append, rotated at the cache position
            t = seqlens[i] + s
            kn = k[i, s : s + 1].double()
            if rotary:
                kn = _rotate(kn, cos, sin, torch.tensor([t]), rotary == "inter").to(dt).double()
            kc0[loc(i, t)], vc0[loc(i, t)] = kn[0], v[i, s].double()
        keys = range(lp[i], seqlens[i] + s_new)
        K = torch.stack([kc0[loc(i, t)] for t in keys]) if len(keys) else kc0.new_zeros(0, hk, d)
        V = torch.stack([vc0[loc(i, t)] for t in keys]) if len(keys) else vc0.new_zeros(0, hk, d)
        qi = q[i].double()
        if rotary:
            pos = torch.arange(sq) * per_row + seqlens[i]
            qi = _rotate(qi, cos, sin, pos, rotary == "inter").to(dt).double()
        o, ls = _fa_one(qi, K, V, scale=d**-0.5, causal=causal, wl=wl_eff, wr=-1, softcap=softcap, used=None,
                       slopes=slopes, keep=None, p_drop=0.0)  # fmt: skip
        outs.append(o)
        lses.append(ls)
    ref, rlse = torch.stack(outs), torch.stack(lses)
    written = [(kc, kc0), (vc, vc0)]
    for got, want in written:  # the caches: new keys where they go, nothing else touched
        same = torch.isnan(got) == torch.isnan(want)
        assert same.all(), "the append wrote where it should not, or not where it should"
        assert (
            torch.equal(got.double().nan_to_num(0), want.nan_to_num(0))
            or dt != torch.float32
            or ((got.double() - want).nan_to_num(0).abs().max() < 1e-5)
        )
    assert torch.isfinite(out).all(), "a value past cache_seqlens reached the output"
    err = (out.double() - ref).abs().max().item()
    lim = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dt] * (1 + ref.abs().max().item())
    assert err <= lim, f"out error {err:.3e} > {lim:.3e}"
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    fin = torch.isfinite(rlse)
    if fin.any():
        assert (lse.double()[fin] - rlse[fin]).abs().max() <= (1e-4 if dt == torch.float32 else 3e-2) * (
            1 + rlse[fin].abs().max()
        )


def test_case_counts_are_bounded():
    # CI's default must stay well under a minute on one core
    assert DEFAULT_CASES[0] + DEFAULT_CASES[1] + 2 * DEFAULT_CASES[2] <= 300
