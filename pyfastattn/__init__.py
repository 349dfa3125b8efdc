"""pyfastattn: fused attention and feed-forward kernels for PyTorch.

Public API:

* :func:`scaled_dot_product_attention` - a drop-in for
  ``torch.nn.functional.scaled_dot_product_attention``.
* :func:`override_sdpa` - make ``torch.nn.functional.scaled_dot_product_attention``
  itself run the drop-in, for a ``with`` block or until restored.
* :func:`attention` - the native (FlashAttention-style) API: (B, S, H, D) or
  packed varlen, bottom-right causal, GQA, sliding window, softcap, LSE.
* :func:`attention_with_kvcache` - attention over a KV cache (FlashAttention 2's
  ``flash_attn_with_kvcache``): in-place append, rotary, paged blocks, split-KV.
* :mod:`pyfastattn.flash_attn_interface` - FlashAttention 2's public functions.
* :func:`canonical_attention` - the canonical form both meet in ((B, S, H, D)
  views plus a mask description), used by the modules and integrations.
* :class:`InvalidArgumentError` - raised for bad arguments (a ``RuntimeError``
  and a ``ValueError``).
* :func:`backend`, :func:`set_backend`, :func:`get_backend` - the backend rule
  (``auto`` / ``kernel`` / ``reference``, also ``PYFASTATTN_BACKEND``).
* :func:`feed_forward`, :func:`gated_feed_forward` - the fused FFN (plain and
  SwiGLU/GeGLU), with ``pyfastattn.nn.FeedForward`` as the module.
* :func:`linear` - ``F.linear`` on pyfastattn's CPU GEMM where it is the
  faster one (fp32 on AMD with AVX-512, fp16 on any AVX-512 CPU), used by the
  modules' projections.
* :mod:`pyfastattn.nn` - drop-in ``torch.nn`` attention, Transformer and FFN modules.
* :func:`patch` - convert a model's ``torch.nn`` attention/Transformer modules in place.
* :mod:`pyfastattn.reference` - the pure-PyTorch truth.
"""

from . import ffn, nn, reference
from ._backend import BACKENDS, backend, get_backend, set_backend
from ._linear import linear
from .ffn import feed_forward, ffn_unsupported_reason, gated_feed_forward
from .functional import (
    InvalidArgumentError,
    attention,
    canonical_attention,
    kernel_unsupported_reason,
    scaled_dot_product_attention,
)
from .kvcache import attention_with_kvcache
from .patch import PatchReport, patch
from .sdpa_override import override_sdpa

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "InvalidArgumentError",
    "PatchReport",
    "attention",
    "attention_with_kvcache",
    "canonical_attention",
    "backend",
    "feed_forward",
    "ffn",
    "ffn_unsupported_reason",
    "gated_feed_forward",
    "get_backend",
    "kernel_unsupported_reason",
    "linear",
    "nn",
    "override_sdpa",
    "patch",
    "reference",
    "scaled_dot_product_attention",
    "set_backend",
]
