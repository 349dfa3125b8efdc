"""Test helpers: the tolerance rule, input factories, a low-precision baseline."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import torch

from pyfastattn import reference
from pyfastattn.testing import max_error, tolerance_failure

HAS_CUDA = torch.cuda.is_available()


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    err = max_error(a, ref)
    assert not math.isnan(err), (
        f"NaN pattern differs: {torch.isnan(a).sum().item()} NaN vs {torch.isnan(ref).sum().item()} in reference"
    )
    return err


def assert_tolerance(name: str, out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor | None, dtype):
    """The tolerance rule of pyfastattn.testing (print max and mean error on failure)."""
    failure = tolerance_failure(name, out, ref, baseline, dtype)
    assert failure is None, failure


def naive_attention(
    q,
    k,
    v,
    *,
    scale,
    attn_mask=None,
    seqused_k=None,
    softcap=0.0,
    window_left=-1,
    window_right=-1,
    bottom_right=False,
):
    """Plain PyTorch attention in the inputs' own precision (no upcast), dense
    canonical layout: the 'plain PyTorch error' of the tolerance rule."""
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hk != hq:
        kt = kt.repeat_interleave(hq // hk, 1)
        vt = vt.repeat_interleave(hq // hk, 1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    len_k = torch.full((b,), sk, device=q.device) if seqused_k is None else seqused_k.long()
    vis = reference._visible(sq, sk, len_k, window_left, window_right, bottom_right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            s = s + attn_mask
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vt).transpose(1, 2)


def make_qkv(b, sq, sk, hq, hk, d, dv=None, dtype=torch.float32, device="cpu", strided=False):
    dv = d if dv is None else dv
    if strided:  # non-contiguous views with a contiguous last dim
        q = torch.randn(b, hq, sq, d + 3, dtype=dtype, device=device)[..., :d].transpose(1, 2)
        k = torch.randn(b, sk, 2 * hk, d, dtype=dtype, device=device)[:, :, ::2]
        v = torch.randn(b, hk, sk, dv, dtype=dtype, device=device).transpose(1, 2)
    else:
        q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
        k = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
        v = torch.randn(b, sk, hk, dv, dtype=dtype, device=device)
    return q, k, v


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def op_call_in_subprocess(
    body: str, prelude: str = "", env: dict | None = None
) -> subprocess.CompletedProcess:
    """Runs ``body`` (Python source, one or more statements) in a fresh
    interpreter after ``import torch, pyfastattn`` and ``prelude``, with
    ``env`` added to this process's environment: its stdout is ``ERROR:
    <type>: <message>`` when it raises ValueError or RuntimeError, else ``NO
    ERROR``. A crash (a signal, any other exit) fails the caller: a bad call
    must never take the process down, nor this test run with it."""
    code = (
        "import torch, pyfastattn\n" + prelude + "try:\n" + textwrap.indent(body, "    ") + "\n"
        "except (ValueError, RuntimeError) as e:\n"
        "    print(f'ERROR: {type(e).__name__}:', e)\n"
        "else:\n"
        "    print('NO ERROR')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=None if env is None else {**os.environ, **env})  # fmt: skip
    assert r.returncode == 0, f"the process died (rc {r.returncode}): {r.stderr[-2000:]}"
    return r


def fa_grad_correction(lse, d_d, wrt):
    """What FlashAttention-style backwards add to the exact gradients: their
    D = rowsum(dO * O) uses the output as stored in its dtype, which shifts
    dS by -P * dD with dD = rowsum(dO * (O_stored - O_exact)), summed the
    gradient of sum(dD * lse) over the rows that see a key (lse finite).
    Subtracted from the exact gradient, it gives the FlashAttention-consistent
    one. ``wrt``: the float64 leaves lse depends on; None where no graph."""
    fin = torch.isfinite(lse)
    obj = (d_d * torch.where(fin, lse, torch.zeros_like(lse)))[fin].sum()
    if not obj.requires_grad:
        return [None] * len(wrt)
    return torch.autograd.grad(obj, wrt, allow_unused=True)
