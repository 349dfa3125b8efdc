"""torch.distributed helpers shared by ring and Ulysses attention: the group's
size and rank, peers as global ranks, and the cross-rank input check."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..functional import InvalidArgumentError

# One small all-gather per call compares every rank's shapes and options, so a
# mismatch fails with a message instead of a hang or garbage. It costs one
# collective (and on NCCL a device sync); PYFASTATTN_CP_CHECK=0 turns it off.
CHECK_ACROSS_RANKS = os.environ.get("PYFASTATTN_CP_CHECK", "1") != "0"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def check_local_shards(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Checks one rank's (B, S_local, H, D) shards of q, k, v (ring and Ulysses
    take the same); returns ``(b, s_local, hq, hk, d)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InvalidArgumentError(
                f"{name} must have 4 dims (B, S_local, H, D), got {t.dim()} (shape {tuple(t.shape)})"
            )
    if not q.dtype.is_floating_point:  # here, before any communication: a block would raise mid-ring
        raise InvalidArgumentError(f"q.dtype must be a floating-point dtype, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise InvalidArgumentError(
                f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}"
            )
    b, s_local, hq, d = q.shape
    hk = k.shape[2]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[1] != s_local:
        raise InvalidArgumentError(
            f"k and v must be (B={b}, S_local={s_local}, Hk, *) like q, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[-1] != d:
        raise InvalidArgumentError(f"k.shape[-1] must equal q.shape[-1] ({d}), got {k.shape[-1]}")
    if hk == 0 or hq % hk:
        raise InvalidArgumentError(f"q heads ({hq}) must be a multiple of k heads ({hk})")
    return b, s_local, hq, hk, d


def needs_grad(*tensors: torch.Tensor) -> int:
    """1 when this call will build a graph (so every rank must run the
    backward's communication), else 0: compared across ranks, since a rank
    alone in its backward would wait for the others forever."""
    return int(torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def group_info(group) -> tuple[int, int]:
    """(world size, rank in group); clear error without an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context-parallel attention needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group), got none"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group, group_rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def check_across_ranks(
    group, what: str, values: list[int | float], names: list[str], device: torch.device
) -> None:
    """Raise on every rank if ``values`` differ between ranks (names say which).
    Ints (shapes, lengths, codes: far below 2**53) and floats (softmax scale,
    softcap) travel exactly as float64."""
    if not CHECK_ACROSS_RANKS:
        return
    world, rank = group_info(group)
    if world == 1:
        return
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(x) for x in values], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(gathered, t, group=group)
    table = torch.stack(gathered).cpu().tolist()
    for i, name in enumerate(names):
        col = [type(values[i])(row[i]) for row in table]  # printed as given: 4, not 4.0
        if any(c != col[0] for c in col):
            raise InvalidArgumentError(
                f"{what}: {name} must be the same on every rank of the group, got "
                + ", ".join(f"rank {r}: {c}" for r, c in enumerate(col))
            )


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.get(dtype, 99)
