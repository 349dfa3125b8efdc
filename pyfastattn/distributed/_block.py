"""One block of context-parallel attention: which keys of a key chunk a query
chunk sees (a *plan*), and the local forward/backward of that block through the
backend rule (compiled kernel or reference), with the forward's global LSE.

Positions are global sequence positions. A query at position ``qp`` sees a key
at ``kp`` iff ``kp < seqlen`` (the real length; pads beyond it are masked) and
``qp - wl <= kp <= qp + wr`` (a negative bound is unbounded; causal is
``wr = 0``). For a query chunk at ``qs`` and a key chunk at ``ks`` the kernel's
top-left window expresses this with the bounds shifted by ``d = qs - ks``:
``wl' = wl - d``, ``wr' = wr + d``. A block that no query sees is skipped; one
that every query sees fully runs without a window; a shifted bound that
comes out negative (a window edge that falls inside the block the "wrong" way)
cannot be written as a kernel window and uses a dense bool mask instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _backend, _ops, reference
from .. import functional as _functional


@dataclass(frozen=True)
class BlockPlan:
    q_start: int  # local row range of the query shard
    q_len: int
    k_start: int  # local row range of the key shard
    k_len: int
    window_left: int  # kernel window (top-left aligned), -1 = unbounded
    window_right: int
    n_valid: int  # real keys in the block (a prefix); < k_len where the block holds padding
    dense: tuple[int, int, int, int, int] | None  # (q_global, k_global, wl, wr, n_valid) for a mask


def plan_block(
    q_local: int, q_global: int, q_len: int, k_local: int, k_global: int, k_len: int,
    wl: int, wr: int, seqlen: int,
) -> BlockPlan | None:  # fmt: skip
    """The plan of one (query chunk, key chunk) pair, or None when no query sees any key."""
    n_valid = max(0, min(k_len, seqlen - k_global))
    if n_valid == 0 or q_len == 0:
        return None
    d = q_global - k_global
    wl_s = wl - d if wl >= 0 else None
    wr_s = wr + d if wr >= 0 else None
    if wr_s is not None and q_len - 1 + wr_s < 0:  # every key lies right of the window
        return None
    if wl_s is not None and wl_s < -(n_valid - 1):  # every key lies left of the window
        return None
    full_left = wl_s is None or wl_s >= q_len - 1
    full_right = wr_s is None or wr_s >= n_valid - 1
    kl = -1 if full_left else wl_s
    kr = -1 if full_right else wr_s
    dense = None
    if kl < -1 or kr < -1 or (not full_left and kl < 0) or (not full_right and kr < 0):
        dense = (q_global, k_global, wl, wr, n_valid)
        kl = kr = -1
    return BlockPlan(q_local, q_len, k_local, k_len, kl, kr, n_valid, dense)


def coalesce(plans: list[list[BlockPlan | None]], q_total: int, k_total: int) -> list[BlockPlan]:
    """Fewer, larger kernel calls: ``plans[i][j]`` is query chunk i x key chunk j.
    A key chunk that every query chunk sees fully becomes one call over all
    queries; then a query chunk that sees every key chunk fully one call over
    all keys; the rest stay as they are."""

    def full(p: BlockPlan | None) -> bool:
        return (
            p is not None
            and p.dense is None
            and p.window_left < 0
            and p.window_right < 0
            and p.n_valid == p.k_len
        )

    nq, nk = len(plans), len(plans[0])
    if all(full(p) for row in plans for p in row):
        return [BlockPlan(0, q_total, 0, k_total, -1, -1, k_total, None)]
    done = [[p is None for p in row] for row in plans]
    calls: list[BlockPlan] = []
    if nq > 1:
        for j in range(nk):
            if all(full(plans[i][j]) for i in range(nq)):
                p = plans[0][j]
                calls.append(BlockPlan(0, q_total, p.k_start, p.k_len, -1, -1, p.k_len, None))
                for i in range(nq):
                    done[i][j] = True
    for i in range(nq):
        if nk > 1 and all(full(plans[i][j]) for j in range(nk)) and not any(done[i]):
            p = plans[i][0]
            calls.append(BlockPlan(p.q_start, p.q_len, 0, k_total, -1, -1, k_total, None))
            done[i] = [True] * nk
            continue
        for j in range(nk):
            if not done[i][j]:
                calls.append(plans[i][j])
    return calls


def _dense_mask(plan: BlockPlan, device: torch.device) -> torch.Tensor:
    qg, kg, wl, wr, n_valid = plan.dense
    qp = torch.arange(qg, qg + plan.q_len, device=device).view(-1, 1)
    kp = torch.arange(kg, kg + plan.k_len, device=device).view(1, -1)
    vis = (kp - kg) < n_valid
    if wl >= 0:
        vis = vis & (kp >= qp - wl)
    if wr >= 0:
        vis = vis & (kp <= qp + wr)
    return vis.view(1, 1, plan.q_len, plan.k_len)


def _seqused(plan: BlockPlan, batch: int, device: torch.device) -> torch.Tensor | None:
    if plan.n_valid >= plan.k_len:
        return None
    return torch.full((batch,), plan.n_valid, dtype=torch.int32, device=device)


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local attention of ``q`` rows x ``k``/``v`` rows of ``plan`` -> (out, lse)
    for those query rows; ``q``/``k``/``v`` are the full local tensors."""
    qb = q.narrow(1, plan.q_start, plan.q_len)
    kb = k.narrow(1, plan.k_start, plan.k_len)
    vb = v.narrow(1, plan.k_start, plan.k_len)
    mask = None if plan.dense is None else _dense_mask(plan, q.device)
    return _functional._run(
        qb, kb, vb,
        attn_mask=mask, cu_seqlens_q=None, cu_seqlens_k=None,
        seqused_k=_seqused(plan, q.shape[0], q.device),
        max_seqlen_q=plan.q_len, max_seqlen_k=plan.k_len,
        scale=scale, softcap=softcap,
        window_left=plan.window_left, window_right=plan.window_right,
        bottom_right=False, dropout_p=0.0,
    )  # fmt: skip


def _use_kernel_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> bool:
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return False  # nothing to compute: the reference, as _functional._run does in the forward
    mode = _backend.get_backend()
    if mode == "reference" or not _ops.has_kernel("attention_bwd", q.device.type):
        return False
    return _functional.kernel_unsupported_reason(q, v, mask, 0.0, mode) is None


def block_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, plan: BlockPlan, scale: float, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) of one block given the *final* (merged) ``out`` and ``lse``
    of the query rows: with them, the block's probabilities are its share of
    the full softmax, and its gradients are exactly its share of the full
    gradients (the FlashAttention backward needs nothing else)."""
    sl = slice(plan.q_start, plan.q_start + plan.q_len)
    qb, dob, ob = q[:, sl], dout[:, sl], out[:, sl]
    lseb = lse[:, :, sl]
    kb = k.narrow(1, plan.k_start, plan.k_len)
    vb = v.narrow(1, plan.k_start, plan.k_len)
    mask = None if plan.dense is None else _dense_mask(plan, q.device)
    used = _seqused(plan, q.shape[0], q.device)
    if _use_kernel_backward(qb, kb, vb, mask):
        try:
            return torch.ops.pyfastattn.attention_bwd(
                dob, qb, kb, vb, ob, lseb, mask, None, None, used, plan.q_len, plan.k_len,
                scale, softcap, plan.window_left, plan.window_right, False,
                torch.are_deterministic_algorithms_enabled(),
            )  # fmt: skip
        except RuntimeError as e:
            if q.device.type != "cuda" or "does not support this case" not in str(e):
                raise
            if _backend.get_backend() == "kernel":
                raise
            _backend.note_fallback(str(e).split(": ", 1)[-1])
    return _reference_block_backward(dob, qb, kb, vb, ob, lseb, mask, used, plan, scale, softcap)


def _reference_block_backward(dout, q, k, v, out, lse, mask, used, plan, scale, softcap):
    """The same as the kernel backward, in plain PyTorch (fp32; fp64 for fp64)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    qf = q.to(cdt).transpose(1, 2)
    kf = k.to(cdt).transpose(1, 2).repeat_interleave(g, 1)
    vf = v.to(cdt).transpose(1, 2).repeat_interleave(g, 1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = t * softcap
    len_k = torch.full((b,), sk, device=q.device) if used is None else used.long()
    vis = reference._visible(sq, sk, len_k, plan.window_left, plan.window_right, False, q.device)
    if mask is not None:
        vis = vis & mask
    lse_c = lse.to(cdt).unsqueeze(-1)
    vis = vis & torch.isfinite(lse_c)
    p = torch.where(
        vis, torch.exp(s - torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))), 0.0
    )
    do = dout.to(cdt).transpose(1, 2)
    o = out.to(cdt).transpose(1, 2)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    if t is not None:
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    dk = dk.view(b, hk, g, sk, k.shape[-1]).sum(2)  # explicit sizes: -1 is ambiguous for 0 elements
    dv = dv.view(b, hk, g, sk, v.shape[-1]).sum(2)
    return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)
