"""``context_parallel``: run ``pyfastattn.nn`` attention layers context-parallel.

Inside ``with context_parallel(group, method="ring"):`` every attention call of
``pyfastattn.nn.MultiheadAttention`` (and so of the Transformer layers and of
models converted with ``pyfastattn.patch``) treats its inputs as this rank's
shard of the sequence and runs :func:`ring_attention` or
:func:`ulysses_attention` over ``group``. Everything else in a Transformer
layer (projections, FFN, norms) is per token and needs no change. The modules
see it through one hook in ``pyfastattn/nn/attention.py``: the module global
``_context_parallel_hook``, which ``MultiheadAttention.forward`` calls instead
of ``attend`` when it is set (and ``explicit_attention``, the
``need_weights=True`` path, refuses under); this context manager sets and
restores it.

Layout: shard the inputs with ``shard_sequence(x, rank, P, dim=..., zigzag=cp.zigzag)``
(``zigzag`` is True for the ring by default, False for Ulysses) and gather
the outputs with ``unshard_sequence``. Supported under the context: self- or
cross-attention with equal sharded lengths, ``is_causal=True`` (a global causal
mask) or no mask, ``need_weights=False`` (what the Transformer layers pass).
Dense masks, key-padding masks, attention dropout and ``need_weights=True``
raise, since they would need the full sequence on one rank; padded shards are
handled with ``seqlen=``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..functional import InvalidArgumentError
from ..nn import attention as _nn_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["ContextParallel", "context_parallel", "current_context"]

METHODS = ("ring", "ulysses")


@dataclass(frozen=True)
class ContextParallel:
    """What ``context_parallel`` set: the group, the method, the layout and the real length."""

    group: dist.ProcessGroup | None
    method: str
    zigzag: bool
    seqlen: int | None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        seqused_k: torch.Tensor | None = None,
        causal: bool = False,
        bottom_right: bool = False,
        scale: float | None = None,
        softcap: float = 0.0,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        """The hook ``pyfastattn.nn.MultiheadAttention`` calls in place of
        ``pyfastattn.nn.attention.attend`` (same signature): canonical
        (B, S_local, H, D) shards in, this rank's output shard out."""
        where = f"pyfastattn.distributed.context_parallel(method={self.method!r})"
        if mask is not None or seqused_k is not None:
            raise InvalidArgumentError(
                f"{where}: attn_mask / key_padding_mask are not supported (a dense mask spans ranks); "
                "use is_causal=True for a causal mask, or pad the shards and pass seqlen= to context_parallel"
            )
        if dropout_p > 0:
            raise InvalidArgumentError(
                f"{where}: attention dropout is not supported, got dropout_p={dropout_p} (use eval() or dropout=0)"
            )
        if q.shape[1] != k.shape[1]:
            raise InvalidArgumentError(
                f"{where}: query and key shards must have the same length, got {q.shape[1]} and {k.shape[1]}"
            )
        if self.method == "ring":
            return ring_attention(
                q, k, v, self.group, causal=causal, softmax_scale=scale, softcap=softcap,
                zigzag=self.zigzag, seqlen=self.seqlen,
            )  # fmt: skip
        return ulysses_attention(
            q, k, v, self.group, causal=causal, softmax_scale=scale, softcap=softcap, seqlen=self.seqlen
        )


def current_context() -> ContextParallel | None:
    """The active :class:`ContextParallel`, or None outside ``context_parallel``."""
    hook = _nn_attention._context_parallel_hook
    return getattr(hook, "__self__", None)


@contextlib.contextmanager
def context_parallel(
    group: dist.ProcessGroup | None = None,
    method: str = "ring",
    *,
    zigzag: bool | None = None,
    seqlen: int | None = None,
) -> Iterator[ContextParallel]:
    """Run ``pyfastattn.nn`` attention context-parallel over ``group`` inside the block.

    ``method``: ``"ring"`` (:func:`ring_attention`, any head count) or
    ``"ulysses"`` (:func:`ulysses_attention`, heads divisible by the group
    size). ``zigzag``: the layout the inputs were sharded with (default: True
    for the ring, False for Ulysses, which supports only False). ``seqlen``:
    the real global length if the shards were padded. Yields the
    :class:`ContextParallel` in effect. Nests; restores the previous state on exit.
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    if zigzag is None:
        zigzag = method == "ring"
    if method == "ulysses" and zigzag:
        raise InvalidArgumentError("method='ulysses' takes contiguous shards: zigzag must be False, got True")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel needs an initialised torch.distributed process group, got none")
    cp = ContextParallel(group, method, bool(zigzag), seqlen)
    old = _nn_attention._context_parallel_hook
    _nn_attention._context_parallel_hook = cp.attend
    try:
        yield cp
    finally:
        _nn_attention._context_parallel_hook = old
