"""Drop-in ``torch.nn`` modules built on the fused ops.

* :class:`MultiheadAttention`, :class:`TransformerEncoderLayer`,
  :class:`TransformerDecoderLayer`, :class:`TransformerEncoder`,
  :class:`TransformerDecoder`, :class:`Transformer` - same constructor
  arguments, forward signature and ``state_dict`` as their ``torch.nn``
  namesakes (they subclass them).
* :class:`Linear` - ``torch.nn.Linear`` on :func:`pyfastattn.linear` (the
  faster CPU GEMM for fp32 on AMD and fp16; ``F.linear`` everywhere else).
* :class:`FeedForward` - the FFN block, plain (``fc1``/``fc2``) or gated
  (``gate_proj``/``up_proj``/``down_proj``, LLaMA names), with conversion
  helpers ``FeedForward.from_sequential`` and ``FeedForward.from_llama_mlp``.
"""

from .attention import MultiheadAttention
from .feed_forward import FeedForward, activation_of
from .linear import Linear
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "FeedForward",
    "Linear",
    "MultiheadAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "activation_of",
]
