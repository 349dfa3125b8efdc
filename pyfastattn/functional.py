"""Public attention functions.

Both APIs validate their arguments once, here, then meet in one canonical form
(``(B, S, H, D)`` views with strides plus a mask description; see
``csrc/attention/params.h``), pick the backend once (``pyfastattn._backend``),
and run either ``torch.ops.pyfastattn.attention_fwd`` or ``reference.attention``.
"""

from __future__ import annotations

import math

import torch

from . import _backend, _ops, reference

__all__ = ["scaled_dot_product_attention", "attention", "kernel_unsupported_reason"]

_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16),
}
_CUDA_MAX_HEAD_DIM = 256

# Devices (by CUDA capability) on which the CUDA forward kernel passed
# scripts/gpu_check.sh. Until a device is listed, backend "auto" uses the
# reference there and backend "kernel" runs the unverified kernel on request.
CUDA_VERIFIED_CAPABILITIES: tuple[tuple[int, int], ...] = ()


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def kernel_unsupported_reason(
    q: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    mode: str | None = None,
) -> str | None:
    """Why the fused kernel can't run this call (``None`` when it can).

    ``q``/``v`` are canonical ``(..., H, D)`` tensors; ``mode`` is the backend
    (default: the current one).
    """
    mode = mode or _backend.get_backend()
    if not _ops.AVAILABLE:
        return f"the compiled extension pyfastattn._C could not be imported ({_ops.EXTENSION_ERROR})"
    dev = q.device.type
    if dev not in _KERNEL_DTYPES:
        return f"there is no kernel for device type {dev!r}"
    if not _ops.has_kernel("attention_fwd", dev):
        return f"pyfastattn was built without {dev.upper()} kernels (see python -m pyfastattn.info)"
    if q.dtype not in _KERNEL_DTYPES[dev]:
        return f"the {dev.upper()} kernel has no {q.dtype} variant (supported: {_KERNEL_DTYPES[dev]})"
    if dropout_p > 0:
        return "dropout is not fused into the kernel"
    grad = torch.is_grad_enabled()
    if attn_mask is not None and attn_mask.requires_grad and grad:
        return "a gradient for attn_mask was requested (the kernel treats the mask as a constant)"
    if dev == "cuda":
        d, dv = q.shape[-1], v.shape[-1]
        if d != dv or d > _CUDA_MAX_HEAD_DIM:
            return f"the CUDA kernel needs head_dim == head_dim_v <= {_CUDA_MAX_HEAD_DIM}, got {d} and {dv}"
        cap = torch.cuda.get_device_capability(q.device)
        if cap < (8, 0):
            return f"the CUDA kernel needs compute capability >= 8.0, got {cap[0]}.{cap[1]}"
        if mode == "auto" and cap not in CUDA_VERIFIED_CAPABILITIES:
            return (
                f"the CUDA kernel is not yet verified on hardware of capability {cap[0]}.{cap[1]} "
                "(use backend 'kernel' to run it anyway)"
            )
    return None


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical form in, ``(out, lse)`` out, through the chosen backend."""
    mode = _backend.get_backend()
    reason = None if mode == "reference" else kernel_unsupported_reason(q, v, attn_mask, dropout_p, mode)

    def run_reference() -> tuple[torch.Tensor, torch.Tensor]:
        return reference.attention(
            q,
            k,
            v,
            scale=scale,
            attn_mask=attn_mask,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            seqused_k=seqused_k,
            softcap=softcap,
            window_left=window_left,
            window_right=window_right,
            bottom_right=bottom_right,
            dropout_p=dropout_p,
        )

    if mode == "reference" or reason is not None:
        if mode == "kernel":
            raise RuntimeError(f"pyfastattn backend 'kernel' cannot run this call: {reason}")
        if reason is not None and not _is_compiling():
            _backend.note_fallback(reason)
        return run_reference()
    qk, kk, vk = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    args = (qk, kk, vk, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
            scale, softcap, window_left, window_right, bottom_right)  # fmt: skip
    if mode == "kernel" or q.device.type != "cuda" or _is_compiling():
        return torch.ops.pyfastattn.attention_fwd(*args)
    # auto on CUDA: the kernel itself declines what only the device can tell
    # (shared memory per block, a kernel image for this GPU) with "does not
    # support this case: <reason>"; that falls back like the checks above, as
    # the backward does (_ops._kernel_backward). Any other error propagates.
    try:
        return torch.ops.pyfastattn.attention_fwd(*args)
    except RuntimeError as e:
        if "does not support this case" not in str(e):
            raise
        _backend.note_fallback(str(e).split("does not support this case: ", 1)[-1])
        return run_reference()


# ---------------------------------------------------------------------------
# validation helpers: every message names the argument, the expected and the
# actual value
# ---------------------------------------------------------------------------


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_same_dtype_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise ValueError(f"{name}.dtype must equal {ref_name}.dtype ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}.device must equal {ref_name}.device ({ref.device}), got {t.device}")


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name}.dtype must be a floating-point dtype, got {t.dtype}")


def _check_scale(scale, name: str) -> None:
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"{name} must be a finite number, got {scale}")


def _check_varlen(
    cu: torch.Tensor, name: str, total: int, max_seqlen: int | None, max_name: str, device
) -> int:
    """Checks a cu_seqlens tensor; returns the longest sequence. Reads values
    (a device sync on CUDA) except while torch.compile traces; the C++ op
    re-checks the values in every case before a kernel reads memory."""
    _check_tensor(cu, name)
    if cu.dtype != torch.int32:
        raise ValueError(f"{name}.dtype must be torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 1 elements, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}.device must equal q.device ({device}), got {cu.device}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if _is_compiling():
        if max_seqlen is None:
            raise ValueError(f"{max_name} must be given under torch.compile")
        return max_seqlen
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    for i, n in enumerate(lens):
        if n < 0:
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{i + 1}] = {vals[i + 1]} < {vals[i]}"
            )
    if vals[-1] > total:
        raise ValueError(f"{name}[-1] = {vals[-1]} runs past the packed tensor's {total} rows")
    longest = max(lens, default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence ({longest})")
    return longest if max_seqlen is None else max_seqlen


def _canonical_mask(
    attn_mask: torch.Tensor, q: torch.Tensor, batch: tuple[int, ...], hq: int, lq: int, sk: int
) -> torch.Tensor:
    """SDPA mask (broadcastable to (*batch, hq, lq, sk)) -> (B|1, hq|1, lq|1, sk)
    with a contiguous last dim; size-1 dims stay size 1 (broadcast stride 0)."""
    _check_tensor(attn_mask, "attn_mask")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise ValueError(
            f"attn_mask.dtype must be torch.bool or query.dtype ({q.dtype}), got {attn_mask.dtype}"
        )
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask.device must equal query.device ({q.device}), got {attn_mask.device}")
    full = (*batch, hq, lq, sk)
    if attn_mask.dim() > len(full):
        raise ValueError(
            f"attn_mask must have at most {len(full)} dims (broadcastable to {full}), "
            f"got shape {tuple(attn_mask.shape)}"
        )
    m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
    for i, (got, want) in enumerate(zip(m.shape, full)):
        if got != want and got != 1:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to {full} "
                f"(dim {i - len(full)}: {got} vs {want})"
            )
    lead = m.shape[:-3]
    b = math.prod(batch)
    if all(d == 1 for d in lead):
        m = m.reshape(1, *m.shape[-3:])
    else:
        m = m.expand(*batch, *m.shape[-3:]).reshape(b, *m.shape[-3:])
    if m.shape[-1] != sk or m.stride(-1) != 1:
        m = m.expand(*m.shape[:-1], sk).contiguous()
    return m


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes: ``query`` (..., Hq, L, E), ``key`` (..., Hk, S, E), ``value``
    (..., Hk, S, Ev) -> output (..., Hq, L, Ev), in the input dtype. Leading
    dims broadcast. ``attn_mask`` is bool (True = attend) or a float of
    ``query.dtype`` that is added, broadcastable to (..., Hq, L, S).
    ``is_causal`` is top-left aligned and cannot be combined with
    ``attn_mask``. ``enable_gqa`` lets Hq be a multiple of Hk. ``scale``
    defaults to 1/sqrt(E). ``dropout_p`` is applied as in torch (always, when
    > 0) and runs on the reference path.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(t, name)
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., L, E), got {t.dim()}")
    _check_dtype(query, "query")
    _check_same_dtype_device(query, "query", key=key, value=value)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    _check_scale(scale, "scale")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot both be given (the mask would be ignored)")
    unbatched_heads = query.dim() == 2
    if unbatched_heads:  # (L, E): one head, no batch
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    lq, e = query.shape[-2:]
    sk, ek = key.shape[-2:]
    sv, ev = value.shape[-2:]
    if ek != e:
        raise ValueError(f"key.shape[-1] must equal query.shape[-1] ({e}), got {ek}")
    if sv != sk:
        raise ValueError(f"value.shape[-2] must equal key.shape[-2] ({sk}), got {sv}")
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hv != hk:
        raise ValueError(f"value heads (shape[-3]) must equal key heads ({hk}), got {hv}")
    if enable_gqa:
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"with enable_gqa, query heads ({hq}) must be a multiple of key heads ({hk})")
    elif hk != hq and hk != 1:
        raise ValueError(
            f"key heads (shape[-3]) must equal query heads ({hq}) or be 1 "
            f"(pass enable_gqa=True for grouped-query attention), got {hk}"
        )
    try:
        batch = tuple(torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3]))
    except RuntimeError:
        raise ValueError(
            f"batch dims of query {tuple(query.shape[:-3])}, key {tuple(key.shape[:-3])} "
            f"and value {tuple(value.shape[:-3])} do not broadcast"
        ) from None
    hk_eff = hk if enable_gqa else hq

    def canon(t: torch.Tensor, h: int) -> torch.Tensor:  # (..., H, S, D) -> (B, S, H, D) view
        t = t.expand(*batch, h, *t.shape[-2:])
        return t.reshape(-1, h, *t.shape[-2:]).transpose(1, 2)

    q = canon(query, hq)
    k = canon(key, hk_eff)
    v = canon(value, hk_eff)
    mask = None if attn_mask is None else _canonical_mask(attn_mask, query, batch, hq, lq, sk)
    out, _ = _run(
        q,
        k,
        v,
        attn_mask=mask,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        seqused_k=None,
        max_seqlen_q=lq,
        max_seqlen_k=sk,
        scale=1.0 / math.sqrt(e) if scale is None else float(scale),
        softcap=0.0,
        window_left=-1,
        window_right=0 if is_causal else -1,
        bottom_right=False,
        dropout_p=dropout_p,
    )
    out = out.transpose(1, 2).reshape(*batch, hq, lq, ev)
    return out.squeeze(0) if unbatched_heads else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_k: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Native (FlashAttention-style) attention.

    Dense: ``q`` (B, Sq, Hq, D), ``k`` (B, Sk, Hk, D), ``v`` (B, Sk, Hk, Dv) ->
    out (B, Sq, Hq, Dv). Varlen: ``q`` (total_q, Hq, D), ``k``/``v``
    (total_k, Hk, *) packed, with int32 ``cu_seqlens_q``/``cu_seqlens_k`` of
    length B + 1 -> out (total_q, Hq, Dv). Hq must be a multiple of Hk
    (GQA/MQA). When Sq != Sk, ``causal`` and ``window_size`` are aligned
    bottom-right (query i sits at key position i + Sk - Sq, the KV-cache
    convention). ``window_size = (left, right)``, -1 meaning unbounded;
    ``causal`` sets right to 0. ``softcap > 0`` applies
    ``softcap * tanh(scores / softcap)``. ``seqused_k`` (int32, [B]) gives
    each sequence's real key length (a key-padding mask without a dense mask).
    With ``return_lse`` also returns the log-sum-exp of the scaled scores,
    float32, (B, Hq, Sq) or (Hq, total_q); -inf for rows that see no key.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name)
    _check_dtype(q, "q")
    _check_same_dtype_device(q, "q", k=k, v=v)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    rank = 3 if varlen else 4
    layout = "(total, H, D) with cu_seqlens" if varlen else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims {layout}, got {t.dim()} (shape {tuple(t.shape)})")
    hq, d = q.shape[-2:]
    hk, dk = k.shape[-2:]
    hv = v.shape[-2]
    if dk != d:
        raise ValueError(f"k.shape[-1] must equal q.shape[-1] ({d}), got {dk}")
    if hv != hk:
        raise ValueError(f"v.shape[-2] (heads) must equal k.shape[-2] ({hk}), got {hv}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k heads ({hk})")
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got q {d} and v {v.shape[-1]}")
    if v.shape[:-2] != k.shape[:-2]:
        raise ValueError(
            f"v.shape[:-2] must equal k.shape[:-2] ({tuple(k.shape[:-2])}), got {tuple(v.shape[:-2])}"
        )
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k.shape[0] (batch) must equal q.shape[0] ({q.shape[0]}), got {k.shape[0]}")
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) for w in window_size)
    ):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    _check_scale(softmax_scale, "softmax_scale")
    if varlen:
        max_seqlen_q = _check_varlen(
            cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q", q.device
        )
        max_seqlen_k = _check_varlen(
            cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k", q.device
        )
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            raise ValueError(
                f"cu_seqlens_k must have {cu_seqlens_q.numel()} elements like cu_seqlens_q, "
                f"got {cu_seqlens_k.numel()}"
            )
        batch = cu_seqlens_q.numel() - 1
    else:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
        batch = q.shape[0]
    if seqused_k is not None:
        _check_tensor(seqused_k, "seqused_k")
        if seqused_k.dtype != torch.int32 or seqused_k.shape != (batch,):
            raise ValueError(
                f"seqused_k must be int32 of shape ({batch},), got {seqused_k.dtype} "
                f"of shape {tuple(seqused_k.shape)}"
            )
        if seqused_k.device != q.device:
            raise ValueError(f"seqused_k.device must equal q.device ({q.device}), got {seqused_k.device}")
        if not _is_compiling() and seqused_k.numel() > 0:
            if varlen:
                avail = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
            else:
                avail = [k.shape[1]] * batch
            for i, (u, a) in enumerate(zip(seqused_k.tolist(), avail)):
                if not 0 <= u <= a:
                    raise ValueError(f"seqused_k[{i}] = {u} must be in [0, {a}]")
    wl, wr = int(window_size[0]), int(window_size[1])
    if causal:
        wr = 0
    out, lse = _run(
        q,
        k,
        v,
        attn_mask=None,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        scale=1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale),
        softcap=float(softcap),
        window_left=wl if wl >= 0 else -1,
        window_right=wr if wr >= 0 else -1,
        bottom_right=True,
        dropout_p=0.0,
    )
    return (out, lse) if return_lse else out
