"""FlashAttention 2's public functions, over pyfastattn.

A codebase that writes ``from flash_attn import flash_attn_func`` (or
``from flash_attn.flash_attn_interface import ...``) can write
``from pyfastattn.flash_attn_interface import ...`` instead and run unchanged,
on CPU and CUDA: the same argument names, defaults, positions and return
conventions. This module only translates arguments and return values; the
math is :func:`pyfastattn.attention` and :func:`pyfastattn.attention_with_kvcache`.

Return conventions (FlashAttention 2.6+):

* ``out`` alone, or with ``return_attn_probs=True`` the tuple
  ``(out, softmax_lse, S_dmask)``: ``softmax_lse`` float32 (B, H, Sq), or
  (H, total_q) for the varlen functions. ``S_dmask`` is None without dropout
  (as in FlashAttention); with ``dropout_p > 0`` it is the softmax weights P
  (before dropout, q's dtype, (B, H, Sq, Sk); varlen (B, H, max_seqlen_q,
  max_seqlen_k), rows and keys counted inside each sequence, zero past them)
  with every dropped element negated: FlashAttention's convention, "negative
  means dropped". A dropped weight of 0 (a hidden key) is -0.0, so test with
  ``torch.signbit(S_dmask)``. Debug only: O(B H Sq Sk) memory and a second
  attention computation through the reference (FlashAttention also pads the
  last two dims to multiples of 128; these are not padded).
* The LSE of a query row that sees no key is ``+inf``, as FlashAttention
  returns it (pyfastattn's own functions give ``-inf``).
* ``flash_attn_with_kvcache`` returns ``out``, or ``(out, softmax_lse)`` with
  ``return_softmax_lse=True``.

Windows are normalised as FlashAttention 2 normalises them: a side of
``seqlen_k`` or more (``max_seqlen_k`` for varlen, the cache's capacity for the
KV cache) means no bound, and (without causal) a left-only window
``(left, -1)`` gets the right bound ``seqlen_k`` (the KV cache:
:func:`pyfastattn.attention_with_kvcache` applies both rules itself). Both
differ from the plain bounds only when Sq > Sk (Sq > capacity + 1 for the KV
cache), for the first rows (bottom-right alignment).

Accepted and ignored (they steer FlashAttention's CUDA scheduling only):
``deterministic`` (pyfastattn's CPU backward is deterministic; on CUDA
``torch.use_deterministic_algorithms`` applies) and ``num_splits`` outside
the KV-cache call. ``dropout_p`` and ``alibi_slopes`` are those of
:func:`pyfastattn.attention` (fused in the kernels, issue 17): dropout draws
its (seed, offset) pair from torch's default generator of q's device, and
ALiBi adds ``-slope * |i + Sk - Sq - j|``, FlashAttention's convention
(``flash_attn_with_kvcache`` too, with Sk the keys each sequence attends).
"""

from __future__ import annotations

import operator

import torch

from . import reference
from .functional import InvalidArgumentError, attention
from .kvcache import attention_with_kvcache

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _fa_lse(lse: torch.Tensor) -> torch.Tensor:
    """pyfastattn's -inf for a row without keys -> FlashAttention's +inf."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _weights(q, k, kwargs, varlen: bool) -> torch.Tensor:
    """The softmax weights P of the call (no dropout), (B, Hq, Sq, Sk) in q's
    dtype (varlen: padded to the max lengths), computed by the reference with
    v = the identity over key positions (P @ I = P)."""
    wl, wr = kwargs["window_size"]
    ref = dict(
        scale=kwargs["softmax_scale"], softcap=kwargs["softcap"], window_left=int(wl),
        window_right=0 if kwargs["causal"] else int(wr), bottom_right=True, alibi_slopes=kwargs["alibi_slopes"],
    )  # fmt: skip
    q, k = q.detach(), k.detach()
    if not varlen:
        b, sk, hk = k.shape[0], k.shape[1], k.shape[2]
        if sk == 0:
            return q.new_zeros(b, q.shape[2], q.shape[1], 0)
        v_id = torch.eye(sk, dtype=q.dtype, device=q.device).view(1, sk, 1, sk).expand(b, sk, hk, sk)
        p, _ = reference.attention(q, k, v_id, **ref)  # (B, Sq, Hq, Sk)
        return p.transpose(1, 2)
    cu_q, cu_k = kwargs["cu_seqlens_q"].tolist(), kwargs["cu_seqlens_k"].tolist()
    msq, msk, hk = kwargs["max_seqlen_q"], kwargs["max_seqlen_k"], k.shape[1]
    pos = torch.zeros(k.shape[0], dtype=torch.long)  # rows past cu_seqlens_k[-1]: never attended
    for i in range(len(cu_k) - 1):
        pos[cu_k[i] : cu_k[i + 1]] = torch.arange(cu_k[i + 1] - cu_k[i])
    v_id = torch.nn.functional.one_hot(pos, max(msk, 1)).to(device=q.device, dtype=q.dtype)
    v_id = v_id.view(-1, 1, v_id.shape[-1]).expand(-1, hk, v_id.shape[-1])
    p, _ = reference.attention(q, k, v_id, cu_seqlens_q=kwargs["cu_seqlens_q"], cu_seqlens_k=kwargs["cu_seqlens_k"],
                               **ref)  # fmt: skip
    out = p.new_zeros(len(cu_q) - 1, q.shape[1], msq, msk)
    for i in range(len(cu_q) - 1):
        out[i, :, : cu_q[i + 1] - cu_q[i]] = p[cu_q[i] : cu_q[i + 1], :, :msk].transpose(0, 1)
    return out


def _call(q, k, v, dropout_p, alibi_slopes, return_attn_probs, varlen: bool, **kwargs):
    """pyfastattn.attention, then FlashAttention's return convention."""
    kwargs.update(alibi_slopes=alibi_slopes, return_lse=True)
    with_dropout = isinstance(dropout_p, (int, float)) and dropout_p > 0  # attention() validates it
    if not (return_attn_probs and with_dropout):
        out, lse = attention(q, k, v, dropout_p=dropout_p, **kwargs)
        return (out, _fa_lse(lse), None) if return_attn_probs else out
    out, lse, keep = attention(q, k, v, dropout_p=dropout_p, return_dropout_mask=True, **kwargs)
    p = _weights(q, k, kwargs, varlen)
    return out, _fa_lse(lse), torch.where(keep, p, -p)


def _fa_window(window_size, seqlen_k: int | None, causal) -> tuple:
    """FlashAttention 2's normalisation of ``window_size`` (mha_fwd /
    mha_varlen_fwd, then set_params_fprop), with seqlen_k = k's length
    (``max_seqlen_k`` for varlen): a side of seqlen_k or more is no bound
    (-1); then, without causal, a left-only window gets the right bound
    seqlen_k. Both change the mask only when Sq > Sk: bottom-right, row i
    sits at key i + Sk - Sq, so its right bound i + Sk - Sq + right is below
    the last key for the first rows."""
    if (
        seqlen_k is None  # k is not (B, S, H, D)
        or not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) for w in window_size)
    ):
        return tuple(window_size)  # attention() says what is wrong
    wl, wr = (-1 if w >= seqlen_k else w for w in window_size)
    if wl >= 0 and wr < 0 and not causal:
        wr = seqlen_k
    return wl, wr


def _seqlen_arg(x, name: str) -> int:
    """``max_seqlen_q`` / ``max_seqlen_k`` of the varlen functions: an int
    (or an integer scalar such as ``tensor.max().item()`` or a 0-d int
    tensor). int() truncated a float silently and gave bare TypeError /
    ValueError for the rest."""
    if not isinstance(x, bool):
        try:
            return operator.index(x)
        except TypeError:
            pass
    raise InvalidArgumentError(f"{name} must be an int, got {type(x).__name__} {x!r}")


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    sk = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else None
    return _call(
        q, k, v, dropout_p, alibi_slopes, return_attn_probs, False, causal=causal, softmax_scale=softmax_scale,
        window_size=_fa_window(window_size, sk, causal), softcap=softcap,
    )  # fmt: skip


def _varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
    softcap, alibi_slopes, return_attn_probs,
):  # fmt: skip
    max_seqlen_q = _seqlen_arg(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _seqlen_arg(max_seqlen_k, "max_seqlen_k")
    return _call(
        q, k, v, dropout_p, alibi_slopes, return_attn_probs, True, causal=causal, softmax_scale=softmax_scale,
        window_size=_fa_window(window_size, max_seqlen_k, causal), softcap=softcap, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``qkv`` (B, S, 3, H, D) -> out (B, S, H, D)."""
    return _dense(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, return_attn_probs)  # fmt: skip


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``q`` (B, Sq, Hq, D), ``kv`` (B, Sk, 2, Hk, D) -> out (B, Sq, Hq, D)."""
    return _dense(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  return_attn_probs)  # fmt: skip


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``q`` (B, Sq, Hq, D), ``k``/``v`` (B, Sk, Hk, D) -> out (B, Sq, Hq, D).
    Causal and windows are aligned bottom-right when Sq != Sk."""
    return _dense(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs
    )


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``qkv`` (total, 3, H, D), int32 ``cu_seqlens`` (B + 1,) -> out (total, H, D)."""
    max_seqlen = _seqlen_arg(max_seqlen, "max_seqlen")
    return _varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``q`` (total_q, Hq, D), ``kv`` (total_k, 2, Hk, D) -> out (total_q, Hq, D)."""
    return _varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)  # fmt: skip


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """``q`` (total_q, Hq, D), ``k``/``v`` (total_k, Hk, D) packed by int32
    ``cu_seqlens_q``/``cu_seqlens_k`` -> out (total_q, Hq, D). With
    ``block_table`` (B, max_blocks), ``k``/``v`` are paged caches
    (num_blocks, block_size, Hk, D) and sequence b's keys are its first
    ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` positions (gathered, then attended:
    a copy, unlike :func:`flash_attn_with_kvcache`)."""
    if block_table is not None:
        k, v = _gather_paged_varlen(k, v, cu_seqlens_k, block_table)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, return_attn_probs)  # fmt: skip


def _gather_paged_varlen(k_cache, v_cache, cu_seqlens_k, block_table):
    for name, t in (("k", k_cache), ("v", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InvalidArgumentError(
                f"{name} must be a paged cache (num_blocks, block_size, kv heads, head dim) with block_table, "
                f"got shape {tuple(getattr(t, 'shape', ()))}"
            )
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise InvalidArgumentError(
            f"v.shape[:3] (num_blocks, block_size, kv heads) must equal k.shape[:3] ({tuple(k_cache.shape[:3])}), "
            f"got {tuple(v_cache.shape[:3])}"
        )
    if (
        not isinstance(block_table, torch.Tensor)
        or block_table.dtype != torch.int32
        or block_table.dim() != 2
    ):
        raise InvalidArgumentError(f"block_table must be int32 (batch, max_blocks), got "
                                   f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                                   f"of shape {tuple(getattr(block_table, 'shape', ()))}")  # fmt: skip
    lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    bs, nb = k_cache.shape[1], k_cache.shape[0]
    cap = block_table.shape[1] * bs
    if lens.numel() != block_table.shape[0]:
        raise InvalidArgumentError(
            f"block_table.shape[0] must equal the batch ({lens.numel()}), got {block_table.shape[0]}"
        )
    for i, n in enumerate(lens.tolist()):
        if n > cap:
            raise InvalidArgumentError(f"sequence {i} has {n} keys, more than block_table holds ({cap})")
        for blk in range((n + bs - 1) // bs):
            e = int(block_table[i, blk])
            if not 0 <= e < nb:
                raise InvalidArgumentError(f"block_table[{i}, {blk}] must be in [0, {nb}), got {e}")
    kk, vv = reference.kvcache_gather(k_cache, v_cache, lens, block_table=block_table)
    keep = torch.arange(kk.shape[1], device=kk.device)[None, :] < lens[:, None]
    return kk[keep], vv[keep]


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """FlashAttention 2's ``flash_attn_with_kvcache``: see
    :func:`pyfastattn.attention_with_kvcache` (same arguments; ``k_cache``
    and ``v_cache`` are updated in place when ``k``/``v`` are given; ALiBi
    ``alibi_slopes`` fp32 (H,) or (B, H)))."""
    out, lse = attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, causal=causal, softmax_scale=softmax_scale,
        window_size=tuple(window_size), softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True,
        num_splits=int(num_splits or 0),
    )  # fmt: skip
    return (out, _fa_lse(lse)) if return_softmax_lse else out
