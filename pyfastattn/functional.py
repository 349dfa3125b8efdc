"""Public attention functions.

Both APIs validate their arguments once, here, then meet in one canonical form
(``(B, S, H, D)`` views with strides plus a mask description; see
``csrc/attention/params.h``), pick the path once (:func:`decide_path`, under
the backend of ``pyfastattn._backend``), and run ``torch.ops.pyfastattn.attention_fwd``,
torch's own ``scaled_dot_product_attention`` (backend ``auto``, where the kernel
can't run and SDPA expresses the call exactly) or ``reference.attention``.
"""

from __future__ import annotations

import math

import torch

from . import _backend, _ops, reference

# torch's own SDPA, bound at import: every fallback to torch calls it, so that
# pyfastattn.override_sdpa (which replaces F.scaled_dot_product_attention)
# never routes a fallback back to pyfastattn.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention

__all__ = [
    "scaled_dot_product_attention",
    "attention",
    "canonical_attention",
    "InvalidArgumentError",
    "kernel_unsupported_reason",
    "sdpa_unsupported_reason",
    "decide_path",
    "dropout_mask",
    "draw_dropout_rng",
]

_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16),
}
_CUDA_MAX_HEAD_DIM = 256

# The small-call fast path (csrc/attention/fast_call.cpp): one C++ pass that
# makes this module's checks for plain dense CPU tensors and calls the op with
# unboxed arguments, below the Autograd key when nothing needs a gradient. It
# returns None for anything else (and for anything invalid), and the Python
# path below runs as before. Not while torch.compile traces (dynamo traces
# the Python path and the op), nor under backend "reference".
_attention_fast = getattr(_ops._C, "attention_fast", None)
_sdpa_fast = getattr(_ops._C, "sdpa_fast", None)

# Devices (by CUDA capability) on which the CUDA forward kernel passed
# scripts/gpu_check.sh. Until a device is listed, backend "auto" runs torch's
# own scaled_dot_product_attention there (or the reference for what SDPA
# cannot express), and backend "kernel" runs the unverified kernel on request.
CUDA_VERIFIED_CAPABILITIES: tuple[tuple[int, int], ...] = ()


class InvalidArgumentError(RuntimeError, ValueError):
    """An argument pyfastattn cannot accept (the message names it, with the
    expected and the actual value).

    A ``RuntimeError``, as torch's ``scaled_dot_product_attention`` raises for
    the same inputs, and a ``ValueError``, as pyfastattn raised before, so that
    code catching either keeps working."""


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _as_invalid_argument(e: ValueError) -> InvalidArgumentError:
    """The ValueError of a compiled op's argument check (TORCH_CHECK_VALUE:
    metadata values the C++ layer reads, e.g. cache_seqlens past a cache's
    capacity) as the InvalidArgumentError that the Python checks raise, so
    that every invalid argument is a RuntimeError, as documented."""
    return e if isinstance(e, InvalidArgumentError) else InvalidArgumentError(str(e))


def call_op(op, *args):
    """``op(*args)`` with its argument errors raised as :class:`InvalidArgumentError`."""
    if _is_compiling():
        return op(*args)
    try:
        return op(*args)
    except ValueError as e:
        raise _as_invalid_argument(e) from None


def cuda_unverified_reason(capability: tuple[int, int]) -> str | None:
    """Why backend ``auto`` does not run the CUDA kernel on a GPU of this
    compute capability (``None`` once it is verified there)."""
    if tuple(capability) in CUDA_VERIFIED_CAPABILITIES:
        return None
    return (
        f"the CUDA kernel is not yet verified on hardware of capability {capability[0]}.{capability[1]} "
        "(use backend 'kernel' to run it anyway)"
    )


def kernel_unsupported_reason(
    q: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    mode: str | None = None,
    alibi_slopes: torch.Tensor | None = None,
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
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype):
        return (
            f"the kernel adds attn_mask in the input dtype, and this {attn_mask.dtype} mask has values "
            f"that {q.dtype} cannot hold exactly"
        )
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
        if mode == "auto":
            return cuda_unverified_reason(cap)
    return None


# torch's SDPA takes enable_gqa from 2.5 on, and from then on gives 0 (not
# NaN) for a query row whose keys are all masked, as pyfastattn does.
_SDPA_ROUTE_MIN_TORCH = (2, 5)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def sdpa_unsupported_reason(
    *,
    softcap: float,
    need_lse: bool,
    varlen: bool,
    alibi_dtype: torch.dtype | None = None,
    need_dropout_mask: bool = False,
    dropout_dtype: torch.dtype | None = None,
) -> str | None:
    """Why torch's own ``scaled_dot_product_attention`` cannot compute this
    canonical call exactly (``None`` when it can). Everything else of the
    canonical form (top-left or bottom-right causal, windows, key lengths,
    bool or float masks, GQA, scale, dropout with torch's own RNG) maps onto
    SDPA's arguments; ALiBi (``alibi_dtype``: the query dtype when slopes are
    given) becomes a float32 bias mask. ``dropout_dtype``: the query dtype
    when dropout_p > 0; float64 dropout stays off SDPA (see below)."""
    if _torch_version() < _SDPA_ROUTE_MIN_TORCH:
        return f"torch {torch.__version__} is older than 2.5 (no enable_gqa in its SDPA)"
    if softcap > 0:
        return "torch's SDPA has no softcap"
    if alibi_dtype is not None and alibi_dtype != torch.float32:
        return f"torch's SDPA takes ALiBi only as a {alibi_dtype} bias mask, which rounds the ALiBi terms"
    if need_dropout_mask:
        return "torch's SDPA does not return its dropout pattern"
    if dropout_dtype == torch.float64:
        # float64 never runs on the kernel, and SDPA runs it on its math path
        # (no faster than the reference). Its dropout pattern is torch's, not
        # the Philox pattern the kernels and the reference share: the same
        # seed dropped other weights in float64 than in float32, and other
        # ones again when the LSE was asked for (which goes to the reference).
        return "torch's SDPA drops other weights than pyfastattn's dropout (float64 gains nothing there)"
    if need_lse:
        return "torch's SDPA does not return the log-sum-exp"
    if varlen and _is_compiling():
        return "varlen under torch.compile (the per-sequence split reads cu_seqlens on the host)"
    return None


def decide_path(kernel_reason: str | None, sdpa_reason: str | None, mode: str) -> tuple[str, str | None]:
    """The backend rule, written once: ``("kernel" | "sdpa" | "reference", why)``.

    ``reference`` mode always takes the reference; ``kernel`` mode takes the
    kernel or raises with ``kernel_reason``; ``auto`` takes the kernel where it
    can run (on CUDA: only on verified hardware), otherwise torch's own SDPA
    where that expresses the call exactly, otherwise the reference. ``why`` is
    the reason the kernel was not taken (``None`` when it was)."""
    if mode == "reference":
        return "reference", None
    if kernel_reason is None:
        return "kernel", None
    if mode == "kernel":
        raise RuntimeError(f"pyfastattn backend 'kernel' cannot run this call: {kernel_reason}")
    if sdpa_reason is None:
        return "sdpa", kernel_reason
    return "reference", f"{kernel_reason}, and {sdpa_reason}"


def auto_path(
    device: torch.device | str, dtype: torch.dtype, *, head_dim: int = 64
) -> tuple[str, str | None]:
    """Which path backend ``auto`` takes for a plain forward call (no mask, no
    softcap, no LSE) on ``device`` in ``dtype``: ``(path, why)`` as in
    :func:`decide_path`. For ``python -m pyfastattn.info`` and the
    :func:`pyfastattn.patch` report."""
    q = torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype)
    kernel_reason = kernel_unsupported_reason(q, q, mode="auto")
    sdpa_reason = (
        sdpa_unsupported_reason(softcap=0.0, need_lse=False, varlen=False) if kernel_reason else None
    )
    return decide_path(kernel_reason, sdpa_reason, "auto")


def describe_path(path: str, why: str | None) -> str:
    names = {
        "kernel": "fused kernel",
        "sdpa": "torch's scaled_dot_product_attention",
        "reference": "reference",
    }
    return names[path] + (f" ({why})" if why else "")


def draw_dropout_rng(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The (seed, offset) pair of one dropout call: int64 [2], drawn by one
    torch random op (``randint``, 62 bits each) from ``generator`` or the default generator
    of ``device``. So the generator advances as for any torch random op,
    ``torch.manual_seed`` makes the pattern reproducible, and torch.compile
    traces it as a random op (no graph break)."""
    kw = {} if generator is None else {"generator": generator}  # dynamo traces randint without one
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, **kw)


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
    need_lse: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    dropout_rng: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    need_dropout_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canonical form in, ``(out, lse)`` out, through the chosen backend.
    ``lse`` is ``None`` when ``need_lse`` is false and torch's SDPA ran.

    Dropout on the kernel and reference paths drops the elements of the
    Philox keep function (csrc/attention/dropout.h) for ``dropout_rng`` (int64
    [2], seed and offset), drawn from ``generator`` (default: torch's default
    generator of q's device) when not given; torch's SDPA route uses torch's
    own dropout."""
    mode = _backend.get_backend()
    common = dict(
        attn_mask=attn_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
        softcap=softcap, window_left=window_left, window_right=window_right, bottom_right=bottom_right,
    )  # fmt: skip

    drawn: list[torch.Tensor] = [] if dropout_rng is None else [dropout_rng]

    def rng() -> torch.Tensor | None:  # drawn once, on first use (never on the SDPA route)
        if dropout_p <= 0:
            return None
        if not drawn:
            drawn.append(draw_dropout_rng(q.device, generator))
        return drawn[0]

    def run_reference() -> tuple[torch.Tensor, torch.Tensor]:
        return reference.attention(
            q, k, v, scale=scale, dropout_p=dropout_p, dropout_rng=rng(), alibi_slopes=alibi_slopes, **common
        )

    # Nothing to compute (an empty batch, head, sequence or head dim): the
    # reference gives torch's answer (empty, zeros for no keys, the mean of v
    # for d = 0) with the right autograd graph, at no cost worth a kernel.
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return run_reference()
    if q.device.type == "meta" and _ops.AVAILABLE and mode != "reference":
        # Shapes only (e.g. a model built under torch.device("meta") for FSDP2):
        # the op's fake implementation gives the kernel's shapes and layout.
        return call_op(
            torch.ops.pyfastattn.attention_fwd,
            q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
            scale, softcap, window_left, window_right, bottom_right, dropout_p, rng(), alibi_slopes,
        )  # fmt: skip
    if mode == "reference":
        return run_reference()
    kernel_reason = kernel_unsupported_reason(q, v, attn_mask, dropout_p, mode, alibi_slopes)
    sdpa_reason = None
    if kernel_reason is not None and mode == "auto":
        sdpa_reason = sdpa_unsupported_reason(
            softcap=softcap, need_lse=need_lse, varlen=cu_seqlens_q is not None,
            alibi_dtype=None if alibi_slopes is None else q.dtype, need_dropout_mask=need_dropout_mask,
            dropout_dtype=q.dtype if dropout_p > 0 else None,
        )  # fmt: skip
    path, why = decide_path(kernel_reason, sdpa_reason, mode)
    if path == "sdpa":
        if not _is_compiling():
            _backend.note_fallback(why, target="torch's scaled_dot_product_attention")
        return _sdpa_route(
            q, k, v, scale=scale, dropout_p=dropout_p, alibi_slopes=alibi_slopes, **common
        ), None
    if path == "reference":
        if not _is_compiling():
            _backend.note_fallback(why)
        return run_reference()
    qk, kk, vk = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    args = (qk, kk, vk, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
            scale, softcap, window_left, window_right, bottom_right)  # fmt: skip
    if dropout_p > 0 or alibi_slopes is not None:  # appended op arguments (issue 17)
        args = (*args, dropout_p, rng(), alibi_slopes)
    if mode == "kernel" or q.device.type != "cuda" or _is_compiling():
        return call_op(torch.ops.pyfastattn.attention_fwd, *args)
    # auto on CUDA: the kernel itself declines what only the device can tell
    # (shared memory per block, a kernel image for this GPU) with "does not
    # support this case: <reason>"; that falls back like the checks above, as
    # the backward does (_ops._kernel_backward). Any other error propagates.
    try:
        return call_op(torch.ops.pyfastattn.attention_fwd, *args)
    except InvalidArgumentError:
        raise
    except RuntimeError as e:
        if "does not support this case" not in str(e):
            raise
        _backend.note_fallback(str(e).split("does not support this case: ", 1)[-1])
        return run_reference()


def _sdpa_route(
    q, k, v, *, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k, softcap, window_left, window_right,
    bottom_right, scale, dropout_p, alibi_slopes=None,
) -> torch.Tensor:  # fmt: skip
    """The canonical call through ``torch.nn.functional.scaled_dot_product_attention``
    (torch picks its flash, memory-efficient, cuDNN or CPU backend). Varlen runs
    per sequence. ``softcap`` must be 0 (see :func:`sdpa_unsupported_reason`)."""
    assert softcap == 0, "softcap is not expressible in torch's SDPA"
    if cu_seqlens_q is None:
        return _sdpa_dense(
            q, k, v, attn_mask, seqused_k, scale, window_left, window_right, bottom_right, dropout_p,
            alibi_slopes,
        )  # fmt: skip
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    outs = []
    for i in range(len(cq) - 1):
        qs, ks, vs = q[cq[i] : cq[i + 1]], k[ck[i] : ck[i + 1]], v[ck[i] : ck[i + 1]]
        if qs.shape[0] == 0 or ks.shape[0] == 0 or (used is not None and used[i] == 0):
            outs.append(q.new_zeros(qs.shape[0], q.shape[1], v.shape[2]))  # no rows, or no keys
            continue
        lens = None if used is None else seqused_k[i : i + 1]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[i]
        o = _sdpa_dense(qs[None], ks[None], vs[None], None, lens, scale, window_left, window_right, bottom_right,
                        dropout_p, slopes)  # fmt: skip
        outs.append(o[0])
    outs.append(q.new_zeros(q.shape[0] - cq[-1], q.shape[1], v.shape[2]))
    return torch.cat(outs, 0)


def _sdpa_dense(
    q,
    k,
    v,
    attn_mask,
    seqused_k,
    scale,
    window_left,
    window_right,
    bottom_right,
    dropout_p,
    alibi_slopes=None,
):
    """Dense canonical (B, S, H, D) views through torch's SDPA. Top-left causal
    becomes ``is_causal``; bottom-right causal with Sq <= Sk becomes torch's
    ``causal_lower_right`` bias (flash / memory-efficient on CUDA); windows,
    key lengths and Sq > Sk become one bool mask (broadcast over heads), merged
    with ``attn_mask``. Rows that see no key give 0, as everywhere in pyfastattn."""
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if seqused_k is not None:  # keys past the lengths may hold NaN: never let them reach p @ v
        k, v = reference.zero_keys_past_lengths(k, v, seqused_k)
    causal = window_right == 0 and window_left < 0
    plain_causal = causal and (not bottom_right or sq == sk)
    is_causal = False
    mask = attn_mask
    dead_rows = None
    if alibi_slopes is not None:  # ALiBi as a float bias (fp32 only, see sdpa_unsupported_reason)
        len_k = torch.full((1,), sk, dtype=torch.int64, device=q.device)
        if seqused_k is not None:
            len_k = seqused_k.to(torch.int64)
        bias = reference.alibi_bias(alibi_slopes, sq, sk, len_k, q.dtype)
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = mask + bias
    if seqused_k is None and window_left < 0 and window_right < 0:
        pass
    elif seqused_k is None and plain_causal and mask is None:
        is_causal = True
    elif (
        seqused_k is None and causal and bottom_right and sq < sk and mask is None and hk == hq and q.is_cuda
    ):
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(sq, sk)
    else:
        if seqused_k is None:
            len_k = torch.full((1,), sk, dtype=torch.int64, device=q.device)
        else:
            len_k = seqused_k.to(torch.int64)
        vis = reference._visible(sq, sk, len_k, window_left, window_right, bottom_right, q.device)
        if mask is None:
            mask = vis
        elif mask.dtype == torch.bool:
            mask = mask & vis
        else:
            mask = mask.masked_fill(~vis, float("-inf"))
        dead_rows = ~vis.any(-1, keepdim=True)  # (B|1, 1, sq, 1)
    out = _torch_sdpa(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p,
        is_causal=is_causal, scale=scale, enable_gqa=bool(hk != hq),  # (a traced size is a tensor)
    )  # fmt: skip
    if dead_rows is not None:
        out = out.masked_fill(dead_rows, 0.0)
    return out.transpose(1, 2)


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
            raise InvalidArgumentError(
                f"{name}.dtype must equal {ref_name}.dtype ({ref.dtype}), got {t.dtype}"
            )
        if t.device != ref.device:
            raise InvalidArgumentError(
                f"{name}.device must equal {ref_name}.device ({ref.device}), got {t.device}"
            )


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if not t.dtype.is_floating_point:
        raise InvalidArgumentError(f"{name}.dtype must be a floating-point dtype, got {t.dtype}")


def _check_number(x, name: str) -> float:
    """``float(x)`` of a real number (int, float, a numpy or 0-d tensor
    scalar); a bool, a string or anything float() refuses is an error naming
    the argument (not float()'s bare TypeError / ValueError)."""
    if not isinstance(x, (bool, str, bytes)):
        try:
            return float(x)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise InvalidArgumentError(f"{name} must be a real number (int or float), got {type(x).__name__} {x!r}")


def _torch_float(x, name: str) -> float:
    """``float(x)`` as torch's argument parser takes a float argument (the
    SDPA drop-in's dropout_p and scale): any real number, a bool too; anything
    else is a TypeError, as torch raises, here naming the argument."""
    if not isinstance(x, (str, bytes)):
        try:
            return float(x)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a float, got {type(x).__name__} {x!r}")


def _check_scale(scale, name: str) -> None:
    if scale is not None and not math.isfinite(_check_number(scale, name)):
        raise InvalidArgumentError(f"{name} must be a finite number, got {scale}")


def _check_window_softcap_scale(window_size, softcap: float, softmax_scale) -> None:
    """The native API's window_size, softcap and softmax_scale (shared by
    ``attention`` and ``attention_with_kvcache``)."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) for w in window_size)
    ):
        raise InvalidArgumentError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if not (_check_number(softcap, "softcap") >= 0 and math.isfinite(softcap)):
        raise InvalidArgumentError(f"softcap must be a finite number >= 0, got {softcap}")
    _check_scale(softmax_scale, "softmax_scale")


def _check_varlen(
    cu: torch.Tensor, name: str, total: int, max_seqlen: int | None, max_name: str, device
) -> int:
    """Checks a cu_seqlens tensor; returns the longest sequence. Reads values
    (a device sync on CUDA) except while torch.compile traces; the C++ op
    re-checks the values in every case before a kernel reads memory."""
    _check_tensor(cu, name)
    if cu.dtype != torch.int32:
        raise InvalidArgumentError(f"{name}.dtype must be torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise InvalidArgumentError(
            f"{name} must be 1-D with batch + 1 >= 1 elements, got shape {tuple(cu.shape)}"
        )
    if cu.device != device:
        raise InvalidArgumentError(f"{name}.device must equal q.device ({device}), got {cu.device}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise InvalidArgumentError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if _is_compiling():
        if max_seqlen is None:
            raise InvalidArgumentError(f"{max_name} must be given under torch.compile")
        return max_seqlen
    vals = cu.tolist()
    if vals[0] != 0:
        raise InvalidArgumentError(f"{name}[0] must be 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    for i, n in enumerate(lens):
        if n < 0:
            raise InvalidArgumentError(
                f"{name} must be non-decreasing, got {name}[{i + 1}] = {vals[i + 1]} < {vals[i]}"
            )
    if vals[-1] > total:
        raise InvalidArgumentError(f"{name}[-1] = {vals[-1]} runs past the packed tensor's {total} rows")
    longest = max(lens, default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise InvalidArgumentError(
            f"{max_name} ({max_seqlen}) is smaller than the longest sequence ({longest})"
        )
    return longest if max_seqlen is None else max_seqlen


def _canonical_mask(
    attn_mask: torch.Tensor, q: torch.Tensor, batch: tuple[int, ...], hq: int, lq: int, sk: int
) -> torch.Tensor:
    """SDPA mask (broadcastable to (*batch, hq, lq, sk)) -> (B|1, hq|1, lq|1, sk)
    with a contiguous last dim; size-1 dims stay size 1 (broadcast stride 0)."""
    _check_tensor(attn_mask, "attn_mask")
    if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise InvalidArgumentError(
            f"attn_mask.dtype must be torch.bool, torch.float32 or query.dtype ({q.dtype}), "
            f"got {attn_mask.dtype}"
        )
    if attn_mask.layout != torch.strided:  # e.g. a sparse mask: densified, as torch's math path does
        attn_mask = attn_mask.to_dense()
    if attn_mask.device != q.device:
        raise InvalidArgumentError(
            f"attn_mask.device must equal query.device ({q.device}), got {attn_mask.device}"
        )
    full = (*batch, hq, lq, sk)
    if attn_mask.dim() > len(full):
        raise InvalidArgumentError(
            f"attn_mask must have at most {len(full)} dims (broadcastable to {full}), "
            f"got shape {tuple(attn_mask.shape)}"
        )
    m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
    for i, (got, want) in enumerate(zip(m.shape, full)):
        if got != want and got != 1:
            raise InvalidArgumentError(
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
    if m.dtype == torch.float32 != q.dtype and not _is_compiling() and not torch.jit.is_tracing():
        # torch adds a float32 mask to bf16/fp16 scores in float32. The kernel
        # adds masks in the input dtype: exact when every value survives the
        # cast (0 / -inf padding and causal masks, the common case); any other
        # float32 mask stays float32 and the call runs where it is added exactly.
        # (Not while compiling or tracing: the test reads the values, and a
        # trace would record the cast its example mask allowed for every
        # later mask.)
        low = m.to(q.dtype)
        if torch.equal(low.to(torch.float32), m):
            m = low
    return m


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def _causal_bias_alignment(attn_mask) -> str | None:
    """``"top_left"`` / ``"bottom_right"`` for torch's ``CausalBias`` masks
    (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``),
    else ``None``. A ``CausalBias`` is a tensor subclass whose storage holds no
    mask at all: it must never reach a kernel as data."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # torch < 2.3
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    if attn_mask.variant == CausalVariant.UPPER_LEFT:
        return "top_left"
    if attn_mask.variant == CausalVariant.LOWER_RIGHT:
        return "bottom_right"
    raise InvalidArgumentError(f"CausalBias.variant must be a CausalVariant, got {attn_mask.variant!r}")


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
    (..., Hk, S, Ev) -> output (..., Hq, L, Ev), in the input dtype and in the
    memory layout of ``query`` (as torch returns it: contiguous for a
    contiguous query). Leading dims broadcast; any size may be 0 (an empty
    output; zeros for S = 0; the mean of ``value`` for E = 0).

    ``attn_mask``: bool (True = attend), or float (``query.dtype`` or
    float32) that is added, broadcastable to (..., Hq, L, S); or torch's
    ``causal_upper_left`` / ``causal_lower_right`` bias objects
    (``torch.nn.attention.bias``), which become the kernel's causal mask
    aligned top-left / bottom-right. ``is_causal`` is top-left aligned; given
    together with a mask, both apply (a key is seen only if the mask allows it
    and it is not in the future), as torch 2.13's default CPU path does
    (later torch versions refuse the pair).
    ``enable_gqa`` lets Hq be a multiple of Hk. ``scale`` defaults to
    1/sqrt(E). ``dropout_p`` in [0, 1] is applied as in torch (always, when >
    0, scaling kept weights by 1 / (1 - p)), inside the kernel, with its
    Philox keep pattern drawn from torch's default generator (reproducible
    under ``torch.manual_seed``; not torch's own pattern). A query row whose
    keys are all masked gives 0.

    Invalid arguments raise :class:`InvalidArgumentError`, a ``RuntimeError``
    (as torch raises) and a ``ValueError``. Tensor subclasses that override
    ``__torch_function__`` get it called, as torch's own function does; nested
    tensors are handed to torch's implementation.
    """
    if (
        attn_mask is None
        and _sdpa_fast is not None
        and _backend._state["backend"] != "reference"
        and not _is_compiling()
    ):
        try:
            out = _sdpa_fast(query, key, value, dropout_p, is_causal, scale, enable_gqa)
        except ValueError as e:
            raise _as_invalid_argument(e) from None
        if out is not None:
            return out
    alignment = _causal_bias_alignment(attn_mask)
    if alignment is not None:
        if is_causal:
            raise InvalidArgumentError("CausalBias should not be used with causal=True")
        bias_lengths = (attn_mask.seq_len_q, attn_mask.seq_len_kv)
        attn_mask = None
    tensors = tuple(t for t in (query, key, value, attn_mask) if isinstance(t, torch.Tensor))
    if not _is_compiling() and torch.overrides.has_torch_function(tensors):
        kwargs = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if alignment is not None:  # already unpacked: hand on the plain causal form
            kwargs["is_causal"] = True
            if alignment == "bottom_right" and bias_lengths[0] != bias_lengths[1]:
                raise InvalidArgumentError(
                    "causal_lower_right with seq_len_q != seq_len_kv cannot be combined with tensor "
                    "subclasses that override __torch_function__"
                )
        return torch.overrides.handle_torch_function(
            scaled_dot_product_attention, tensors, query, key, value, attn_mask=attn_mask, **kwargs
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(t, name)
    if any(t.is_nested for t in (query, key, value)):
        return _torch_sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal or alignment is not None,
            scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise InvalidArgumentError(f"{name} must have at least 2 dims (..., L, E), got {t.dim()}")
        if t.layout != torch.strided:
            raise InvalidArgumentError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    _check_dtype(query, "query")
    _check_same_dtype_device(query, "query", key=key, value=value)
    if not 0.0 <= _torch_float(dropout_p, "dropout_p") <= 1.0:
        raise InvalidArgumentError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if scale is not None and not math.isfinite(_torch_float(scale, "scale")):
        raise InvalidArgumentError(f"scale must be a finite number, got {scale}")
    unbatched_heads = query.dim() == 2
    if unbatched_heads:  # (L, E): one head, no batch
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    lq, e = query.shape[-2:]
    sk, ek = key.shape[-2:]
    sv, ev = value.shape[-2:]
    if ek != e:
        raise InvalidArgumentError(f"key.shape[-1] must equal query.shape[-1] ({e}), got {ek}")
    if sv != sk:
        raise InvalidArgumentError(f"value.shape[-2] must equal key.shape[-2] ({sk}), got {sv}")
    if alignment is not None and bias_lengths != (lq, sk):
        raise InvalidArgumentError(
            f"the CausalBias attn_mask is for (seq_len_q, seq_len_kv) = {bias_lengths}, "
            f"but query and key have L = {lq} and S = {sk}"
        )
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if hv != hk:
        raise InvalidArgumentError(f"value heads (shape[-3]) must equal key heads ({hk}), got {hv}")
    if enable_gqa:
        if (hk == 0 and hq != 0) or (hk != 0 and hq % hk != 0):
            raise InvalidArgumentError(
                f"with enable_gqa, query heads ({hq}) must be a multiple of key heads ({hk})"
            )
    elif hk != hq and hk != 1:
        raise InvalidArgumentError(
            f"key heads (shape[-3]) must equal query heads ({hq}) or be 1 "
            f"(pass enable_gqa=True for grouped-query attention), got {hk}"
        )
    try:
        batch = tuple(torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3]))
    except RuntimeError:
        raise InvalidArgumentError(
            f"batch dims of query {tuple(query.shape[:-3])}, key {tuple(key.shape[:-3])} "
            f"and value {tuple(value.shape[:-3])} do not broadcast"
        ) from None
    hk_eff = hk if enable_gqa else hq
    nb = math.prod(batch)

    def canon(t: torch.Tensor, h: int) -> torch.Tensor:  # (..., H, S, D) -> (B, S, H, D) view
        t = t.expand(*batch, h, *t.shape[-2:])
        return t.reshape(nb, h, *t.shape[-2:]).transpose(1, 2)

    q = canon(query, hq)
    k = canon(key, hk_eff)
    v = canon(value, hk_eff)
    mask = None if attn_mask is None else _canonical_mask(attn_mask, query, batch, hq, lq, sk)
    if e == 0 and scale is None:
        scale = 1.0  # every score is 0 whatever the scale (torch's 1/sqrt(0) included)
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
        window_right=0 if (is_causal or alignment is not None) else -1,
        bottom_right=alignment == "bottom_right",
        dropout_p=dropout_p,
        need_lse=False,
    )
    if out.numel() > 0 and not _same_layout(out, q):
        # The kernel allocates its output in q's layout; the other paths may not.
        out = _ops.empty_like_layout(q, out.shape).copy_(out)
    out = out.transpose(1, 2).reshape(*batch, hq, lq, ev)
    return out.squeeze(0) if unbatched_heads else out


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the dims of size > 1 of ``a`` and ``b`` (same rank) lie in memory in the same order."""

    def order(t):
        return sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: -t.stride(d))

    return order(a) == order(b)


def canonical_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    scale: float | None = None,
    softcap: float = 0.0,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = False,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dropout_rng: torch.Tensor | None = None,
    need_dropout_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention in pyfastattn's canonical form, through the backend rule.

    The entry that both public APIs, the ``nn`` modules and the Hugging Face
    integration meet in; it trusts its caller to have checked shapes and
    dtypes. Dense: ``q`` (B, Sq, Hq, D), ``k`` (B, Sk, Hk, D), ``v`` (B, Sk,
    Hk, Dv) views with a contiguous last dim (any strides otherwise), Hq a
    multiple of Hk -> out (B, Sq, Hq, Dv). Varlen: (total, H, D) with int32
    ``cu_seqlens_q``/``cu_seqlens_k`` and ``max_seqlen_q``/``max_seqlen_k``.

    ``attn_mask``: bool (True = attend) or additive float (``q.dtype`` or
    float32), broadcastable to (B, Hq, Sq, Sk). ``seqused_k``: int32 (B,) real
    key lengths. Key j is visible from row i iff it lies in ``[i + off -
    window_left, i + off + window_right]`` (negative = unbounded), with ``off
    = len_k - len_q`` when ``bottom_right`` else 0; causal is ``window_right =
    0``. ``scale`` defaults to 1/sqrt(D); ``softcap > 0`` caps the scores. With
    ``return_lse`` also returns the float32 log-sum-exp (B, Hq, Sq) or (Hq,
    total_q). See ``csrc/attention/params.h`` for the exact semantics.

    ``dropout_p`` drops softmax weights with the kernels' Philox keep
    function (seed and offset: ``dropout_rng``, else drawn from ``generator``;
    ``need_dropout_mask`` keeps the call off torch's SDPA route, whose pattern
    differs). ``alibi_slopes`` (fp32 (Hq,) or (B, Hq)) adds ``-slope * |i +
    len_k - len_q - j|`` to the scores.
    """
    b, lq, hq, d = q.shape if cu_seqlens_q is None else (None, None, *q.shape[-2:])
    # The kernels read the metadata through a plain pointer; a view (cu[::2],
    # lengths[:, 0]) is as valid an argument as a fresh tensor.
    cu_seqlens_q, cu_seqlens_k, seqused_k = (
        None if t is None else t.contiguous() for t in (cu_seqlens_q, cu_seqlens_k, seqused_k)
    )
    if cu_seqlens_q is None:
        sk = k.shape[1]
        max_seqlen_q, max_seqlen_k = lq, sk
        if attn_mask is not None:
            if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
                attn_mask = attn_mask.to(q.dtype)
            attn_mask = _canonical_mask(attn_mask, q, (b,), hq, lq, sk)
    elif attn_mask is not None:
        raise InvalidArgumentError("attn_mask cannot be combined with cu_seqlens_q/cu_seqlens_k")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    out, lse = _run(
        q,
        k,
        v,
        attn_mask=attn_mask,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        scale=float(scale),
        softcap=float(softcap),
        window_left=window_left if window_left >= 0 else -1,
        window_right=window_right if window_right >= 0 else -1,
        bottom_right=bottom_right,
        dropout_p=dropout_p,
        need_lse=return_lse,
        alibi_slopes=alibi_slopes,
        dropout_rng=dropout_rng,
        generator=generator,
        need_dropout_mask=need_dropout_mask,
    )
    return (out, lse) if return_lse else out


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
    dropout_p: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_dropout_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
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

    ``dropout_p`` in [0, 1] drops each softmax weight with probability p and
    scales the rest by 1 / (1 - p), as torch does (p = 1 drops all), inside the
    kernel: the keep decision is Philox 4x32-10 of (seed, offset, b, h, i, j)
    with the seed and offset drawn by one torch random op from ``generator``
    (default: torch's default generator of q's device), so the result is
    reproducible under ``torch.manual_seed`` for any thread count.
    ``return_dropout_mask`` (debug only, O(B H Sq Sk)) also returns the keep
    pattern, bool (B, Hq, Sq, Sk), True = kept (varlen: (B, Hq, max_seqlen_q,
    max_seqlen_k), rows and keys counted inside each sequence), last.
    ``alibi_slopes``: float32 (Hq,) or (B, Hq) on q's device; adds
    ``-slope * |i + Sk - Sq - j|`` to the score of query i and key j
    (FlashAttention's ALiBi, whatever the causal alignment).
    """
    if (
        cu_seqlens_q is None
        and cu_seqlens_k is None
        and seqused_k is None
        and alibi_slopes is None
        and not return_dropout_mask
        and _attention_fast is not None
        and _backend._state["backend"] != "reference"
        and not _is_compiling()
    ):
        try:
            out = _attention_fast(q, k, v, causal, window_size, softcap, softmax_scale, return_lse, dropout_p)
        except ValueError as e:
            raise _as_invalid_argument(e) from None
        if out is not None:
            return out
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name)
    _check_dtype(q, "q")
    _check_same_dtype_device(q, "q", k=k, v=v)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise InvalidArgumentError("cu_seqlens_q and cu_seqlens_k must be given together")
    rank = 3 if varlen else 4
    layout = "(total, H, D) with cu_seqlens" if varlen else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise InvalidArgumentError(
                f"{name} must have {rank} dims {layout}, got {t.dim()} (shape {tuple(t.shape)})"
            )
    hq, d = q.shape[-2:]
    hk, dk = k.shape[-2:]
    hv = v.shape[-2]
    if dk != d:
        raise InvalidArgumentError(f"k.shape[-1] must equal q.shape[-1] ({d}), got {dk}")
    if hv != hk:
        raise InvalidArgumentError(f"v.shape[-2] (heads) must equal k.shape[-2] ({hk}), got {hv}")
    if (hk == 0 and hq != 0) or (hk != 0 and hq % hk != 0):
        raise InvalidArgumentError(f"q heads ({hq}) must be a multiple of k heads ({hk})")
    if v.shape[:-2] != k.shape[:-2]:
        raise InvalidArgumentError(
            f"v.shape[:-2] must equal k.shape[:-2] ({tuple(k.shape[:-2])}), got {tuple(v.shape[:-2])}"
        )
    if not varlen and k.shape[0] != q.shape[0]:
        raise InvalidArgumentError(
            f"k.shape[0] (batch) must equal q.shape[0] ({q.shape[0]}), got {k.shape[0]}"
        )
    _check_window_softcap_scale(window_size, softcap, softmax_scale)
    if varlen:
        max_seqlen_q = _check_varlen(
            cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q", q.device
        )
        max_seqlen_k = _check_varlen(
            cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k", q.device
        )
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            raise InvalidArgumentError(
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
            raise InvalidArgumentError(
                f"seqused_k must be int32 of shape ({batch},), got {seqused_k.dtype} "
                f"of shape {tuple(seqused_k.shape)}"
            )
        if seqused_k.device != q.device:
            raise InvalidArgumentError(
                f"seqused_k.device must equal q.device ({q.device}), got {seqused_k.device}"
            )
        if not _is_compiling() and seqused_k.numel() > 0:
            if varlen:
                avail = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
            else:
                avail = [k.shape[1]] * batch
            for i, (u, a) in enumerate(zip(seqused_k.tolist(), avail)):
                if not 0 <= u <= a:
                    raise InvalidArgumentError(f"seqused_k[{i}] = {u} must be in [0, {a}]")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise InvalidArgumentError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if alibi_slopes is not None:
        _check_alibi_slopes(alibi_slopes, batch, hq, q.device)
        alibi_slopes = alibi_slopes.detach().contiguous()  # a constant, like the kernels treat it
    dropout_rng = None
    if return_dropout_mask and dropout_p > 0:
        dropout_rng = draw_dropout_rng(q.device, generator)
    wl, wr = int(window_size[0]), int(window_size[1])
    if causal:
        wr = 0
    result = canonical_attention(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        scale=softmax_scale,
        softcap=softcap,
        window_left=wl,
        window_right=wr,
        bottom_right=True,
        return_lse=return_lse,
        dropout_p=float(dropout_p),
        alibi_slopes=alibi_slopes,
        generator=generator,
        dropout_rng=dropout_rng,
        need_dropout_mask=return_dropout_mask,
    )
    if not return_dropout_mask:
        return result
    result = result if isinstance(result, tuple) else (result,)
    return (
        *result,
        dropout_mask(dropout_rng, float(dropout_p), batch, hq, max_seqlen_q, max_seqlen_k, q.device),
    )


def dropout_mask(
    dropout_rng: torch.Tensor | None,
    dropout_p: float,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The keep pattern (bool (batch, heads, seqlen_q, seqlen_k), True = kept)
    of the kernels' dropout for this (seed, offset) pair and p; all True
    without dropout. Debug only: O(B H Sq Sk). Computed by the C++ keep
    function when the extension is built, else by the reference's."""
    if dropout_rng is None or dropout_p <= 0:
        return torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if _ops.AVAILABLE:
        keep = torch.ops.pyfastattn.dropout_mask(
            dropout_rng.cpu(), dropout_p, batch, heads, seqlen_q, seqlen_k
        )
        return keep.to(device)
    return reference.dropout_keep_mask(dropout_rng, dropout_p, batch, heads, seqlen_q, seqlen_k, device)


def _check_alibi_slopes(slopes, batch: int, hq: int, device: torch.device) -> None:
    _check_tensor(slopes, "alibi_slopes")
    if slopes.dtype != torch.float32:
        raise InvalidArgumentError(f"alibi_slopes.dtype must be torch.float32, got {slopes.dtype}")
    if tuple(slopes.shape) not in ((hq,), (batch, hq)):
        raise InvalidArgumentError(
            f"alibi_slopes must have shape ({hq},) or ({batch}, {hq}), got {tuple(slopes.shape)}"
        )
    if slopes.device != device:
        raise InvalidArgumentError(f"alibi_slopes.device must equal q.device ({device}), got {slopes.device}")
    if slopes.layout != torch.strided:
        raise InvalidArgumentError(
            f"alibi_slopes must be a dense (strided) tensor, got layout {slopes.layout}"
        )
