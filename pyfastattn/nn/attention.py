"""Drop-in :class:`torch.nn.MultiheadAttention` that runs on pyfastattn.

:class:`MultiheadAttention` subclasses ``torch.nn.MultiheadAttention`` and keeps
its constructor, parameters, initialisation and ``state_dict`` untouched; only
``forward`` changes. The projections are the products of torch's
``F.linear`` calls, through :func:`pyfastattn.linear` (``F.linear`` itself,
except fp32 on CPUs where pyfastattn's own GEMM is the faster one: AMD with
AVX-512), and the attention itself goes through the pyfastattn canonical form
(``(B, S, H, D)`` views plus a mask description) and the backend rule
(``pyfastattn.set_backend``): the fused kernel where it can run, the reference
otherwise.

How masks are handed to the kernel:

* ``is_causal=True`` (with an ``attn_mask``, as torch requires) and
  ``need_weights=False``: the kernel's own top-left causal mask, no dense mask.
  Torch drops ``attn_mask`` in this case only without a ``key_padding_mask``;
  we also trust the hint with one (the result is the same when the hint is
  true, which torch requires), except with ``add_bias_kv``/``add_zero_attn``,
  where torch's two paths disagree and we follow its masked path.
* ``key_padding_mask`` that is *right padding* (each row is some real keys
  followed only by padding; bool ``True`` = pad, or a float mask of only 0 and
  -inf): the kernel's per-batch key lengths ``seqused_k``, no dense mask. This
  is exact: a key past ``seqused_k[b]`` is never seen, a key before it always
  is. Checking the pattern reads the mask once (one device sync on CUDA; the
  result is cached per mask tensor, so a stack of layers checks once); under
  ``torch.compile`` and ``torch.jit.trace`` the check is skipped and the mask
  is passed densely.
* anything else (``attn_mask`` of shape ``(L, S)`` or ``(N*H, L, S)``, a
  key-padding mask with holes or left padding, extra keys from ``add_bias_kv``
  / ``add_zero_attn``): one merged mask, bool where every part is bool,
  otherwise additive, broadcast rather than expanded where possible.

``need_weights=True`` (torch's default) is the only case that computes the
attention matrix: explicitly, in fp32 (fp64 for fp64 inputs), as torch's own
``need_weights`` path does. Pass ``need_weights=False`` for the fused kernel.

Differences from torch, on purpose:

* a query row whose keys are all masked gives 0 (torch's ``need_weights=True``
  path gives NaN; its SDPA path gives 0 like us);
* NestedTensor inputs are handed to torch's own implementation.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as _functional
from .. import reference
from .._linear import linear

__all__ = ["MultiheadAttention"]


# ---------------------------------------------------------------------------
# Shared helpers: also used by pyfastattn.nn.transformer and the Hugging Face
# integration.
# ---------------------------------------------------------------------------

# Set by pyfastattn.distributed.context_parallel (and only there): while set,
# MultiheadAttention calls it instead of attend(), with the same arguments.
_context_parallel_hook = None


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    seqused_k: Tensor | None = None,
    causal: bool = False,
    bottom_right: bool = False,
    scale: float | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    alibi_slopes: Tensor | None = None,
) -> Tensor:
    """Attention in the canonical form, through the backend rule.

    ``q`` (B, L, Hq, D), ``k`` (B, S, Hk, D), ``v`` (B, S, Hk, Dv) views with a
    contiguous last dim (Hq a multiple of Hk) -> (B, L, Hq, Dv). ``mask``:
    bool (True = attend) or additive float, broadcastable to (B, Hq, L, S).
    ``seqused_k``: int32 (B,) real key lengths. ``causal`` is top-left aligned
    unless ``bottom_right``. ``dropout_p`` runs inside the kernel (its Philox
    keep pattern, seeded from torch's default generator); ``alibi_slopes``
    (fp32 (Hq,) or (B, Hq)) adds ALiBi. The caller has validated shapes and dtypes.
    """
    return _functional.canonical_attention(
        q,
        k,
        v,
        attn_mask=mask,
        seqused_k=seqused_k,
        scale=scale,
        softcap=softcap,
        window_right=0 if causal else -1,
        bottom_right=bottom_right,
        dropout_p=dropout_p,
        alibi_slopes=alibi_slopes,
    )


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_p: float
) -> tuple[Tensor, Tensor]:
    """Attention that also returns the probabilities, for ``need_weights``.

    Canonical ``q``/``k``/``v`` (B, S, H, D); ``mask`` bool (True = attend) or
    additive, broadcastable to (B, H, L, S). Computed in fp32 (fp64 for fp64
    inputs). Returns ``out`` (B, L, H, Dv) and ``weights`` (B, H, L, S), both
    in ``q.dtype``; dropout is applied to the weights (and so returned with
    them), as in torch. A row with every key masked gives weights 0.
    """
    if _context_parallel_hook is not None:
        raise RuntimeError("need_weights=True is not supported under pyfastattn.distributed.context_parallel "
                           "(the attention matrix spans ranks); pass need_weights=False")  # fmt: skip
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.transpose(1, 2).to(cdt) for t in (q, k, v))
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(cdt)
    # an all-masked row gives 0, not NaN; no keys (an empty memory): weights (..., L, 0), output 0
    p, _ = reference.softmax_rows(s)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = torch.matmul(p, vf).transpose(1, 2)
    return out.to(q.dtype), p.to(q.dtype)


# Answers read off a mask tensor (its right-padding lengths, a static cache's
# prefix lengths) are cached per mask tensor, by identity and version, so that
# a stack of layers given the same mask reads it once (one device sync on CUDA
# per forward, not per layer).
_MASK_MEMO: dict[tuple, tuple[weakref.ref, int, Any]] = {}
_MASK_MEMO_SIZE = 16


def memo_per_mask(mask: Tensor, key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, cached for this ``mask`` tensor object and ``key`` until
    the mask changes in place (its version counter moves) or is freed. An
    inference tensor (made under torch.inference_mode) has no version counter
    to tell an in-place change: its answer is computed every call. The caller
    must not cache under ``torch.compile`` or ``torch.jit.trace`` (the answer
    would become a constant of the graph)."""
    if mask.is_inference():
        return compute()
    k = (id(mask), *key)
    hit = _MASK_MEMO.get(k)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    result = compute()
    if len(_MASK_MEMO) >= _MASK_MEMO_SIZE:
        try:  # the oldest entry out
            _MASK_MEMO.pop(next(iter(_MASK_MEMO)), None)
        except (RuntimeError, StopIteration):  # another thread changed the memo meanwhile: skip
            pass
    _MASK_MEMO[k] = (weakref.ref(mask), mask._version, result)
    return result


def right_padding_lengths(mask: Tensor, *, true_means_pad: bool = True) -> Tensor | None:
    """int32 (N,) key lengths if ``mask`` is a right-padding mask, else None.

    ``mask`` is (N, S), or (N, 1, 1, S) (a padding-only 4-D mask). Right
    padding: each row is some kept keys followed only by padding. Bool masks
    mark padding with True (torch's ``key_padding_mask``) or, with
    ``true_means_pad=False``, mark kept keys with True (Hugging Face); a float
    mask qualifies when it holds only 0 (keep) and -inf (pad). Reads the mask
    once (one device sync on CUDA) and caches the answer for that tensor
    object (:func:`memo_per_mask`), so a stack of layers given the same mask
    reads it once (not for inference tensors, which have no version counter:
    read every call). Returns None without reading under ``torch.compile`` or
    ``torch.jit.trace``, or when the mask needs a gradient.
    """
    # Under torch.compile or torch.jit.trace the answer would be baked into
    # the graph (and a cached one as a constant), so a later mask with holes
    # would silently be read as right padding: the caller passes it densely.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or mask.requires_grad:
        return None
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        rows = mask[:, 0, 0, :]
    elif mask.dim() == 2:
        rows = mask
    else:
        return None

    def compute() -> Tensor | None:
        ok = None
        if rows.dtype == torch.bool:
            keep = ~rows if true_means_pad else rows
        else:
            keep = rows == 0
            ok = (keep | torch.isneginf(rows)).all()
        lengths = keep.sum(-1, dtype=torch.int32)
        prefix = torch.arange(rows.shape[-1], device=rows.device) < lengths.unsqueeze(-1)
        same = torch.equal(keep, prefix) if ok is None else bool((ok & (keep == prefix).all()).item())
        return lengths if same else None

    return memo_per_mask(mask, ("right_padding", true_means_pad), compute)


def check_mask_type(
    mask: Tensor | None, name: str, other: Tensor | None = None, other_name: str = ""
) -> None:
    """torch's mask dtype rules: bool or floating point (AssertionError
    otherwise), and a deprecation warning when two masks' dtypes differ."""
    if mask is None:
        return
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    if other is not None and other.dtype != mask.dtype:
        warnings.warn(
            f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both instead.",
            stacklevel=3,
        )


def _pad_keys(mask: Tensor, extra: int) -> Tensor:
    """Append ``extra`` always-visible key columns to a bool (attend) or additive mask."""
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    pad = fill((*mask.shape[:-1], extra), dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, pad], dim=-1)


def _merge(a: Tensor | None, b: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Combine two masks (bool: True = attend, or additive float) by broadcasting."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    a, b = (_additive(t, dtype) for t in (a, b))
    return a + b


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _check_shapes(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    num_heads: int,
) -> bool:
    """torch's ``_mha_shape_check``: AssertionError on wrong ranks; returns is_batched."""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError(
                "For batched (3-D) `query`, expected `key` and `value` to be 3-D "
                f"but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError(
                "For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D (N, S) "
                f"but found {key_padding_mask.dim()}-D tensor of shape {tuple(key_padding_mask.shape)} instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(
                "For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D (L, S) or 3-D "
                f"(N*num_heads, L, S) but found {attn_mask.dim()}-D tensor of shape "
                f"{tuple(attn_mask.shape)} instead"
            )
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError(
                "For unbatched (2-D) `query`, expected `key` and `value` to be 2-D "
                f"but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError(
                "For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D (S,) "
                f"but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError(
                    "For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                    f"but found {attn_mask.dim()}-D tensor instead"
                )
            if attn_mask.dim() == 3:
                expected = (num_heads, query.shape[0], key.shape[0])
                if tuple(attn_mask.shape) != expected:
                    raise AssertionError(
                        f"Expected `attn_mask` shape to be {expected} but got {tuple(attn_mask.shape)}"
                    )
        return False
    raise AssertionError(
        f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
    )


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` (same constructor,
    ``state_dict``, ``forward`` signature and return values) that runs the
    attention through pyfastattn. See the module docstring for how masks map
    onto the kernel and for the two deliberate differences."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim > 0 and num_heads > 0 and embed_dim % num_heads != 0:
            raise AssertionError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and num_heads={num_heads}"
            )
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments, shapes and return values as
        :meth:`torch.nn.MultiheadAttention.forward`.

        ``query`` (L, N, E) / (N, L, E) with ``batch_first`` / (L, E)
        unbatched; ``key`` and ``value`` likewise with S and ``kdim`` /
        ``vdim``. ``key_padding_mask`` (N, S) or (S,): bool True = ignore, or
        float added. ``attn_mask`` (L, S) or (N*num_heads, L, S): bool True =
        masked, or float added. Returns ``(attn_output, attn_weights)``;
        weights are None unless ``need_weights``, then (N, L, S) averaged over
        heads or (N, num_heads, L, S) with ``average_attn_weights=False``.
        """
        if query.is_nested or key.is_nested or value.is_nested:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        is_batched = _check_shapes(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        check_mask_type(key_padding_mask, "key_padding_mask", attn_mask, "attn_mask")
        check_mask_type(attn_mask, "attn_mask")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            # torch's rule (its SDPA path): bool, float32, or the query's dtype
            if m is not None and m.dtype not in (torch.bool, torch.float32, query.dtype):
                raise RuntimeError(
                    f"{name} must be bool, float32 or have the query's dtype ({query.dtype}), got {m.dtype}"
                )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                "method `generate_square_subsequent_mask` to create this mask."
            )

        # Work batch-first: (N, L, E). Identity between inputs picks the
        # projection (one GEMM for self-attention), as in torch.
        self_attention = query is key and key is value
        shared_kv = key is value
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        n, lq, e = query.shape
        if e != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {e}")
        if key.shape[0] != n or value.shape[0] != n:
            raise RuntimeError(
                f"key and value must have the query's batch size {n}, got {key.shape[0]} and {value.shape[0]}"
            )
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key.shape[1] != value.shape[1]:
            raise AssertionError(
                f"key's sequence length {key.shape[1]} does not match value's {value.shape[1]}"
            )
        sk = key.shape[1]
        if attn_mask is not None:
            want = (lq, sk) if attn_mask.dim() == 2 else (n * self.num_heads, lq, sk)
            if tuple(attn_mask.shape) != want:
                raise RuntimeError(
                    f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should be {want}."
                )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (n, sk):
            raise AssertionError(
                f"Expected key_padding_mask of shape {(n, sk)} (batch, source length), "
                f"got {tuple(key_padding_mask.shape)}"
            )

        q, k, v = self._project(query, key, value, self_attention, shared_kv)
        h, d = self.num_heads, self.head_dim

        extra = 0  # keys appended after the real ones, always visible
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, 1, h, d).expand(n, 1, h, d).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, h, d).expand(n, 1, h, d).to(v.dtype)], dim=1)
            extra += 1
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must be both set or both None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, 1, h, d)], dim=1)
            v = torch.cat([v, v.new_zeros(n, 1, h, d)], dim=1)
            extra += 1

        dropout_p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(d)
        causal = is_causal and not need_weights and (key_padding_mask is None or extra == 0)
        seqused_k = None
        if key_padding_mask is not None and extra == 0 and not need_weights:
            seqused_k = right_padding_lengths(key_padding_mask)

        mask = None
        if attn_mask is not None and not causal:
            m = attn_mask.reshape(1, 1, lq, sk) if attn_mask.dim() == 2 else attn_mask.reshape(n, h, lq, sk)
            mask = ~m if m.dtype == torch.bool else m
        if key_padding_mask is not None and seqused_k is None:
            kpm = key_padding_mask.reshape(n, 1, 1, sk)
            # a float32 mask with bf16/fp16 inputs stays float32: added exactly downstream
            merged_dtype = (
                torch.float32 if torch.float32 in (kpm.dtype, getattr(mask, "dtype", None)) else q.dtype
            )
            mask = _merge(mask, ~kpm if kpm.dtype == torch.bool else kpm, merged_dtype)
        if mask is not None and extra:
            mask = _pad_keys(mask, extra)

        if need_weights:
            out, weights = explicit_attention(q, k, v, mask, scale, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            # context_parallel (pyfastattn.distributed) sets the hook: the same call, over a process group
            out = (_context_parallel_hook or attend)(
                q, k, v, mask=mask, seqused_k=seqused_k, causal=causal, scale=scale, dropout_p=dropout_p
            )
            weights = None

        # (N, L, H, D) -> the caller's layout, then the output projection
        if not is_batched:
            out = out.reshape(lq, e)
        elif self.batch_first:
            out = out.reshape(n, lq, e)
        else:
            out = out.transpose(0, 1).reshape(lq, n, e)
        out = linear(out, self.out_proj.weight, self.out_proj.bias)
        return out, weights

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, shared_kv: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The input projections of torch's MHA on batch-first inputs ->
        q (N, L, H, D), k and v (N, S, H, D) views with a contiguous last dim."""
        e, h, d = self.embed_dim, self.num_heads, self.head_dim
        b = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            q = linear(query, self.q_proj_weight, bq)
            k = linear(key, self.k_proj_weight, bk)
            v = linear(value, self.v_proj_weight, bv)
        elif self_attention:
            q, k, v = linear(query, self.in_proj_weight, b).unflatten(-1, (3, e)).unbind(-2)
        elif shared_kv:
            wq, wkv = self.in_proj_weight.split([e, 2 * e])
            bq, bkv = (None, None) if b is None else b.split([e, 2 * e])
            q = linear(query, wq, bq)
            k, v = linear(key, wkv, bkv).unflatten(-1, (2, e)).unbind(-2)
        else:
            wq, wk, wv = self.in_proj_weight.chunk(3)
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            q, k, v = linear(query, wq, bq), linear(key, wk, bk), linear(value, wv, bv)
        return q.unflatten(-1, (h, d)), k.unflatten(-1, (h, d)), v.unflatten(-1, (h, d))
