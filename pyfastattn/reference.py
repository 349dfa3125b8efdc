"""Pure-PyTorch reference: the truth, the fallback, and a benchmark baseline.

Attention here speaks the canonical form of ``torch.ops.pyfastattn.attention_fwd``
(see ``csrc/attention/params.h`` for the exact semantics):

* dense: ``q`` [b, sq, hq, d], ``k`` [b, sk, hk, d], ``v`` [b, sk, hk, dv];
  varlen: ``q`` [total_q, hq, d] etc. with int32 ``cu_seqlens_q``/``cu_seqlens_k``.
* key j is visible from query row i iff ``j < len_k`` and it lies inside the
  window ``[i + offset - window_left, i + offset + window_right]`` (a negative
  bound is unbounded), where ``offset = len_k - len_q`` if ``bottom_right``
  else 0, and the optional ``attn_mask`` allows it. Causal is ``window_right=0``.
* scores ``s = q.k * scale``; with ``softcap > 0``, ``s = softcap * tanh(s / softcap)``;
  an additive mask is added after that.
* a row with no visible key gives output 0 and lse -inf, never NaN, and zero
  gradients.

Computation runs in float32 (float64 for float64 inputs) and the output is cast
back to the input dtype. ``lse`` is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "attention_with_kvcache",
    "apply_rotary",
    "kvcache_append_",
    "kvcache_gather",
    "dropout_keep_mask",
    "alibi_bias",
    "feed_forward",
    "gated_feed_forward",
    "apply_activation",
    "ACTIVATIONS",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _visible(
    len_q: int,
    seqlen_k: int,
    len_k: torch.Tensor,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    device: torch.device,
) -> torch.Tensor:
    """Bool [b, 1, len_q, seqlen_k]: which keys each row may see (before attn_mask).

    ``len_k`` is an int64 tensor [b] of real key lengths (<= seqlen_k).
    """
    i = torch.arange(len_q, device=device).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, 1, -1)
    lk = len_k.view(-1, 1, 1, 1)
    vis = j < lk
    offset = (lk - len_q) if bottom_right else torch.zeros_like(lk)
    if window_left >= 0:
        vis = vis & (j >= i + offset - window_left)
    if window_right >= 0:
        vis = vis & (j <= i + offset + window_right)
    return vis


# ---------------------------------------------------------------------------
# Dropout keep pattern: Philox 4x32-10, the same pure function as
# csrc/attention/dropout.h (which documents the counter layout), with uint32
# arithmetic emulated in int64 (a wrapping int64 product keeps the exact low
# 64 bits of the 32 x 32 product).
# ---------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox 4x32-10 of int64 tensors holding uint32 counter words (broadcast),
    under the key (k0, k1). Returns the four output words as int64 tensors."""
    for _ in range(10):
        p0 = c0 * _PHILOX_M0
        p1 = c2 * _PHILOX_M1
        c0, c1, c2, c3 = (
            ((p1 >> 32) & _M32) ^ c1 ^ k0,
            p1 & _M32,
            ((p0 >> 32) & _M32) ^ c3 ^ k1,
            p0 & _M32,
        )
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """A 16-bit piece u is kept iff u >= this (2^16 for p = 1: nothing kept)."""
    if not p > 0:
        return 0
    if p >= 1:
        return 1 << 16
    return int(p * 65536.0 + 0.5)


def _to_int64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def dropout_keep_mask(
    dropout_rng: torch.Tensor | tuple[int, int],
    dropout_p: float,
    batch: int | torch.Tensor,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool (B, H, Sq, Sk): True where the kernels keep the weight of query
    row i, key j, head h, sequence b for this (seed, offset) and ``dropout_p``.
    ``batch`` may be a tensor of sequence indices (the varlen reference asks
    for one sequence at a time)."""
    seed, offset = (int(x) for x in (dropout_rng.tolist() if torch.is_tensor(dropout_rng) else dropout_rng))
    seed &= (1 << 64) - 1
    b = batch if torch.is_tensor(batch) else torch.arange(batch)
    b = b.to(device=device, dtype=torch.int64).view(-1, 1, 1, 1)
    groups = (seqlen_k + 7) // 8
    h = torch.arange(heads, device=device, dtype=torch.int64).view(1, -1, 1, 1)
    i = torch.arange(seqlen_q, device=device, dtype=torch.int64).view(1, 1, -1, 1)
    g = torch.arange(groups, device=device, dtype=torch.int64).view(1, 1, 1, -1)
    t = (b << 29) + g + _to_int64(offset)  # wraps like the uint64 sum
    c0, c1 = t & _M32, (t >> 32) & _M32
    shape = (b.shape[0], heads, seqlen_q, groups)
    c0, c1, c2, c3 = (x.expand(shape) for x in (c0, c1, i & _M32, h & _M32))
    words = torch.stack(philox4x32_10(c0, c1, c2, c3, seed & _M32, seed >> 32), dim=-1)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1)  # key 8g + 2x + e: word x, half e
    halves = halves.reshape(*shape[:3], groups * 8)[..., :seqlen_k]
    return halves >= dropout_threshold(dropout_p)


def zero_keys_past_lengths(
    k: torch.Tensor, v: torch.Tensor, len_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` / ``v`` [b, sk, h, *] with the keys at or past each sequence's
    length ``len_k`` (int [b]) replaced by zeros. Those keys are never read
    (FlashAttention's contract: a cache past ``cache_seqlens`` or a padded
    tensor past ``seqused_k`` may hold anything, NaN or inf from ``torch.empty``
    included); masking their scores alone is not enough, since 0 * NaN is NaN
    in ``p @ v`` and in the gradients. Differentiable: those keys get zero
    gradients, the kept ones their own."""
    valid = torch.arange(k.shape[1], device=k.device) < len_k.to(k.device).view(-1, 1)
    valid = valid.view(valid.shape[0], k.shape[1], 1, 1)
    zero = k.new_zeros(())
    return torch.where(valid, k, zero), torch.where(valid, v, zero)


def alibi_bias(
    slopes: torch.Tensor, len_q: int, seqlen_k: int, len_k: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(B|1, H, len_q, seqlen_k): ``-slope * |i + len_k - len_q - j|`` (FlashAttention's
    ALiBi), slopes (H,) or (B, H), ``len_k`` int64 [b] of real key lengths."""
    sl = slopes.to(dtype)
    sl = sl.view(1, -1, 1, 1) if sl.dim() == 1 else sl.view(sl.shape[0], sl.shape[1], 1, 1)
    i = torch.arange(len_q, device=slopes.device).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k, device=slopes.device).view(1, 1, 1, -1)
    dist = (i + len_k.to(slopes.device).view(-1, 1, 1, 1) - len_q - j).abs().to(dtype)
    return -sl * dist


def softmax_rows(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of scores ``s`` (..., L, S) over the keys, and each row's
    log-sum-exp (..., L), written out so that a row with no visible key
    (all -inf) gives exactly 0 and lse -inf, with no NaN in the forward *or*
    the backward: the max is detached (softmax is invariant to it) and an
    all-zero row sum is replaced by 1. With no keys (S = 0) p is empty, so
    p @ v gives zeros while keeping its inputs in the autograd graph."""
    if s.shape[-1] == 0:
        return torch.exp(s), s.new_full(s.shape[:-1], float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    return p, (m + torch.log(denom.detach())).squeeze(-1)


def _dense(
    q, k, v, attn_mask, len_k, scale, softcap, window_left, window_right, bottom_right, dropout_p,
    alibi_slopes=None, dropout_keep=None,
):  # fmt: skip
    cdt = _compute_dtype(q.dtype)
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qf = q.to(cdt).transpose(1, 2)
    kf = k.to(cdt).transpose(1, 2)
    vf = v.to(cdt).transpose(1, 2)
    if hk != hq:
        kf = kf.repeat_interleave(hq // hk, dim=1)
        vf = vf.repeat_interleave(hq // hk, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, sq, sk, len_k, cdt)
    vis = _visible(sq, sk, len_k, window_left, window_right, bottom_right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            s = s + attn_mask.to(cdt)
    s = s.masked_fill(~vis, float("-inf"))
    p, lse = softmax_rows(s)
    if dropout_p > 0 and dropout_keep is not None:
        rescale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
        p = p * (dropout_keep.to(cdt) * rescale)
    elif dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = torch.matmul(p, vf).transpose(1, 2)
    return out.to(q.dtype), lse.to(torch.float64 if cdt == torch.float64 else torch.float32)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    softcap: float = 0.0,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = False,
    dropout_p: float = 0.0,
    dropout_rng: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention in the canonical form. Returns ``(out, lse)``.

    Dropout (``dropout_p > 0``) drops the weights the kernels drop: those of
    :func:`dropout_keep_mask` for ``dropout_rng`` (int64 [2], seed and
    offset), or exactly ``dropout_mask`` (bool (B, Hq, Sq, Sk), True = kept;
    varlen: padded to the max lengths) when given; with neither, torch's own
    ``F.dropout``. Kept weights are scaled by 1 / (1 - p). ``alibi_slopes``
    (fp32, (Hq,) or (B, Hq)) adds ``-slope * |i + len_k - len_q - j|`` to the
    scores after softcap.

    Shapes: dense ``q`` [b, sq, hq, d], ``k`` [b, sk, hk, d], ``v`` [b, sk, hk, dv],
    ``attn_mask`` broadcastable to [b, hq, sq, sk] (bool: True = attend; float:
    added), ``seqused_k`` int [b]; out [b, sq, hq, dv], lse [b, hq, sq].
    Varlen: ``q`` [total_q, hq, d], ``k``/``v`` [total_k, hk, *], int32
    ``cu_seqlens_q``/``cu_seqlens_k`` [b + 1]; out [total_q, hq, dv], lse
    [hq, total_q]. Rows of a packed tensor past ``cu_seqlens_q[-1]`` get 0 / -inf.
    Differentiable in q, k, v (and a float mask); lse is not differentiable.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if torch.is_tensor(dropout_rng) and dropout_rng.device.type == "meta":
        dropout_rng = None  # shapes only (meta tensors): F.dropout gives them
    if cu_seqlens_q is None:
        b, sk = k.shape[0], k.shape[1]
        if seqused_k is None:
            len_k = torch.full((b,), sk, dtype=torch.int64, device=q.device)
        else:
            len_k = seqused_k.to(device=q.device, dtype=torch.int64)
            k, v = zero_keys_past_lengths(k, v, len_k)
        keep = dropout_mask
        if dropout_p > 0 and keep is None and dropout_rng is not None:
            keep = dropout_keep_mask(dropout_rng, dropout_p, b, q.shape[2], q.shape[1], sk, q.device)
        return _dense(
            q, k, v, attn_mask, len_k, scale, softcap, window_left, window_right, bottom_right, dropout_p,
            alibi_slopes, keep,
        )  # fmt: skip

    if attn_mask is not None:
        raise ValueError("attn_mask cannot be combined with cu_seqlens")
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    outs, lses = [], []
    hq, dv = q.shape[1], v.shape[2]
    for bi in range(len(cq) - 1):
        qs = q[cq[bi] : cq[bi + 1]].unsqueeze(0)
        ks = k[ck[bi] : ck[bi + 1]].unsqueeze(0)
        vs = v[ck[bi] : ck[bi + 1]].unsqueeze(0)
        lk = ck[bi + 1] - ck[bi] if used is None else used[bi]
        len_k = torch.tensor([lk], dtype=torch.int64, device=q.device)
        if used is not None:
            ks, vs = zero_keys_past_lengths(ks, vs, len_k)
        lq_i, lk_i = cq[bi + 1] - cq[bi], ck[bi + 1] - ck[bi]
        keep = None
        if dropout_p > 0 and dropout_mask is not None:
            keep = dropout_mask[bi : bi + 1, :, :lq_i, :lk_i]
        elif dropout_p > 0 and dropout_rng is not None:
            keep = dropout_keep_mask(dropout_rng, dropout_p, torch.tensor([bi]), hq, lq_i, lk_i, q.device)
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[bi]
        o, lse = _dense(
            qs, ks, vs, None, len_k, scale, softcap, window_left, window_right, bottom_right, dropout_p,
            slopes, keep,
        )  # fmt: skip
        outs.append(o[0])
        lses.append(lse[0])
    tail = q.shape[0] - (cq[-1] if cq else 0)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs.append(q.new_zeros(tail, hq, dv))
    lses.append(torch.full((hq, tail), float("-inf"), dtype=lse_dtype, device=q.device))
    return torch.cat(outs, 0), torch.cat(lses, 1)


# ---------------------------------------------------------------------------
# Attention over a KV cache (pyfastattn.attention_with_kvcache)
#
# Key j (0-based) of sequence b sits at absolute cache position
# t = leftpad[b] + j of cache row cache_batch_idx[b] (or b), or, paged, in
# block block_table[b, t // block_size] at row t % block_size. Sequence b
# attends len_k = cache_seqlens[b] + s_new - leftpad[b] keys; new keys are
# written at positions cache_seqlens[b] .. + s_new - 1; rotary turns new key s
# by the angle of position cache_seqlens[b] + s, and query row i by that of
# cache_seqlens[b] + i (causal or a window) or cache_seqlens[b] (otherwise),
# as FlashAttention 2 does.
# ---------------------------------------------------------------------------


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, S, H, D) at int positions ``pos`` (B, S),
    over the first ``rotary_dim = 2 * cos.shape[1]`` dims: pairs (2i, 2i+1)
    when ``interleaved``, else (i, i + rotary_dim / 2). fp32 arithmetic, one
    rounding to ``x.dtype``; dims past rotary_dim are unchanged."""
    rd = 2 * cos.shape[1]
    c = cos[pos].float()[:, :, None, :]
    s = sin[pos].float()[:, :, None, :]
    xr = x[..., :rd].float()
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., : rd // 2], xr[..., rd // 2 :]
        rot = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def _cache_index(
    t: torch.Tensor,
    b: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) index into a (rows|blocks, S|block_size, H, D) cache for
    absolute positions ``t`` of batch rows ``b`` (same shapes, int64)."""
    if block_table is not None:
        return block_table.long()[b, t // block_size], t % block_size
    rows = b if cache_batch_idx is None else cache_batch_idx.long()[b]
    return rows, t


def kvcache_append_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
) -> None:
    """Writes ``k`` (rotated when ``rotary_cos`` is given) and ``v``, (B, S_new,
    Hk, D), into the caches in place at positions ``cache_seqlens[b] + s``."""
    bsz, s_new = k.shape[:2]
    dev = k_cache.device
    pos = cache_seqlens.to(device=dev, dtype=torch.int64)[:, None] + torch.arange(s_new, device=dev)
    if rotary_cos is not None:
        k = apply_rotary(k, rotary_cos, rotary_sin, pos, rotary_interleaved)
    b = torch.arange(bsz, device=dev)[:, None].expand(bsz, s_new)
    i0, i1 = _cache_index(pos, b, cache_batch_idx, block_table, k_cache.shape[1])
    k_cache[i0, i1] = k.to(k_cache.dtype)
    v_cache[i0, i1] = v.to(v_cache.dtype)


def kvcache_gather(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    len_k: torch.Tensor,
    *,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies each sequence's ``len_k`` keys / values (starting at its left
    pad) into dense (B, max(len_k), Hk, D) tensors; slots past a sequence's
    length are zeros. Only the cache positions (and block-table entries) a
    sequence attends are read: the rest of a block table may hold anything,
    as in FlashAttention (e.g. -1 padding, or stale block ids)."""
    bsz = len_k.shape[0]
    dev = k_cache.device
    len_k = len_k.to(device=dev, dtype=torch.int64)
    width = int(len_k.max().item()) if bsz > 0 else 0
    j = torch.arange(width, device=dev)[None, :].expand(bsz, width)
    valid = j < len_k[:, None]
    lp = torch.zeros(bsz, dtype=torch.int64, device=dev) if cache_leftpad is None else cache_leftpad.long()
    t = torch.where(valid, j + lp[:, None], 0)  # a slot past the length reads position 0 of row / block 0
    b = torch.arange(bsz, device=dev)[:, None].expand(bsz, width)
    if block_table is not None:
        bs = k_cache.shape[1]
        blk = torch.where(valid, block_table.long()[b, torch.where(valid, t // bs, 0)], 0)
        i0, i1 = blk, t % bs
    else:
        i0, i1 = _cache_index(t, b, cache_batch_idx, None, k_cache.shape[1])
    keep = valid[:, :, None, None]
    zero = k_cache.new_zeros(())
    return torch.where(keep, k_cache[i0, i1], zero), torch.where(keep, v_cache[i0, i1], zero)


def kvcache_query_positions(cache_seqlens: torch.Tensor, seqlen_q: int, per_row: bool) -> torch.Tensor:
    """Rotary positions of the query rows, (B, Sq) int64 (FlashAttention 2's
    rule: per row with causal or a window, else all at cache_seqlens)."""
    base = cache_seqlens.long()[:, None]
    step = (
        torch.arange(seqlen_q, device=cache_seqlens.device)
        if per_row
        else torch.zeros(seqlen_q, dtype=torch.int64, device=cache_seqlens.device)
    )
    return base + step[None, :]


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
    scale: float | None = None,
    softcap: float = 0.0,
    window_left: int = -1,
    window_right: int = -1,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``pyfastattn.attention_with_kvcache`` in pure PyTorch:
    append (in place, into the caches given), rotary, gather the keys each
    sequence attends, then :func:`attention` bottom-right aligned. Arguments
    are already canonical: ``cache_seqlens`` an int32 (B,) tensor, the window
    with causal folded in. Returns ``(out, lse)``; out (B, Sq, Hq, Dv), lse
    (B, Hq, Sq)."""
    s_new = 0 if k is None else k.shape[1]
    if k is not None:
        kvcache_append_(
            k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=cache_batch_idx, block_table=block_table,
            rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
        )  # fmt: skip
    if rotary_cos is not None:
        per_row = window_left >= 0 or window_right >= 0
        pos = kvcache_query_positions(cache_seqlens, q.shape[1], per_row)
        q = apply_rotary(q, rotary_cos, rotary_sin, pos, rotary_interleaved)
    lp = 0 if cache_leftpad is None else cache_leftpad.long()
    len_k = cache_seqlens.long() + s_new - lp
    kk, vv = kvcache_gather(
        k_cache, v_cache, len_k, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
        block_table=block_table,
    )  # fmt: skip
    return attention(
        q, kk, vv, scale=scale, seqused_k=len_k.to(torch.int32), softcap=softcap, window_left=window_left,
        window_right=window_right, bottom_right=True, alibi_slopes=alibi_slopes,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Feed-forward network
# ---------------------------------------------------------------------------


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    try:
        fn = ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}") from None
    return fn(x)


def feed_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "gelu",
) -> torch.Tensor:
    """``W2 act(W1 x + b1) + b2``. ``x`` [..., d_model], ``w1`` [d_ff, d_model],
    ``w2`` [d_model, d_ff] (``torch.nn.Linear`` layout), computed in fp32."""
    cdt = _compute_dtype(x.dtype)
    h = F.linear(x.to(cdt), w1.to(cdt), None if b1 is None else b1.to(cdt))
    h = apply_activation(h, activation)
    y = F.linear(h, w2.to(cdt), None if b2 is None else b2.to(cdt))
    return y.to(x.dtype)


def gated_feed_forward(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """``W_down (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down`` (SwiGLU for
    silu, GeGLU for gelu), in ``torch.nn.Linear`` weight layout, computed in fp32."""
    cdt = _compute_dtype(x.dtype)
    xf = x.to(cdt)
    g = F.linear(xf, w_gate.to(cdt), None if b_gate is None else b_gate.to(cdt))
    u = F.linear(xf, w_up.to(cdt), None if b_up is None else b_up.to(cdt))
    h = apply_activation(g, activation) * u
    y = F.linear(h, w_down.to(cdt), None if b_down is None else b_down.to(cdt))
    return y.to(x.dtype)
