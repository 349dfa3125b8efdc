"""Attention over a KV cache: ``attention_with_kvcache``.

FlashAttention 2's ``flash_attn_with_kvcache`` semantics: new keys / values
are appended to the cache in place, rotary embedding is applied to them and
to the query, and each query attends to its sequence's cached keys plus the
new ones, with causal masking and windows aligned bottom-right. The cache is
contiguous (one row per sequence, optionally chosen by ``cache_batch_idx`` and
left-padded by ``cache_leftpad``) or paged (``block_table``).

The CPU op (``torch.ops.pyfastattn.attention_kvcache_fwd``) reads the cache
where it lies, block by block. Decode-sized calls (up to 64 query rows per kv
head) run the KV-cache kernel, which splits long caches into chunks that run
in parallel and merge by their LSE; prefill and long chunks run the tiled
forward of ``attention``, which reads the same rows through the block table,
batch index and left padding. The CUDA kernels (the same op; fp16 /
bf16) do the same on the GPU, but have not run on hardware yet: backend
``auto`` takes them only on the capabilities in
``KVCACHE_CUDA_VERIFIED_CAPABILITIES`` (none yet), backend ``kernel`` always.
Elsewhere (backend ``reference``, an unverified GPU, fp32 on CUDA, or no
compiled extension) the call runs in PyTorch: the same append and rotary,
then the keys are gathered and attended through ``canonical_attention`` (the
backend rule of ``functional``).
"""

from __future__ import annotations

import math

import torch

from . import _backend, _ops, reference
from .functional import (
    InvalidArgumentError,
    _as_invalid_argument,
    _check_alibi_slopes,
    _check_window_softcap_scale,
    call_op,
    canonical_attention,
)

__all__ = ["attention_with_kvcache", "kvcache_unsupported_reason"]

_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16),  # an fp32 cache takes the PyTorch path on CUDA
}

# Compute capabilities on which the CUDA KV-cache kernels have passed
# tests/test_gpu_kvcache.py. None yet: they are written, compiled with zero
# spills and tested under the CPU emulation of their sm_80 primitives
# (csrc/cuda/kvcache/emu), never run on a GPU. Backend "auto" keeps the
# PyTorch path on CUDA until a capability is listed; "kernel" runs them.
KVCACHE_CUDA_VERIFIED_CAPABILITIES: tuple[tuple[int, int], ...] = ()

# The small-call fast path (csrc/attention/fast_call.cpp): this function's
# checks for plain CPU tensors without ALiBi in one C++ pass, then the op with
# unboxed arguments; None for anything else, and the Python path runs as before.
_kvcache_fast = getattr(_ops._C, "attention_kvcache_fast", None)


def _aligned16(t: torch.Tensor | None) -> bool:
    """16-byte aligned with every stride but the last a multiple of 16 bytes:
    what the CUDA kernels' 16-byte row copies need."""
    if t is None:
        return True
    return t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])


def _cuda_reason(q, k_cache, v_cache, rotary_cos, mode) -> str | None:
    """What keeps the CUDA KV-cache kernels from this call (what
    kvcache_fwd_unsupported_reason in csrc/cuda/kvcache/kvcache_fwd.cu checks
    on the tensors the op gets; q, k and v are copied when misaligned)."""
    d = q.shape[-1]
    if k_cache is not None and (k_cache.shape[-1] != v_cache.shape[-1] or d % 8 != 0 or not 8 <= d <= 256):
        return "the CUDA KV-cache kernel needs head_dim == head_dim_v, a multiple of 8 in [8, 256]"
    if k_cache is not None and not (_aligned16(k_cache) and _aligned16(v_cache)):
        return (
            "the CUDA KV-cache kernel needs k_cache / v_cache 16-byte aligned with 16-byte-multiple strides"
        )
    if rotary_cos is not None and (2 * rotary_cos.shape[1]) % 16 != 0:
        return "the CUDA KV-cache kernel needs rotary_dim a multiple of 16"
    if (mode or _backend.get_backend()) == "auto":
        cap = torch.cuda.get_device_capability(q.device)
        if tuple(cap) not in KVCACHE_CUDA_VERIFIED_CAPABILITIES:
            return (
                f"the CUDA KV-cache kernel is not yet verified on hardware of capability {cap[0]}.{cap[1]} "
                "(use backend 'kernel' to run it anyway)"
            )
    return None


def kvcache_unsupported_reason(
    q: torch.Tensor,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    mode: str | None = None,
) -> str | None:
    """Why the fused KV-cache kernel can't run this call (``None`` when it can).
    The caches and rotary table, when given, are checked too (CUDA)."""
    if not _ops.AVAILABLE:
        return f"the compiled extension pyfastattn._C could not be imported ({_ops.EXTENSION_ERROR})"
    dev = q.device.type
    if not _ops.has_kernel("attention_kvcache_fwd", dev):
        return f"there is no KV-cache kernel for device type {dev!r} in this build"
    dtypes = _KERNEL_DTYPES.get(dev, ())
    if q.dtype not in dtypes:
        return f"the {dev.upper()} KV-cache kernel has no {q.dtype} variant (supported: {dtypes})"
    if dev == "cuda":
        return _cuda_reason(q, k_cache, v_cache, rotary_cos, mode)
    return None


def _rows_ok(t: torch.Tensor | None) -> torch.Tensor | None:
    """q / k / v as the op takes them: last dim contiguous, and on CUDA a
    fresh copy of a view that is not 16-byte aligned (the cache itself is
    never copied: it is written in place)."""
    if t is None:
        return None
    if t.stride(-1) != 1:
        return t.contiguous()
    if t.is_cuda and not _aligned16(t):
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _int32_vector(t, name: str, batch: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or tuple(t.shape) != (batch,):
        raise InvalidArgumentError(
            f"{name} must be int32 of shape ({batch},), got {t.dtype} of shape {tuple(t.shape)}"
        )
    if t.device != device:
        raise InvalidArgumentError(f"{name}.device must equal q.device ({device}), got {t.device}")
    return t


def _any_requires_grad(*tensors) -> bool:
    for t in tensors:  # a loop, not any(<generator>): ~0.2 us less per call in grad mode
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
    num_splits: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over a KV cache, appending ``k``/``v`` to it in place.

    Shapes: ``q`` (B, Sq, Hq, D). Contiguous cache: ``k_cache`` (B_cache, S_cache,
    Hk, D), ``v_cache`` (B_cache, S_cache, Hk, Dv). Paged cache (``block_table``
    int32 (B, max_blocks) given): ``k_cache`` (num_blocks, block_size, Hk, D),
    ``v_cache`` (num_blocks, block_size, Hk, Dv); a sequence's position t lives
    in block ``block_table[b, t // block_size]``, row ``t % block_size``. Hq is a
    multiple of Hk (GQA / MQA). dtypes fp32, fp16, bf16 (q, caches, k, v alike).

    ``k``/``v`` (B, S_new, Hk, D/Dv), optional: written into the cache at
    positions ``cache_seqlens .. cache_seqlens + S_new - 1`` (in place).
    ``cache_seqlens``: int or int32 (B,) - where each sequence's cached keys
    end (absolute cache position); None: the whole cache (then no ``k``/``v``).
    ``cache_batch_idx`` int32 (B,): the cache row of each batch row (contiguous
    cache only). ``cache_leftpad`` int32 (B,): the cache position where each
    sequence starts. Sequence b attends ``cache_seqlens[b] + S_new -
    cache_leftpad[b]`` keys.

    ``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2), q's dtype or
    float32, rotary_dim <= D: rotary embedding of the new keys (at their cache
    positions) and of q (row i at ``cache_seqlens + i`` with causal or a window,
    else every row at ``cache_seqlens``), interleaved pairs (2i, 2i+1) or, with
    ``rotary_interleaved=False``, half-split pairs (i, i + rotary_dim / 2).

    ``causal``, ``window_size = (left, right)`` (-1 unbounded) are aligned
    bottom-right: query row i sits at key i + len_k - Sq. As FlashAttention
    2, a side of the cache's capacity or more is no bound, and without
    causal a left-only window gets the right bound capacity (which cuts keys
    only when Sq > capacity + 1). ``softmax_scale``
    defaults to 1/sqrt(D); ``softcap > 0`` caps the scores. ``alibi_slopes``
    float32 (Hq,) or (B, Hq) on q's device adds ``-slope * |i + len_k - Sq -
    j|`` to the score of query row i and key j (after softcap; len_k the keys
    sequence b attends, j counted from its first), FlashAttention's ALiBi.
    ``num_splits``: split-KV chunks per sequence (0: chosen from the shape).

    Returns out (B, Sq, Hq, Dv), and with ``return_lse`` also the float32
    log-sum-exp (B, Hq, Sq) (-inf for a row that sees no key). Not
    differentiable (inference only): the outputs carry no autograd graph, even
    when inputs require grad, as FlashAttention's.
    """
    if torch.is_grad_enabled() and _any_requires_grad(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin):
        # The op has no autograd formula. Under grad mode torch would attach
        # its fallback node, whose backward gives no gradients at all (with a
        # deprecation warning), while the PyTorch path runs under no_grad; so
        # every path runs without autograd.
        with torch.no_grad():
            return attention_with_kvcache(
                q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                cache_leftpad=cache_leftpad, block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                rotary_interleaved=rotary_interleaved, causal=causal, softmax_scale=softmax_scale,
                window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse,
                num_splits=num_splits,
            )  # fmt: skip
    if (
        _kvcache_fast is not None
        and _backend._state["backend"] != "reference"
        and not torch.compiler.is_compiling()
    ):
        try:
            res = _kvcache_fast(
                q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos,
                rotary_sin, rotary_interleaved, causal, window_size, softcap, softmax_scale, alibi_slopes, return_lse,
                num_splits,
            )  # fmt: skip
        except ValueError as e:  # the op's checks of the metadata values
            raise _as_invalid_argument(e) from None
        if res is not None:
            return res
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InvalidArgumentError(f"{name} must have 4 dims, got shape {tuple(t.shape)}")
    if not q.dtype.is_floating_point:
        raise InvalidArgumentError(f"q.dtype must be a floating-point dtype, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise InvalidArgumentError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise InvalidArgumentError(f"{name}.device must equal q.device ({q.device}), got {t.device}")
    if (k is None) != (v is None):
        raise InvalidArgumentError("k and v must be given together")
    b, sq, hq, d = q.shape
    hk, dv = k_cache.shape[2], v_cache.shape[3]
    if k_cache.shape[3] != d:
        raise InvalidArgumentError(
            f"k_cache.shape[3] (head dim) must equal q.shape[3] ({d}), got {k_cache.shape[3]}"
        )
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise InvalidArgumentError(
            f"v_cache.shape[:3] must equal k_cache.shape[:3] ({tuple(k_cache.shape[:3])}), "
            f"got {tuple(v_cache.shape[:3])}"
        )
    if hk == 0 or hq % hk != 0:
        raise InvalidArgumentError(f"q heads ({hq}) must be a multiple of the cache's kv heads ({hk})")
    if k is not None:
        if k.dim() != 4 or tuple(k.shape) != (b, k.shape[1], hk, d):
            raise InvalidArgumentError(
                f"k must have shape ({b}, seqlen_new, {hk}, {d}) (batch, new keys, kv heads, head dim), "
                f"got {tuple(k.shape)}"
            )
        if v.dim() != 4 or tuple(v.shape) != (b, k.shape[1], hk, dv):
            raise InvalidArgumentError(
                f"v must have shape ({b}, {k.shape[1]}, {hk}, {dv}), got {tuple(v.shape)}"
            )
    paged = block_table is not None
    if paged:
        if (
            not isinstance(block_table, torch.Tensor)
            or block_table.dtype != torch.int32
            or block_table.dim() != 2
        ):
            raise InvalidArgumentError(
                f"block_table must be an int32 tensor of shape ({b}, max_blocks), got "
                f"{getattr(block_table, 'dtype', type(block_table).__name__)} of shape "
                f"{tuple(getattr(block_table, 'shape', ()))}"
            )
        if block_table.shape[0] != b:
            raise InvalidArgumentError(
                f"block_table.shape[0] must equal the batch ({b}), got {block_table.shape[0]}"
            )
        if block_table.device != q.device:
            raise InvalidArgumentError(
                f"block_table.device must equal q.device ({q.device}), got {block_table.device}"
            )
        if cache_batch_idx is not None:
            raise InvalidArgumentError("cache_batch_idx cannot be combined with block_table")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] != b:
            raise InvalidArgumentError(
                f"k_cache.shape[0] ({k_cache.shape[0]}) must equal q.shape[0] (batch, {b}) without cache_batch_idx"
            )
    if cache_seqlens is None:
        if k is not None:
            raise InvalidArgumentError("cache_seqlens must be given when k and v are appended")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(
            f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}"
        )
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    cache_seqlens = _int32_vector(cache_seqlens, "cache_seqlens", b, q.device)
    if cache_batch_idx is not None:
        _int32_vector(cache_batch_idx, "cache_batch_idx", b, q.device)
    if cache_leftpad is not None:
        _int32_vector(cache_leftpad, "cache_leftpad", b, q.device)
    if (rotary_cos is None) != (rotary_sin is None):
        raise InvalidArgumentError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise InvalidArgumentError(
                "rotary_cos / rotary_sin need the new k and v to append (as FlashAttention)"
            )
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if t.dim() != 2 or t.dtype not in (q.dtype, torch.float32) or t.device != q.device:
                raise InvalidArgumentError(
                    f"{name} must be 2-D (seqlen_ro, rotary_dim / 2) of q.dtype or float32 on q.device, got "
                    f"{t.dtype} of shape {tuple(t.shape)} on {t.device}"
                )
        if rotary_sin.shape != rotary_cos.shape or rotary_sin.dtype != rotary_cos.dtype:
            raise InvalidArgumentError("rotary_sin must have rotary_cos's shape and dtype")
        if not 0 < 2 * rotary_cos.shape[1] <= d:
            raise InvalidArgumentError(
                f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} must be in [2, {d}] (the head dim)"
            )
    _check_window_softcap_scale(window_size, softcap, softmax_scale)
    if alibi_slopes is not None:
        _check_alibi_slopes(alibi_slopes, b, hq, q.device)
        alibi_slopes = alibi_slopes.detach().contiguous()
    if not isinstance(num_splits, int) or num_splits < 0:
        raise InvalidArgumentError(f"num_splits must be an int >= 0, got {num_splits!r}")
    # FlashAttention 2's window rules (mha_fwd_kvcache, then set_params_fprop),
    # seqlen_k being the cache's capacity: a side as wide as the cache or wider
    # is no bound (this also decides whether query rows get rotary positions
    # per row); without causal, a left-only window gets the right bound
    # capacity. Row i sits at key i + len_k - Sq, so that bound cuts keys only
    # for the first rows when Sq > capacity + 1 (and is set only then: the
    # mask is the same otherwise).
    wl, wr = (int(w) if 0 <= w < capacity else -1 for w in window_size)
    if causal:
        wr = 0
    elif wl >= 0 and wr < 0 and q.shape[1] > capacity + 1:
        wr = capacity
    scale = float(softmax_scale) if softmax_scale is not None else (1.0 / math.sqrt(d) if d > 0 else 1.0)

    mode = _backend.get_backend()
    reason = None if mode != "reference" else "backend 'reference'"
    if reason is None:
        reason = kvcache_unsupported_reason(q, k_cache, v_cache, rotary_cos, mode)
        if reason is not None and mode == "kernel":
            raise RuntimeError(f"pyfastattn backend 'kernel' cannot run this call: {reason}")
    if reason is None:
        out, lse = call_op(
            torch.ops.pyfastattn.attention_kvcache_fwd,
            _rows_ok(q), k_cache, v_cache, _rows_ok(k), _rows_ok(v),
            cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos, rotary_sin,
            bool(rotary_interleaved), scale, float(softcap), wl, wr, int(num_splits), alibi_slopes,
        )  # fmt: skip
    else:
        if mode != "reference" and not torch.compiler.is_compiling():
            _backend.note_fallback(reason, target="PyTorch (append, gather, then attention)")
        out, lse = _attention_with_kvcache_torch(
            q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos,
            rotary_sin, rotary_interleaved, scale, float(softcap), wl, wr, capacity, return_lse, alibi_slopes,
        )  # fmt: skip
    return (out, lse) if return_lse else out


def _attention_with_kvcache_torch(
    q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos, rotary_sin,
    rotary_interleaved, scale, softcap, wl, wr, capacity, need_lse, alibi_slopes,
):  # fmt: skip
    """The call in PyTorch: the same checks of the metadata values the C++ op
    makes (so that no index runs outside a tensor), the reference's append and
    rotary, then the gathered keys through ``canonical_attention``."""
    s_new = 0 if k is None else k.shape[1]
    if s_new > 0:  # as prepare_kvcache_call (csrc/attention/kvcache_api.cpp) refuses it on the kernel path
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if any(n > 1 and st == 0 for n, st in zip(t.shape, t.stride())):
                raise InvalidArgumentError(
                    f"{name} must not overlap itself to append k / v into it (a dim of size > 1 with stride 0, "
                    f"as expand() makes: several slots would share memory); got shape {tuple(t.shape)} and "
                    f"strides {tuple(t.stride())}. Pass a cache with its own memory (e.g. .contiguous())"
                )
    seqlens = cache_seqlens.tolist()
    lp = [0] * len(seqlens) if cache_leftpad is None else cache_leftpad.tolist()
    for i, (sl, pad) in enumerate(zip(seqlens, lp)):
        if sl < 0 or sl + s_new > capacity:
            raise InvalidArgumentError(
                f"cache_seqlens[{i}] + seqlen_new = {sl} + {s_new} = {sl + s_new} must be in [0, {capacity}] "
                f"(the cache's capacity per sequence)"
            )
        if not 0 <= pad <= sl:
            raise InvalidArgumentError(
                f"cache_leftpad[{i}] must be in [0, cache_seqlens[{i}] = {sl}], got {pad}"
            )
    if cache_batch_idx is not None:
        first: dict[int, int] = {}
        for i, r in enumerate(cache_batch_idx.tolist()):
            if not 0 <= r < k_cache.shape[0]:
                raise InvalidArgumentError(
                    f"cache_batch_idx[{i}] must be in [0, {k_cache.shape[0]}), got {r}"
                )
            if s_new > 0 and r in first:  # as prepare_kvcache_call: two appends into one cache row
                raise InvalidArgumentError(
                    "cache_batch_idx must not repeat a cache row when k / v are appended (two batch rows "
                    f"would write the same cache slots), got cache_batch_idx[{first[r]}] = "
                    f"cache_batch_idx[{i}] = {r}"
                )
            first.setdefault(r, i)
    if block_table is not None:
        bs = k_cache.shape[1]
        table = block_table.tolist()
        for i, row in enumerate(table):
            for blk in range(lp[i] // bs, (seqlens[i] + s_new + bs - 1) // bs):
                if not 0 <= row[blk] < k_cache.shape[0]:
                    raise InvalidArgumentError(
                        f"block_table[{i}, {blk}] must be in [0, {k_cache.shape[0]}) (the number of blocks), "
                        f"got {row[blk]}"
                    )
        if s_new > 0:  # as prepare_kvcache_call: two appended positions in one cache slot
            owner: dict[tuple[int, int], tuple[int, int]] = {}
            for i, row in enumerate(table):
                for t in range(seqlens[i], seqlens[i] + s_new):
                    slot = (row[t // bs], t % bs)
                    if slot in owner:
                        i0, t0 = owner[slot]
                        raise InvalidArgumentError(
                            "block_table must not send two appended positions to one cache slot (two writes to "
                            f"the same block row), got block {slot[0]}, row {slot[1]} for position {t0} of "
                            f"sequence {i0} and position {t} of sequence {i}"
                        )
                    owner[slot] = (i, t)
    if rotary_cos is not None:
        per_row = wl >= 0 or wr >= 0
        need = max((sl + max(s_new, q.shape[1] if per_row else 1) for sl in seqlens), default=0)
        if rotary_cos.shape[0] < need:
            raise InvalidArgumentError(
                f"rotary_cos.shape[0] (seqlen_ro) must be at least {need} (the last position rotated + 1), "
                f"got {rotary_cos.shape[0]}"
            )
    with torch.no_grad():
        if k is not None:
            reference.kvcache_append_(
                k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=cache_batch_idx, block_table=block_table,
                rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
            )  # fmt: skip
        if rotary_cos is not None:
            pos = reference.kvcache_query_positions(cache_seqlens, q.shape[1], wl >= 0 or wr >= 0)
            q = reference.apply_rotary(q, rotary_cos, rotary_sin, pos, rotary_interleaved)
        len_k = cache_seqlens.long() + s_new - (0 if cache_leftpad is None else cache_leftpad.long())
        kk, vv = reference.kvcache_gather(
            k_cache, v_cache, len_k, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
            block_table=block_table,
        )  # fmt: skip
        res = canonical_attention(
            q, kk, vv, seqused_k=len_k.to(torch.int32), scale=scale, softcap=softcap, window_left=wl,
            window_right=wr, bottom_right=True, return_lse=need_lse, alibi_slopes=alibi_slopes,
        )  # fmt: skip
    return res if need_lse else (res, None)
