"""Hugging Face transformers: the ``"pyfastattn"`` attention implementation.

    import pyfastattn.integrations.transformers as pfa_hf
    pfa_hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pyfastattn")
    # or, on a loaded model:
    model.set_attn_implementation("pyfastattn")

:func:`register` adds two functions under one name, which transformers needs
both of: the attention function (``AttentionInterface``) and its mask function
(``AttentionMaskInterface``). Without the mask function, transformers builds
*no* mask for an unknown implementation name, and padding would be silently
ignored; with it, every padding, causal, sliding-window or packed-sequence
mask reaches the kernel.

The mask function is transformers' SDPA mask (bool, True = attend, or None
when ``is_causal`` alone describes it), with one change: a bidirectional
padding-only mask is returned as (B, 1, 1, S) rather than expanded to (B, 1,
L, S). The attention function then hands the kernel

* no mask and, for a causal module with more than one query, the causal
  flag, aligned top-left as in SDPA (transformers drops the mask only where
  that alignment is right: equal lengths, or a static cache's prefill whose
  extra key slots are empty) when the mask is None;
* per-batch key lengths (``seqused_k``) when the mask is a (B, 1, 1, S)
  right-padding mask (BERT-style encoders with right padding) - exact, no
  dense mask;
* the mask itself otherwise (bool, or additive float for custom 4-D masks and
  ``position_bias``).

With a ``StaticCache`` (or any cache whose keys are a fixed buffer filled
from the start), transformers has already written the new keys in place and
hands over the whole buffer with a mask that allows, for each sequence, a
prefix of it (after its left padding, if any) with bottom-right causal
alignment. That mask is recognised (:func:`prefix_causal_spans`, once per
forward) and the call becomes :func:`pyfastattn.attention_with_kvcache` over
the buffer's views with ``cache_seqlens`` = the prefix lengths and
``cache_leftpad`` = the padding (up to 16 queries: decode steps), or, without
padding, the tiled kernel with those lengths as ``seqused_k`` and
bottom-right causal (a prefill): only the filled keys are read, no dense mask
and no copy. (A ``DynamicCache`` concatenates on its own side; its keys are
then a filled buffer, so a left-padded batch's decode steps take the same
cache route, and its other calls the paths above.)

GQA runs without repeating keys and values. ``softcap`` is supported;
attention sinks (``s_aux``) and flex ``BlockMask`` masks are not and raise.
Attention weights are not computed (``output_attentions`` returns None, as
with "sdpa").
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..kvcache import attention_with_kvcache
from ..nn.attention import attend, memo_per_mask, right_padding_lengths

__all__ = [
    "register",
    "attention_forward",
    "build_mask",
    "prefix_causal_lengths",
    "prefix_causal_spans",
    "NAME",
]

NAME = "pyfastattn"

# The KV-cache kernel runs every query row as a decode row (dot products read
# straight from the cache); a long prefill into a static cache is faster on
# the tiled kernel, so only short query blocks take the cache route (decode
# steps, speculative blocks); longer ones take the tiled kernel with the
# prefix as key lengths and the causal flag instead of the dense mask.
_KVCACHE_MAX_QUERIES = 16


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    position_bias: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The transformers attention-function contract.

    ``query`` (B, Hq, L, D), ``key``/``value`` (B, Hk, S, D/Dv) with Hq a
    multiple of Hk; ``attention_mask`` None, or 4-D (B|1, 1|Hq, L|1, S) bool
    (True = attend) or additive float. Returns ``(out, None)`` with out (B, L,
    Hq, Dv).
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("pyfastattn does not support attention sinks (s_aux)")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"pyfastattn needs attention_mask as a tensor or None, got {type(attention_mask).__name__} "
            "(a flex_attention BlockMask? build masks with the 'pyfastattn' mask function)"
        )
    if attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be 4-D (batch, heads, query, key), got shape {tuple(attention_mask.shape)}"
        )
    if kwargs.get("output_attentions"):
        _warn_once("pyfastattn does not compute attention weights; output_attentions gives None")
    b, hq, lq, _ = query.shape
    hk = key.shape[1]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As SDPA: the causal flag is used only without a mask and with more than
    # one query (one query attends to every cached key).
    causal = bool(is_causal) and attention_mask is None and lq > 1

    if (
        position_bias is None
        and not float(dropout)
        and bool(is_causal)
        and attention_mask is not None
        and key.shape[2] > lq
        and not torch.is_grad_enabled()
    ):
        spans = prefix_causal_spans(attention_mask, b, lq)
        if spans is not None and (lq <= _KVCACHE_MAX_QUERIES or spans[1] is None):
            lengths, leftpad = spans
            q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            if lq <= _KVCACHE_MAX_QUERIES:
                out = attention_with_kvcache(
                    q, k, v, cache_seqlens=lengths, cache_leftpad=leftpad, causal=True, softmax_scale=scaling,
                    softcap=float(softcap or 0.0),
                )  # fmt: skip
            else:
                # A prefill into the buffer: the same prefix as per-sequence key
                # lengths and the bottom-right causal flag, so the tiled kernel
                # reads only the filled keys and skips the masked-out triangle
                # (no dense lq x S mask). A left-padded one keeps its mask.
                out = attend(
                    q, k, v, seqused_k=lengths, causal=True, bottom_right=True, scale=scaling,
                    softcap=float(softcap or 0.0),
                )  # fmt: skip
            return out, None

    mask, seqused_k = attention_mask, None
    if mask is not None and mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1:
        seqused_k = right_padding_lengths(mask, true_means_pad=False)
        if seqused_k is not None:
            if mask.shape[0] != b:
                seqused_k = seqused_k.expand(b).contiguous()
            mask = None
    if position_bias is not None:
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = position_bias.masked_fill(~mask, float("-inf"))
        else:
            mask = position_bias + mask
    out = attend(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        mask=mask,
        seqused_k=seqused_k,
        causal=causal,
        scale=scaling,
        softcap=float(softcap or 0.0),
        dropout_p=float(dropout),
    )
    return out, None


def prefix_causal_spans(mask: Tensor, batch: int, lq: int) -> tuple[Tensor, Tensor | None] | None:
    """int32 (batch,) ``(lengths, leftpad)`` if the bool ``mask`` (B|1, 1, lq,
    S) lets query row i of sequence b see exactly keys [p_b, n_b - lq + i] (a
    static cache filled from slot 0, its first p_b slots left padding, with
    bottom-right causal alignment), and every row sees at least one key; else
    None. ``leftpad`` is None when no sequence is padded. Reads the mask (one
    device sync on CUDA) once per mask tensor: transformers hands every layer
    of a forward the same mask, and the answer is cached for that tensor
    object until it changes in place (``memo_per_mask``; read every call for
    inference tensors). None under ``torch.compile`` and ``torch.jit.trace``.
    The returned tensors are shared by the calls that hit the cache: read
    them, do not write them."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()  # the answer would be baked into the trace
        or mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.shape[1] != 1
        or mask.shape[2] != lq
    ):
        return None

    def compute() -> tuple[Tensor, Tensor | None] | None:
        rows = mask[:, 0]  # (B|1, lq|1, S)
        s = rows.shape[-1]
        last = rows[:, -1, :].to(torch.int8)  # the keys the last row sees: [p, n)
        p = last.argmax(-1)  # the first key it sees
        n = s - last.flip(-1).argmax(-1)  # one past the last
        if not bool(((last.sum(-1) > 0) & (p <= n - lq)).all()):
            return None  # a row that sees no key (the kernels give 0, SDPA NaN): the mask as it is
        i = torch.arange(lq, device=mask.device)[None, :, None]
        j = torch.arange(s, device=mask.device)[None, None, :]
        want = (j >= p[:, None, None]) & (j <= (n[:, None, None] - lq + i))
        if not torch.equal(rows, want):
            return None
        lengths = n.to(torch.int32).expand(batch).contiguous()
        padded = bool((p > 0).any())
        return lengths, (p.to(torch.int32).expand(batch).contiguous() if padded else None)

    return memo_per_mask(mask, ("causal_spans", batch, lq), compute)


def prefix_causal_lengths(mask: Tensor, batch: int, lq: int) -> Tensor | None:
    """int32 (batch,) lengths n_b if the bool ``mask`` (B|1, 1, lq, S) lets
    query row i of sequence b see exactly keys [0, n_b - lq + i] (a static
    cache filled from the start, bottom-right causal), else None: the
    unpadded case of :func:`prefix_causal_spans` (same cache, same rules)."""
    spans = prefix_causal_spans(mask, batch, lq)
    return spans[0] if spans is not None and spans[1] is None else None


def build_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """The transformers mask-function contract, with the arguments of its
    ``sdpa_mask`` (passed through unchanged, so that the signatures of
    transformers 4.x and 5.x both work): a 4-D bool mask (True = attend) or
    None. A bidirectional padding-only mask is kept as (B, 1, 1, S)."""
    from transformers import masking_utils

    mask = masking_utils.sdpa_mask(*args, **kwargs)
    bidirectional = getattr(masking_utils, "bidirectional_mask_function", None)
    if (
        mask is not None
        and bidirectional is not None
        and kwargs.get("mask_function") is bidirectional
        and mask.dim() == 4
        and mask.shape[2] > 1
    ):
        # every query row of a padding-only bidirectional mask is the same
        mask = mask[:, :, :1, :]
    return mask


def register(name: str = NAME) -> None:
    """Register the attention function and its mask function with
    transformers under ``name`` (default "pyfastattn"). Idempotent."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "pyfastattn.integrations.transformers needs Hugging Face transformers with "
            "AttentionInterface and AttentionMaskInterface (pip install 'pyfastattn[transformers]')"
        ) from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, build_mask)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)
