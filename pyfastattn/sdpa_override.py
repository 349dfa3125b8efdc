"""Route ``torch.nn.functional.scaled_dot_product_attention`` to pyfastattn.

Much attention code calls torch's function directly (Hugging Face's "sdpa"
models, timm, diffusers, nanoGPT-style blocks, ``nn.MultiheadAttention``'s
non-fast path through ``F.multi_head_attention_forward``). Rather than edit
that code, replace the function for a scope::

    import pyfastattn

    with pyfastattn.override_sdpa():
        out = model(x)              # every F.scaled_dot_product_attention call
                                    # in here runs pyfastattn's drop-in

    handle = pyfastattn.override_sdpa()   # or for longer: installed at once ...
    ...
    handle.restore()                      # ... and put back

While installed, ``torch.nn.functional.scaled_dot_product_attention`` is
:func:`pyfastattn.scaled_dot_product_attention` (same arguments, same numbers;
see its docstring for what differs: the dropout keep pattern is pyfastattn's
Philox pattern drawn from torch's generator, not torch's own, and
``torch.nn.attention.sdpa_kernel`` backend choices are not consulted), with
exceptions handed to torch's own function unchanged: tensor subclasses that
override ``__torch_function__`` (DTensor and friends: they know torch's
function, not ours), nested tensors, and calls made while a torch function
mode is active (``torch.overrides.has_torch_function`` is then true for
plain tensors too; e.g. inside ``with torch.device(...)``).

What it reaches: code that looks the function up when it calls it
(``F.scaled_dot_product_attention(...)``, ``torch.nn.functional.
scaled_dot_product_attention(...)``, and torch's own
``F.multi_head_attention_forward``). Not reached: a name bound before the
override was installed (``from torch.nn.functional import
scaled_dot_product_attention`` at import time), and C++ callers
(``nn.MultiheadAttention``'s fast path, ``torch._native_multi_head_attention``).
For modules, :func:`pyfastattn.patch` converts them instead.

Where the drop-in does not run its kernel (the backend rule: e.g. on a GPU
where the CUDA kernel is not yet verified, see ``python -m pyfastattn.info``)
it hands the call to torch's own function, so an override there only adds
the drop-in's argument checks to each call.

The replacement is a module attribute: it applies to every thread while
installed. Overrides nest (each restores what it replaced; restore them in the
reverse order). Under ``torch.compile``, dynamo guards on the function it
traced: a compiled function is recompiled once when the override is
installed or restored, and then follows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .functional import _torch_sdpa, scaled_dot_product_attention

__all__ = ["SdpaOverride", "override_sdpa", "routed_scaled_dot_product_attention"]


def routed_scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """What ``torch.nn.functional.scaled_dot_product_attention`` is while an
    override is installed: :func:`pyfastattn.scaled_dot_product_attention`,
    except for tensor subclasses with ``__torch_function__`` and nested
    tensors, which go to torch's own function."""
    qkv = (query, key, value)
    if (
        any(isinstance(t, torch.Tensor) and t.is_nested for t in qkv)
        or torch.overrides.has_torch_function(qkv)
        or (
            isinstance(attn_mask, torch.Tensor)
            and type(attn_mask) is not torch.Tensor
            and not _is_causal_bias(attn_mask)
            and torch.overrides.has_torch_function((attn_mask,))
        )
    ):
        return _torch_sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
    return scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )  # fmt: skip


def _is_causal_bias(mask) -> bool:
    try:
        from torch.nn.attention.bias import CausalBias
    except ImportError:  # pragma: no cover - torch without the bias module
        return False
    return isinstance(mask, CausalBias)


class SdpaOverride:
    """An installed override (see the module docstring). ``restore()`` (or
    leaving its ``with`` block) puts back the function it replaced; a second
    ``restore()`` does nothing."""

    def __init__(self) -> None:
        self._replaced = F.scaled_dot_product_attention
        self.active = True
        F.scaled_dot_product_attention = routed_scaled_dot_product_attention

    def restore(self) -> None:
        if not self.active:
            return
        if F.scaled_dot_product_attention is not routed_scaled_dot_product_attention:
            raise RuntimeError(
                "override_sdpa: torch.nn.functional.scaled_dot_product_attention was replaced again after this "
                "override was installed; restore the later replacement first"
            )
        self.active = False
        F.scaled_dot_product_attention = self._replaced

    def __enter__(self) -> SdpaOverride:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"SdpaOverride(active={self.active})"


def override_sdpa() -> SdpaOverride:
    """Install the override now; use the result as a context manager, or call
    its ``restore()``. See the module docstring for what it reaches."""
    return SdpaOverride()
