"""Sequence sharding for context parallelism: contiguous and zigzag layouts.

Zigzag (load-balanced) layout for ``P`` ranks: the sequence is cut into ``2P``
equal chunks and rank ``r`` holds chunks ``r`` and ``2P - 1 - r``, so under a
causal mask every rank does the same amount of work (an early chunk that sees
little paired with a late one that sees much). Contiguous layout: rank ``r``
holds the ``r``-th of ``P`` equal parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import InvalidArgumentError

__all__ = ["shard_sequence", "unshard_sequence", "padded_length", "local_chunks"]


def padded_length(seqlen: int, world_size: int, *, zigzag: bool = True) -> int:
    """The smallest length >= ``seqlen`` that the layout divides evenly."""
    unit = 2 * world_size if zigzag else world_size
    return -(-seqlen // unit) * unit


def local_chunks(rank: int, world_size: int, local_len: int, *, zigzag: bool) -> list[tuple[int, int, int]]:
    """``(local_start, global_start, length)`` of each contiguous piece of
    ``rank``'s shard, in the order the shard stores them."""
    if not zigzag:
        return [(0, rank * local_len, local_len)]
    c = local_len // 2
    return [(0, rank * c, c), (c, (2 * world_size - 1 - rank) * c, c)]


def _check_rank(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgumentError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def shard_sequence(
    x: torch.Tensor, rank: int, world_size: int, *, dim: int = 1, zigzag: bool = True, pad: bool = False
) -> torch.Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim`` (a pure function, no communication).

    ``zigzag=True`` gives the load-balanced layout (chunks ``rank`` and
    ``2*world_size - 1 - rank`` of ``2*world_size``), needed by
    ``ring_attention(causal=True)`` for balance; ``zigzag=False`` the
    contiguous one (what ``ulysses_attention`` takes). The length along ``dim``
    must be a multiple of ``2*world_size`` (zigzag) or ``world_size``;
    otherwise pass ``pad=True`` to zero-pad the end, and give the true length
    as ``seqlen=`` to ``ring_attention``/``ulysses_attention`` (padded keys
    are then masked out) and ``unshard_sequence`` (padded rows dropped).
    Returns a contiguous tensor.
    """
    _check_rank(rank, world_size)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = dim % x.dim()
    n = x.shape[dim]
    want = padded_length(n, world_size, zigzag=zigzag)
    if want != n:
        if not pad:
            unit = 2 * world_size if zigzag else world_size
            raise InvalidArgumentError(
                f"x.shape[{dim}] (sequence length {n}) must be a multiple of {unit} "
                f"({'2 * world_size for the zigzag layout' if zigzag else 'world_size'}); "
                f"pass pad=True to pad it to {want} and seqlen={n} to the attention call"
            )
        pads = [0, 0] * (x.dim() - 1 - dim) + [0, want - n]
        x = F.pad(x, pads)
    chunks = x.chunk(2 * world_size if zigzag else world_size, dim=dim)
    if not zigzag:
        return chunks[rank].contiguous()
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim=dim)


def unshard_sequence(
    shards: list[torch.Tensor] | tuple[torch.Tensor, ...],
    *,
    dim: int = 1,
    zigzag: bool = True,
    seqlen: int | None = None,
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: ``shards[r]`` is rank r's shard.
    ``seqlen`` drops the padding that ``shard_sequence(pad=True)`` added."""
    if not isinstance(shards, (list, tuple)) or not shards:
        raise InvalidArgumentError("shards must be a non-empty list of tensors, one per rank")
    p = len(shards)
    dim = dim % shards[0].dim()
    for r, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise InvalidArgumentError(
                f"shards[{r}].shape must equal shards[0].shape {tuple(shards[0].shape)}, got {tuple(s.shape)}"
            )
    if zigzag:
        if shards[0].shape[dim] % 2:
            raise InvalidArgumentError(
                f"zigzag shards must have an even length along dim {dim}, got {shards[0].shape[dim]}"
            )
        halves = [s.chunk(2, dim=dim) for s in shards]
        ordered = [halves[r][0] for r in range(p)] + [halves[r][1] for r in reversed(range(p))]
    else:
        ordered = list(shards)
    x = torch.cat(ordered, dim=dim)
    if seqlen is not None:
        if not 0 <= seqlen <= x.shape[dim]:
            raise InvalidArgumentError(f"seqlen must be in [0, {x.shape[dim]}], got {seqlen}")
        x = x.narrow(dim, 0, seqlen)
    return x
