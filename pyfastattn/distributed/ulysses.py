"""Ulysses (DeepSpeed) attention: context parallelism by all-to-all.

Each rank holds a contiguous sequence shard of every head. One all-to-all
re-shards q, k, v from (full heads, S/P rows) to (H/P heads, all S rows), each
rank runs the local kernel on its heads over the whole sequence, and a second
all-to-all brings the output back to sequence shards. The backward is the same
two all-to-alls in reverse around the kernel backward.

Heads: Hq must be a multiple of the group size P. Hk may be a multiple of P,
or divide P: then each key/value head is replicated P/Hk times before the
all-to-all (its gradient summed back), so that every rank gets the one
key/value head its query heads use. Anything else raises.

An error only one rank meets in its local kernel (forward or backward) is
raised on that rank after it has run the all-to-alls the others wait in: the
others get NaN where that rank's heads go (forward output, or input
gradients), no hang inside the call, and the group stays usable.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import functional as _functional
from ..functional import InvalidArgumentError
from . import _comm

__all__ = ["ulysses_attention"]


def _a2a(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """(B, S/P, H, D) sequence shard -> (B, S, H/P, D) head shard."""
    b, s, h, d = x.shape
    send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, s, h/P, d]
    recv = _a2a(send, group)  # recv[j]: rank j's rows of my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def _head_to_seq(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """(B, S, H/P, D) head shard -> (B, S/P, H, D) sequence shard."""
    b, s_full, hp, d = x.shape
    s = s_full // world
    send = x.reshape(b, world, s, hp, d).permute(1, 0, 2, 3, 4).contiguous()  # [P, B, s, h/P, d]
    recv = _a2a(send, group)  # recv[j]: my rows of rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, world * hp, d)


class _Failure:
    """This rank's local-kernel error, held until the rank has run every
    collective the other ranks expect from it in this pass, then raised."""

    def __init__(self) -> None:
        self.error: BaseException | None = None


class _SeqToHead(torch.autograd.Function):
    """q, k and v to head shards in one node: its backward (three
    all-to-alls) runs once on every rank whichever input gradients are asked
    for, and afterwards raises an error the local backward met."""

    @staticmethod
    def forward(ctx, q, k, v, world, group, failure):
        ctx.world, ctx.group, ctx.failure = world, group, failure
        ctx.shapes = (q.shape, k.shape, v.shape)
        ctx.dtype, ctx.device = q.dtype, q.device
        return tuple(_seq_to_head(t, world, group) for t in (q, k, v))

    @staticmethod
    def backward(ctx, gq, gk, gv):
        grads = []
        for g, shape_in in zip((gq, gk, gv), ctx.shapes):
            b, s, h, d = shape_in
            if g is None:  # a head-shard gradient nobody produced: zeros, same collective
                g = torch.zeros(b, s * ctx.world, h // ctx.world, d, dtype=ctx.dtype, device=ctx.device)
            grads.append(_head_to_seq(g.contiguous(), ctx.world, ctx.group))
        if ctx.failure.error is not None:
            raise ctx.failure.error
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])), None, None, None)


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world, group):
        ctx.world, ctx.group = world, group
        return _head_to_seq(x, world, group)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_head(g.contiguous(), ctx.world, ctx.group), None, None


def _run_local(qh, kh, vh, **kw):
    """The local attention over this rank's heads (a seam for the tests)."""
    return _functional._run(qh, kh, vh, **kw)


class _LocalAttention(torch.autograd.Function):
    """The local kernel as one node whose backward cannot end this rank's
    backward early: an error there becomes NaN gradients (the other ranks'
    share of them visibly wrong, not short) and is raised by _SeqToHead after
    the all-to-alls the other ranks wait for."""

    @staticmethod
    def forward(ctx, qh, kh, vh, kw, failure, build_graph):
        with torch.enable_grad():  # off inside forward; on here only for the caller's graph
            ins = [t.detach().requires_grad_(build_graph and t.requires_grad) for t in (qh, kh, vh)]
            out, lse = _run_local(*ins, **kw)
        ctx.ins, ctx.out, ctx.failure = ins, out, failure
        lse = lse.detach()
        ctx.mark_non_differentiable(lse)
        return out.detach(), lse

    @staticmethod
    def backward(ctx, g_out, _g_lse):
        want = [t for t in ctx.ins if t.requires_grad]
        try:
            got = list(torch.autograd.grad(ctx.out, want, g_out))
        except Exception as e:  # noqa: BLE001 -- raised after the collectives
            ctx.failure.error = e
            got = [torch.full_like(t, float("nan")) for t in want]
        it = iter(got)
        return (*(next(it) if t.requires_grad else None for t in ctx.ins), None, None, None)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    seqlen: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a sequence sharded contiguously across ``group``.

    ``q`` (B, S_local, Hq, D), ``k``/``v`` (B, S_local, Hk, D/Dv): this
    rank's contiguous shard (``shard_sequence(..., zigzag=False)``). Returns
    its shard of the output (B, S_local, Hq, Dv) and with ``return_lse`` the
    lse (B, Hq, S_local) fp32. Needs Hq % P == 0 and either Hk % P == 0 or
    P % Hk == 0 (P = group size). ``seqlen`` masks padded keys (see
    :func:`shard_sequence`). ``causal``/``window_size`` are on global
    positions. Differentiable in q, k, v.
    """
    b, s_local, hq, hk, d = _comm.check_local_shards(q, k, v)
    world, _ = _comm.group_info(group)
    if hq % world:
        raise InvalidArgumentError(
            f"ulysses_attention needs q heads divisible by the group size: Hq = {hq}, group size = {world} "
            "(use ring_attention, or a group whose size divides the head count)"
        )
    if hk % world and world % hk:
        raise InvalidArgumentError(
            f"ulysses_attention needs k heads to be a multiple or a divisor of the group size: "
            f"Hk = {hk}, group size = {world}"
        )
    _functional._check_window_softcap_scale(window_size, softcap, softmax_scale)  # as attention() checks them
    total = world * s_local
    if seqlen is None:
        seqlen = total
    if not isinstance(seqlen, int) or not 0 <= seqlen <= total:
        raise InvalidArgumentError(
            f"seqlen must be an int in [0, world_size * S_local = {total}], got {seqlen!r}"
        )
    wl, wr = int(window_size[0]), int(window_size[1])
    if causal:
        wr = 0
    scale = (1.0 / math.sqrt(d) if d > 0 else 1.0) if softmax_scale is None else float(softmax_scale)
    _comm.check_across_ranks(
        group, "ulysses_attention",
        [b, s_local, hq, hk, d, v.shape[-1], _comm.dtype_code(q.dtype), wl, wr, seqlen, world,
         scale, float(softcap), _comm.needs_grad(q, k, v), int(bool(return_lse))],
        ["batch", "S_local", "q heads", "k heads", "head dim", "v head dim", "dtype",
         "window left", "window right (causal: 0)", "seqlen", "world size", "softmax_scale", "softcap",
         "requires grad (grad mode and q, k or v requiring grad)", "return_lse"],
        q.device,
    )  # fmt: skip
    if hk < world:  # replicate each K/V head so every rank gets the one its q heads use
        k = k.repeat_interleave(world // hk, dim=2)
        v = v.repeat_interleave(world // hk, dim=2)
    failure = _Failure()
    qh, kh, vh = _SeqToHead.apply(q, k, v, world, group, failure)
    used = None
    if seqlen < total:
        used = torch.full((b,), seqlen, dtype=torch.int32, device=q.device)
    kw = dict(
        attn_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=used,
        max_seqlen_q=total, max_seqlen_k=total,
        scale=scale, softcap=float(softcap),
        window_left=wl if wl >= 0 else -1, window_right=wr if wr >= 0 else -1,
        bottom_right=False, dropout_p=0.0,
    )  # fmt: skip
    try:
        out_h, lse_h = _LocalAttention.apply(qh, kh, vh, kw, failure, torch.is_grad_enabled())
    except Exception as e:  # noqa: BLE001 -- raised after the all-to-alls the others wait in
        failure.error = e
        out_h = qh.new_full((*qh.shape[:3], v.shape[-1]), float("nan")).detach()
        lse_h = torch.full((b, qh.shape[2], total), float("nan"), dtype=torch.float32, device=q.device)
    if failure.error is not None:  # this rank stops here, after the same collectives as the others
        _head_to_seq(out_h, world, group)
        if return_lse:
            _head_to_seq(lse_h.transpose(1, 2).unsqueeze(-1).contiguous(), world, group)
        raise failure.error
    out = _HeadToSeq.apply(out_h, world, group)
    if not return_lse:
        return out
    with torch.no_grad():  # (B, Hq/P, S) -> (B, Hq, S_local), as (B, S, Hq/P, 1) rows
        lse = _head_to_seq(lse_h.detach().transpose(1, 2).unsqueeze(-1).contiguous(), world, group)
        lse = lse.squeeze(-1).transpose(1, 2).contiguous()
    return out, lse
