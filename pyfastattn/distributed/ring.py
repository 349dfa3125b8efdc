"""Ring attention: context parallelism by passing K/V blocks around a ring.

Each rank holds a shard of the sequence (queries, keys and values alike). In
``P`` steps every rank's K/V block visits every rank: at step ``t`` rank ``r``
holds the block of rank ``r - t``; it starts sending that block on to
``r + 1`` (and receiving the next from ``r - 1``) with
``torch.distributed.batch_isend_irecv``, computes its queries against the
block it holds while the transfer runs, and merges the partial result into its
running (out, lse) with :func:`merge_attention_states`.

The backward runs the ring again. Each rank recomputes nothing: it calls the
kernel backward per block with the *final* out and lse, adds dQ locally, and
adds the block's dK/dV to an fp32 accumulator that travels with the block; a
last hop brings every accumulator home. K and V travel as one packed buffer
(only the Hk key/value heads: GQA ships Hk, not Hq), the dK/dV accumulator as
one fp32 buffer.

Numerics: blocks are merged in fp32; the output is rounded to the input dtype
once. dQ and dK/dV are summed in fp32 from the per-block kernel gradients
(which the kernel rounds to the input dtype).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from .. import functional as _functional
from ..functional import InvalidArgumentError
from . import _comm
from ._block import block_backward, block_forward, coalesce, plan_block
from .layout import local_chunks
from .merge import merge_attention_states

__all__ = ["ring_attention", "RingTimers"]


class RingTimers:
    """Optional instrumentation (for the benchmark). ``compute``: seconds in
    the local kernels and merges; ``wait``: seconds blocked on transfers;
    ``posts[i]`` / ``waits[i]``: wall-clock (``time.time()``) moment transfer
    ``i`` was posted and the (start, end) of the wait for it. Every rank posts
    its transfers in the same order, so transfer ``i`` of a rank receives what
    transfer ``i`` of the previous rank sent: :meth:`exposed` uses that to
    separate waiting for the wire from waiting for a slower rank.
    Pass one as ``ring_attention(..., timers=t)``."""

    def __init__(self) -> None:
        self.compute = 0.0
        self.wait = 0.0
        self.posts: list[float] = []
        self.waits: list[tuple[float, float]] = []

    def reset(self) -> None:
        self.__init__()

    def exposed(self, prev_posts: list[float]) -> float:
        """Seconds of waiting that the transfer itself caused: for each
        transfer, the part of the wait after both this rank started waiting
        and the previous rank had posted the matching send (same host clock)."""
        return sum(max(0.0, end - max(start, post)) for (start, end), post in zip(self.waits, prev_posts))


class _Ring:
    """The ring of one process group: peers, and one transfer step."""

    def __init__(self, group) -> None:
        self.group = group
        self.world, self.rank = _comm.group_info(group)
        self.next = _comm.global_rank(group, (self.rank + 1) % self.world)
        self.prev = _comm.global_rank(group, (self.rank - 1) % self.world)

    def start(self, send: torch.Tensor, timers: RingTimers | None) -> tuple[torch.Tensor, tuple[list, int]]:
        """Send ``send`` to the next rank and receive a tensor like it from the
        previous one; returns (receive buffer, handle for :meth:`wait`)."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        idx = -1
        if timers is not None:
            idx = len(timers.posts)
            timers.posts.append(time.time())
            timers.waits.append((0.0, 0.0))
        return recv, (dist.batch_isend_irecv(ops), idx)

    @staticmethod
    def wait(handle: tuple[list, int], timers: RingTimers | None) -> None:
        reqs, idx = handle
        t0 = time.time() if timers is not None else 0.0
        for r in reqs:
            r.wait()
        if timers is not None:
            t1 = time.time()
            timers.wait += t1 - t0
            timers.waits[idx] = (t0, t1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators: fp32, or fp64 for fp64 inputs (which run on the reference path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# A rank whose local work raises (a kernel error, out of memory) must not
# raise at once: its neighbours wait for the hops it would still send, so they
# hung, and its own posted sends / receives were left unwaited, to be matched
# by the next call on the group. It keeps passing the blocks on (computing
# nothing more) until the ring ends and raises then. The other ranks' outputs
# stay right (the K/V blocks travel unchanged); in the backward, the dK/dV
# accumulators that pass through the failing rank become NaN rather than
# silently lacking its share.


def _forward_step(q, kb, vb, plans, out_acc, lse_acc, scale, softcap):
    """Merges q x (kb, vb) over ``plans`` into the running (out, lse)."""
    s_local = q.shape[1]
    for plan in plans:
        o, lse = block_forward(q, kb, vb, plan, scale, softcap)
        sl = slice(plan.q_start, plan.q_start + plan.q_len)
        if plan.q_len == s_local:
            out_acc, lse_acc = merge_attention_states(out_acc, lse_acc, o, lse)
        else:
            mo, ml = merge_attention_states(out_acc[:, sl], lse_acc[:, :, sl], o, lse)
            out_acc[:, sl] = mo
            lse_acc[:, :, sl] = ml
    return out_acc, lse_acc


def _backward_step(dout, q, kb, vb, out, lse, plans, dq, contrib, scale, softcap):
    """Adds the blocks' dQ into ``dq`` and dK|dV into ``contrib`` (in place)."""
    dk_dim = kb.shape[-1]
    for plan in plans:
        dqb, dkb, dvb = block_backward(dout, q, kb, vb, out, lse, plan, scale, softcap)
        dq[:, plan.q_start : plan.q_start + plan.q_len] += dqb
        rows = contrib[:, plan.k_start : plan.k_start + plan.k_len]
        rows[..., :dk_dim] += dkb
        rows[..., dk_dim:] += dvb


def _plans(rank: int, src: int, world: int, s_local: int, zigzag: bool, wl: int, wr: int, seqlen: int):
    qc = local_chunks(rank, world, s_local, zigzag=zigzag)
    kc = local_chunks(src, world, s_local, zigzag=zigzag)
    plans = [[plan_block(ql, qg, qn, kl, kg, kn, wl, wr, seqlen) for kl, kg, kn in kc] for ql, qg, qn in qc]
    return coalesce(plans, s_local, s_local)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, scale, softcap, wl, wr, zigzag, seqlen, timers):
        b, s_local, hq, _ = q.shape
        dk_dim, dv_dim = k.shape[-1], v.shape[-1]
        kv = torch.cat([k, v], dim=-1).contiguous()  # one message per step
        # The kernels read rows with a unit stride in the head dim; the
        # forward's _run would copy q per block, but the backward passes the
        # saved q to attention_bwd directly, which refuses any other stride.
        q = q if q.stride(-1) == 1 else q.contiguous()
        acc = _acc_dtype(q.dtype)
        out_acc = torch.zeros(b, s_local, hq, dv_dim, dtype=acc, device=q.device)
        lse_acc = torch.full((b, hq, s_local), float("-inf"), dtype=acc, device=q.device)
        world, rank = ring.world, ring.rank
        err = None  # a local error, raised after the ring (see _forward_step)
        for step in range(world):
            src = (rank - step) % world
            pending = ring.start(kv, timers) if step + 1 < world else None
            t0 = time.perf_counter() if timers is not None else 0.0
            kb, vb = kv[..., :dk_dim], kv[..., dk_dim:]
            plans = _plans(rank, src, world, s_local, zigzag, wl, wr, seqlen)
            if err is None:  # after a local error: pass the blocks on, compute nothing
                try:
                    out_acc, lse_acc = _forward_step(q, kb, vb, plans, out_acc, lse_acc, scale, softcap)
                except Exception as e:  # noqa: BLE001 - raised once the ring has drained
                    err = e
            if timers is not None:
                timers.compute += time.perf_counter() - t0
            if pending is not None:
                kv, reqs = pending
                ring.wait(reqs, timers)
        if err is not None:
            raise err
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.args = (ring, scale, softcap, wl, wr, zigzag, seqlen, timers)
        ctx.mark_non_differentiable(lse_acc)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale, softcap, wl, wr, zigzag, seqlen, timers = ctx.args
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        b, s_local, hq, _ = q.shape
        dk_dim = k.shape[-1]
        kv = torch.cat([k, v], dim=-1).contiguous()
        acc_dtype = _acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dkv = None  # fp32 dK|dV accumulator of the block held now
        dkv_pending = None  # the accumulator arriving from the previous rank
        world, rank = ring.world, ring.rank
        err = None  # a local error, raised after the ring (see _forward_step)
        for step in range(world):
            src = (rank - step) % world
            kv_pending = ring.start(kv, timers) if step + 1 < world else None
            t0 = time.perf_counter() if timers is not None else 0.0
            kb, vb = kv[..., :dk_dim], kv[..., dk_dim:]
            contrib = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)
            plans = _plans(rank, src, world, s_local, zigzag, wl, wr, seqlen)
            if err is None:
                try:
                    _backward_step(dout, q, kb, vb, out, lse, plans, dq, contrib, scale, softcap)
                except Exception as e:  # noqa: BLE001 - raised once the ring has drained
                    err = e
            if err is not None:  # the block's dK/dV lack this rank's share: poison, don't drop it
                contrib.fill_(float("nan"))
            if timers is not None:
                timers.compute += time.perf_counter() - t0
            if dkv_pending is not None:  # the accumulator of this block so far
                incoming, handle = dkv_pending
                ring.wait(handle, timers)
                contrib += incoming
            dkv = contrib
            # Pass the accumulator on with the block: the next rank holds this
            # block in the next step. After the last step it goes home.
            if world > 1:
                dkv_pending = ring.start(dkv, timers)
            if kv_pending is not None:
                kv, reqs = kv_pending
                ring.wait(reqs, timers)
        if world > 1:
            dkv, reqs = dkv_pending
            ring.wait(reqs, timers)
        if err is not None:
            raise err
        dk = dkv[..., :dk_dim].to(k.dtype)
        dv = dkv[..., dk_dim:].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None, None, None, None


def ring_attention(
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
    zigzag: bool = True,
    seqlen: int | None = None,
    timers: RingTimers | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a sequence sharded across the ranks of ``group``.

    ``q`` (B, S_local, Hq, D), ``k`` (B, S_local, Hk, D), ``v`` (B, S_local,
    Hk, Dv): this rank's shard, as made by :func:`shard_sequence` with the same
    ``zigzag`` (default: the load-balanced zigzag layout). Hq must be a
    multiple of Hk (GQA/MQA: only the Hk heads travel). Returns this rank's
    shard of the output (B, S_local, Hq, Dv), and with ``return_lse`` its
    log-sum-exp (B, Hq, S_local) fp32, equal (within rounding) to running
    :func:`pyfastattn.attention` on the full sequence and sharding the result.
    ``causal`` and ``window_size`` use global positions (the full sequence is
    square, so top-left and bottom-right alignment agree). ``seqlen``: the
    real global length when the shards were padded (``shard_sequence(...,
    pad=True)``); keys at positions >= seqlen are masked out. Differentiable
    in q, k, v. Every rank of the group must call it with the same shapes and
    options (checked with one small all-gather unless
    ``PYFASTATTN_CP_CHECK=0``).
    """
    b, s_local, hq, hk, d = _comm.check_local_shards(q, k, v)
    _functional._check_window_softcap_scale(window_size, softcap, softmax_scale)  # as attention() checks them
    world, _ = _comm.group_info(group)
    if zigzag and s_local % 2:
        raise InvalidArgumentError(
            f"with zigzag=True the local sequence length must be even (two chunks per rank), got {s_local}; "
            "shard with shard_sequence(..., pad=True) and pass seqlen="
        )
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
    wl, wr = (wl if wl >= 0 else -1), (wr if wr >= 0 else -1)
    scale = (1.0 / math.sqrt(d) if d > 0 else 1.0) if softmax_scale is None else float(softmax_scale)
    _comm.check_across_ranks(
        group, "ring_attention",
        [b, s_local, hq, hk, d, v.shape[-1], _comm.dtype_code(q.dtype), int(zigzag), wl, wr, seqlen, world,
         scale, float(softcap), _comm.needs_grad(q, k, v)],
        ["batch", "S_local", "q heads", "k heads", "head dim", "v head dim", "dtype", "zigzag",
         "window left (causal: right = 0)", "window right", "seqlen", "world size", "softmax_scale", "softcap",
         "requires grad (grad mode and q, k or v requiring grad)"],
        q.device,
    )  # fmt: skip
    ring = _Ring(group)
    out, lse = _RingAttention.apply(
        q, k, v, ring, scale, float(softcap), wl, wr, bool(zigzag), seqlen, timers
    )
    return (out, lse) if return_lse else out
