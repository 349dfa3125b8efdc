"""Context-parallel attention over ``torch.distributed`` (any backend: gloo, NCCL).

* :func:`merge_attention_states` - combine two partial attentions by their LSE
  (a compiled CPU/CUDA op, differentiable).
* :func:`ring_attention` - K/V blocks travel around a ring of ranks
  (point-to-point, overlapped with the local kernel); causal uses the zigzag
  (load-balanced) layout.
* :func:`ulysses_attention` - all-to-all from sequence shards to head shards
  around the local kernel (DeepSpeed Ulysses).
* :func:`shard_sequence`, :func:`unshard_sequence` - the layouts, as pure functions.
* :func:`context_parallel` - run ``pyfastattn.nn`` attention layers context-parallel.

See ``docs/context_parallel.md``.
"""

from .context import context_parallel, current_context
from .layout import padded_length, shard_sequence, unshard_sequence
from .merge import merge_attention_states, merge_attention_states_reference
from .ring import RingTimers, ring_attention
from .ulysses import ulysses_attention

__all__ = [
    "RingTimers",
    "context_parallel",
    "current_context",
    "merge_attention_states",
    "merge_attention_states_reference",
    "padded_length",
    "ring_attention",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
]
