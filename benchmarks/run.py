#!/usr/bin/env python
"""pyfastattn benchmarks: the fused kernels beside PyTorch's own attention and FFN.

    python benchmarks/run.py [--suite attention|attention-bwd|decode-kvcache|ffn|all] [--device auto|cpu|cuda]
                             [--dtype float32,bfloat16] [--quick|--full|--smoke] [--threads N]
                             [--seqlens 512,1024] [--headdims 64] [--providers NAMES]
                             [--ffn-tokens 16,512] [--ffn-dmodel 1024] [--out DIR | --record]

Providers, all in this process on the same inputs in the same run:
  attention      pyfastattn (backend "kernel"), the pyfastattn reference, a naive
                 matmul-softmax-matmul, F.scaled_dot_product_attention restricted
                 to each backend of the device (CPU: flash, math; CUDA: flash,
                 efficient, cudnn, math), FlexAttention under torch.compile (CUDA)
  attention-bwd  the same providers; pass "bwd" times the backward alone (through
                 autograd, so pyfastattn's is whatever its public autograd path
                 dispatches to: the attention_bwd kernel where one is registered),
                 pass "fwd+bwd" the two together
  decode-kvcache benchmarks/decode_kvcache.py: one decode step with append over a
                 KV cache (B1 Hq32 Hk8 D128 bf16; quick: context 4096, contiguous
                 and paged 64), pyfastattn.attention_with_kvcache beside torch SDPA
                 over views of the same cache and a concatenate-then-attend path;
                 memory-bound, so its rows report the fraction of the read bandwidth
  ffn            benchmarks/ffn_bench.py: pyfastattn, torch eager, torch.compile

Method: before timing, every provider's output (and, for attention-bwd, its
dq/dk/dv) is checked against the float64 pyfastattn reference with the
tolerance rule of pyfastattn.testing; a wrong result is reported FAIL and never
timed. An unsupported or unavailable provider is reported with the reason.
Then a warm-up, then timing: CPU with torch.utils.benchmark at an explicit
thread count, by adaptive repetition (more samples while the spread is above
10%, within a time bound); CUDA with CUDA events around each call, rotating
over input sets that together exceed twice the L2. Median with p20/p80 and the
spread (p80 - p20) / p50. A warning is printed (and written to results.md)
when the machine was busy (1-minute load average above the thread count) or a
row's spread exceeds 10%: the ratios of such a run may flip between runs.
FLOPs: 4*B*H*Sq*Sk*D forward (half for causal), x2.5 backward, x3.5 fwd+bwd.
Bytes: each pass reads its inputs and writes its outputs once. The roofs are
measured in the same run: on CPU the vector units' multiply-add peak
(csrc/cpu/peak_probe.cpp; vdpbf16ps for bf16 where the CPU has it) and the
read bandwidth; on CUDA a torch.matmul ceiling and the device-copy bandwidth.

Output in --out (default: a new folder benchmarks/results/local/<date-time>-<mode>-<suite>/,
ignored by git; its path is printed at the start and the end; --record writes
the committed results of record, benchmarks/results/<device>/<mode>-<suite>/,
instead): results.csv (every row), summary.csv (pyfastattn against the fastest
baseline per shape), results.md (the report, with the command line), and per
suite and dtype a speedup plot (speedup-*.png: pyfastattn over each baseline,
with the 1.0 line) and a throughput plot (needs matplotlib; skipped with a note
when it is missing).
The CSV, summary and markdown are rewritten after every step, so a run cut off
by an outer timeout still leaves what it measured; --budget-s (default 140 s
for --quick on CUDA, where scripts/gpu_check.sh allows 200 s) stops starting
new steps once spent, and their rows say so.
Exit status 1 when any provider FAILs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_common as bc  # noqa: E402

import pyfastattn  # noqa: E402
from pyfastattn import _ops, reference  # noqa: E402
from pyfastattn.testing import tolerance_failure  # noqa: E402

PASSES = {"attention": ("fwd",), "attention-bwd": ("bwd", "fwd+bwd")}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass
class Shape:
    """Attention inputs in SDPA's layout: q (B, H, Sq, D), k/v (B, H, S, D)."""

    b: int
    h: int
    s: int  # keys (and queries unless sq is given)
    d: int
    causal: bool
    sq: int | None = None  # queries; None: s. 1 is a decode step

    @property
    def q_len(self) -> int:
        return self.s if self.sq is None else self.sq

    def flops(self, pass_: str = "fwd") -> float:
        f = 4.0 * self.b * self.h * self.q_len * self.s * self.d
        if self.causal:
            f /= 2
        return f * FLOP_FACTOR[pass_]

    def bytes_moved(self, pass_: str, elsize: int) -> float:
        """The least a pass must move: each input read once, each output written once."""
        q = o = self.b * self.h * self.q_len * self.d
        kv = 2 * self.b * self.h * self.s * self.d
        fwd = q + kv + o  # read q, k, v; write out
        bwd = (q + kv + 2 * o) + (q + kv)  # read q, k, v, out, dout; write dq, dk, dv
        return elsize * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]

    def variant(self) -> str:
        """The shape without its length: one plot panel each."""
        if self.sq is not None:
            return f"decode Sq{self.sq} D{self.d}"
        return f"D{self.d}{' causal' if self.causal else ''}"

    def __str__(self) -> str:
        if self.sq is not None:
            return f"B{self.b} H{self.h} Sq{self.sq} Sk{self.s} D{self.d}{' causal' if self.causal else ''}"
        return f"B{self.b} H{self.h} S{self.s} D{self.d}{' causal' if self.causal else ''}"


def shapes_for(
    device: str,
    quick: bool,
    seqs: list[int] | None = None,
    dims: list[int] | None = None,
    decode: bool = False,
    backward: bool = False,
    smoke: bool = False,
) -> list[Shape]:
    """The grid; ``seqs``/``dims`` replace the sequence lengths / head dims.
    ``decode`` adds one-query (Sq = 1) cases: memory-bound, read in GB/s.
    Every curve of the default grids has >= 4 points. ``backward``: the quick
    CPU grid stops at S512 (the baselines' backward at S1024 takes 0.2-0.7 s a
    call on 2 cores; the quick suite has about 2 minutes). ``smoke``: tiny
    shapes that only show that everything runs."""
    if smoke:
        dims = dims or ([16] if device == "cpu" else [64])
        seqs = seqs or ([32, 64] if device == "cpu" else [128, 256])
        grid = [Shape(1, 2, s, d, c) for d in dims for s in seqs for c in (False, True)]
        return grid + ([Shape(1, 2, s, d, False, sq=1) for d in dims for s in seqs] if decode else [])
    if device == "cpu":
        dims = dims or ([64] if quick else [64, 128])
        # quick: the serving decode is the decode-kvcache suite; this curve (the
        # plain attention call at Sq = 1) stays short, its baselines are slow
        dec = seqs or ([512, 1024, 2048, 4096] if quick else [4096, 8192, 16384, 32768, 65536])
        seqs = seqs or (
            [64, 128, 256, 512]
            if quick and backward
            else [128, 256, 512, 1024]
            if quick
            else [256, 512, 1024, 2048, 4096]
        )
        grid = [Shape(1, 8, s, d, c) for d in dims for s in seqs for c in (False, True)]
        return grid + ([Shape(1, 8, s, d, False, sq=1) for d in dims for s in dec] if decode else [])
    # CUDA: B*S = 16384, H*D = 2048 (the FlashAttention benchmark convention);
    # decode: B*Sk = 65536 (512 MiB of K/V in 16 bit)
    dims = dims or ([128] if quick else [64, 128])
    dec = seqs or ([2048, 4096, 8192, 16384] if quick else [2048, 4096, 8192, 16384, 32768])
    seqs = seqs or ([512, 1024, 2048, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384])
    grid = [
        Shape(max(1, 16384 // s), max(1, 2048 // d), s, d, c)
        for d in dims
        for s in seqs
        for c in (False, True)
    ]
    if decode:
        grid += [Shape(max(1, 65536 // s), max(1, 2048 // d), s, d, False, sq=1) for d in dims for s in dec]
    return grid


# ---------------------------------------------------------------------------
# providers: name -> callable(q, k, v, causal) -> out, all in (B, H, S, D).
# causal is top-left aligned, as in SDPA's is_causal.
# ---------------------------------------------------------------------------


def _naive(q, k, v, causal, mask=None):
    """Plain PyTorch in the inputs' dtype. ``mask`` (Sq, Sk) bool, True = attend,
    replaces the causal mask (the gate uses it for a subset of query rows)."""
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is None and causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _pyfastattn(q, k, v, causal):
    with pyfastattn.backend("kernel"):
        return pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _pyfastattn_reference(q, k, v, causal):
    with pyfastattn.backend("reference"):
        return pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


FLEX = "flex attention (compiled)"


def flex_unavailable_reason(device: str) -> str | None:
    """Why FlexAttention under torch.compile can't be a provider here, or None."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch.nn.attention.flex_attention cannot be imported ({e})"
    if device != "cuda":
        return f"a CUDA provider (Triton kernels from torch.compile); this run is on {device}"
    from torch.utils._triton import has_triton

    if not has_triton():
        return "Triton is not installed: torch.compile cannot generate the FlexAttention kernel"
    return None


def flex_provider(compiled: bool = True):
    """FlexAttention with a block mask for causal (top-left, as SDPA's
    is_causal), under torch.compile. Block masks are built once per length
    pair, at the first (untimed) call of the gate."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if compiled:
        # one compiled graph per shape, dtype, mask and grad mode: more than dynamo's default 8
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        attend = torch.compile(flex_attention, dynamic=False)
    else:
        attend = flex_attention
    masks: dict = {}

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def run(q, k, v, causal):
        block_mask = None
        if causal:
            key = (q.shape[-2], k.shape[-2], q.device)
            if key not in masks:
                masks[key] = create_block_mask(causal_mask, None, None, key[0], key[1], device=q.device)
            block_mask = masks[key]
        return attend(q, k, v, block_mask=block_mask)

    return run


def providers(device: str) -> tuple[dict, dict]:
    """({name: fn}, {name: why unavailable}) for this device."""
    from torch.nn.attention import SDPBackend

    p = {"pyfastattn": _pyfastattn}
    if device == "cpu":
        p["torch sdpa (flash)"] = _sdpa(SDPBackend.FLASH_ATTENTION)
        p["torch sdpa (math)"] = _sdpa(SDPBackend.MATH)
    else:
        for name, be in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ):
            p[f"torch sdpa ({name})"] = _sdpa(be)
    unavailable = {}
    reason = flex_unavailable_reason(device)
    if reason is None:
        p[FLEX] = flex_provider()
    else:
        unavailable[FLEX] = reason
    p["naive matmul-softmax-matmul"] = _naive
    p["pyfastattn reference"] = _pyfastattn_reference
    return p, unavailable


# ---------------------------------------------------------------------------
# correctness gate
# ---------------------------------------------------------------------------


class Gate:
    """The float64 reference for one input set, computed once, and plain
    PyTorch's error in the same dtype (the naive provider), against which
    ``check`` holds each provider to the tolerance rule. Small problems are
    checked whole; large ones on ``rows`` evenly spaced query rows (rows are
    independent; with ``grads`` the output gradient is zero on the other rows,
    so dk and dv are still checked whole)."""

    def __init__(self, q, k, v, causal: bool, grads: bool, full_limit: int, rows: int = 64):
        sq, sk = q.shape[-2], k.shape[-2]
        self.causal, self.grads = causal, grads
        if q.shape[0] * q.shape[1] * sq * sk <= full_limit:
            self.rows = torch.arange(sq, device=q.device)
        else:
            self.rows = torch.linspace(0, sq - 1, min(rows, sq), device=q.device).round().long().unique()
        self.mask = None
        if causal:  # top-left: row i attends keys <= i
            self.mask = torch.arange(sk, device=q.device)[None, :] <= self.rows[:, None]
        gen = torch.Generator(device=q.device).manual_seed(1)
        self.dout_rows = torch.randn(
            (*q.shape[:2], len(self.rows), v.shape[-1]), generator=gen, device=q.device, dtype=q.dtype
        )
        self.names = ["out", "dq", "dk", "dv"] if grads else ["out"]
        self.ref = self._run_rows(self._reference, q.double(), k.double(), v.double())
        self.base = self._run_rows(self._plain, q, k, v)
        self.dtype = q.dtype

    def _reference(self, q, k, v):
        m = None if self.mask is None else self.mask[None, None]
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        return t(reference.attention(t(q), t(k), t(v), attn_mask=m)[0])

    def _plain(self, q, k, v):
        return _naive(q, k, v, False, self.mask)

    def _run_rows(self, fn, q, k, v):
        """fn on the gate's query rows; with grads also dq (those rows), dk, dv."""
        q = q[:, :, self.rows].detach().requires_grad_(self.grads)
        k, v = (t.detach().requires_grad_(self.grads) for t in (k, v))
        with torch.set_grad_enabled(self.grads):
            out = fn(q, k, v)
            if not self.grads:
                return [out.detach()]
            return [out.detach(), *torch.autograd.grad(out, (q, k, v), self.dout_rows.to(out.dtype))]

    def check(self, fn, q, k, v) -> str | None:
        """Run the provider on the whole input set; None if it passes, else 'FAIL (...)'."""
        q, k, v = (t.detach().requires_grad_(self.grads) for t in (q, k, v))
        with torch.set_grad_enabled(self.grads):
            out = fn(q, k, v, self.causal)
            outs = [out.detach()[:, :, self.rows]]
            if self.grads:
                dout = torch.zeros_like(out)
                dout[:, :, self.rows] = self.dout_rows
                dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
                outs += [dq[:, :, self.rows], dk, dv]
        for name, o, r, b in zip(self.names, outs, self.ref, self.base):
            failure = tolerance_failure(name, o, r, b, self.dtype)
            if failure:
                return f"FAIL ({failure})"
        return None


def check(out, q, k, v, causal) -> str | None:
    """The forward gate for one output (a test hook): None if it passes."""
    return Gate(q, k, v, causal, grads=False, full_limit=1 << 62).check(lambda *_: out, q, k, v)


# ---------------------------------------------------------------------------
# the attention suites
# ---------------------------------------------------------------------------


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def backward_note(device: str) -> str:
    if _ops.has_kernel("attention_bwd", device):
        extra = " (the reference where the CUDA kernel declines a case)" if device == "cuda" else ""
        return f"bwd: pyfastattn::attention_bwd kernel{extra}"
    return f"bwd: reference recompute (no attention_bwd kernel for {device})"


# CPU timing per provider and pass: (min_run_time, max_run_time, min_samples) in s,
# CUDA: the events' budget in s, per mode
CPU_TIMING = {"smoke": (0.002, 0.01, 2), "quick": (0.05, 0.4, 5), "full": (1.0, 5.0, 5)}
CUDA_BUDGET = {"smoke": 0.01, "quick": 0.1, "full": 0.5}


def attention_rows(
    suite,
    dtype,
    shape,
    provs,
    unavailable,
    device,
    threads,
    quick,
    env,
    ceiling,
    copy_gbps,
    skip=None,
    smoke=False,
) -> list[dict]:
    """Every provider on one (suite, dtype, shape): gate, warm-up, time, memory.
    ``skip``: a status for every provider instead of running them."""
    passes = PASSES[suite]
    grads = suite == "attention-bwd"
    if skip:
        rows = []
        for name in [*provs, *unavailable]:
            for pass_ in passes:
                r = dict(provider=name, suite=suite, shape=str(shape), dtype=str(dtype)[6:], status=skip)
                r.update(env, causal=shape.causal, seqlen=shape.s)
                r["pass"] = pass_
                rows.append(r)
        return rows
    elsize = torch.empty((), dtype=dtype).element_size()
    torch.manual_seed(0)
    mk = lambda n: torch.randn(shape.b, shape.h, n, shape.d, device=device, dtype=dtype)  # noqa: E731
    one_set = lambda: (mk(shape.q_len), mk(shape.s), mk(shape.s))  # noqa: E731
    set_bytes = elsize * shape.b * shape.h * shape.d * (2 * shape.q_len + 2 * shape.s) * (2 if grads else 1)
    nsets = 1 if device == "cpu" else bc.rotation_sets(set_bytes)
    sets = [one_set() for _ in range(nsets)]
    douts = [torch.randn_like(s[0]) for s in sets] if grads else None
    gate = Gate(*sets[0], shape.causal, grads, full_limit=(1 << 23) if device == "cpu" else (1 << 27))
    mode = "smoke" if smoke else ("quick" if quick else "full")
    min_run, max_run, min_samples = CPU_TIMING[mode]
    budget = CUDA_BUDGET[mode]

    rows = []

    def row_for(name, pass_, **kw):
        r = dict(provider=name, suite=suite, shape=str(shape), variant=f"{pass_} {shape.variant()}")
        r.update(pass_=pass_, dtype=str(dtype).replace("torch.", ""), causal=shape.causal, seqlen=shape.s)
        r.update(env, **kw)
        r["pass"] = r.pop("pass_")
        rows.append(r)
        return r

    for name in unavailable:
        for pass_ in passes:
            row_for(name, pass_, status=f"unavailable: {unavailable[name]}")
    for name, fn in provs.items():
        if name == "pyfastattn reference" and device == "cpu":
            # O(Sq*Sk) fp32 memory and the slowest row by far (0.3-0.7 s a call at
            # S1024); an ablation, not a baseline, so --quick keeps only its small sizes
            limit = 256 if quick else 2048
            if shape.q_len * shape.s > limit * limit:
                for pass_ in passes:
                    row_for(name, pass_, status=f"skipped: on CPU the {'quick' if quick else 'full'} grid "
                            f"runs the reference up to Sq*Sk = {limit}^2")  # fmt: skip
                continue
        note = backward_note(device) if grads and name == "pyfastattn" else ""
        try:
            if name == "pyfastattn" and (
                reason := pyfastattn.kernel_unsupported_reason(
                    sets[0][0].transpose(1, 2), sets[0][2].transpose(1, 2), mode="kernel"
                )
            ):
                raise RuntimeError(reason)
            bad = gate.check(fn, *sets[0])
        except Exception as e:  # unsupported on this shape/device: say why, keep going
            for pass_ in passes:
                row_for(name, pass_, status=f"unsupported: {_first_line(e)}", note=note)
            continue
        if bad:
            for pass_ in passes:
                row_for(name, pass_, status=bad, note=note)
            continue
        for pass_ in passes:
            try:
                calls = [
                    make_call(fn, sets[i], douts[i] if grads else None, shape.causal, pass_)
                    for i in range(nsets)
                ]
                if device == "cuda":
                    times = bc.time_cuda(calls, budget)
                    peak = bc.peak_mib(calls[0], device)
                else:
                    peak = bc.peak_mib(calls[0], device)  # also the warm-up call
                    times = bc.time_cpu(
                        calls[0], threads, min_run, max_run, warmup=False, min_samples=min_samples
                    )
            except Exception as e:  # e.g. out of memory with rotated sets: say so, keep going
                calls = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                row_for(
                    name,
                    pass_,
                    status=f"error while timing: {_first_line(e)}",
                    note=note,
                )
                continue
            st = bc.stats(times)
            r = row_for(name, pass_, status="ok", note=note, peak_mem_mib=peak, **st)
            r["tflops"] = shape.flops(pass_) / (st["p50_ms"] * 1e-3) / 1e12
            r["gbps"] = shape.bytes_moved(pass_, elsize) / (st["p50_ms"] * 1e-3) / 1e9
            bc.add_roofline(r, ceiling, copy_gbps)
            if scales(name, device, threads, pass_, shape):
                # the same call on one thread: how the kernel scales with cores (issue 21)
                one = bc.time_cpu(calls[0], 1, min_run, max_run, min_samples=min_samples)
                torch.set_num_threads(threads)
                r["thread_scaling"] = statistics.median(one) / st["p50_ms"]
    return rows


SCALING_MIN_S = 1024


def scales(name: str, device: str, threads: int, pass_: str, shape) -> bool:
    """Rows that also time pyfastattn on one thread: the CPU forward at S >=
    1024 (the thread-scaling target of issue 21: >= 1.9x from 1 to 2)."""
    return (
        name == "pyfastattn" and device == "cpu" and threads > 1 and pass_ == "fwd"
        and shape.q_len >= SCALING_MIN_S and shape.s >= SCALING_MIN_S
    )  # fmt: skip


def make_call(fn, qkv, dout, causal, pass_):
    """A no-argument call of one pass on one input set. 'bwd' runs the
    forward once here, untimed, and times autograd.grad through its graph."""
    if pass_ == "fwd":

        def call():
            with torch.no_grad():
                return fn(*qkv, causal)

        return call
    q, k, v = (t.detach().requires_grad_() for t in qkv)
    if pass_ == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
    out = fn(q, k, v, causal)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

COLUMNS = [
    ("suite", "suite", 13, ""),
    ("dtype", "dtype", 8, ""),
    ("shape", "shape", 34, ""),
    ("pass", "pass", 7, ""),
    ("provider", "provider", 27, ""),
    ("p50_ms", "p50 ms", 9, ".3f"),
    ("p20_ms", "p20", 8, ".3f"),
    ("p80_ms", "p80", 8, ".3f"),
    ("spread", "spread", 6, ".0%"),
    ("tflops", "TFLOP/s", 8, ".3f"),
    ("frac_ceiling", "of pk", 6, ".0%"),
    ("gbps", "GB/s", 7, ".1f"),
    ("frac_copy_bw", "of bw", 6, ".0%"),
    ("bound", "bound", 7, ""),
    ("thread_scaling", "1->N", 5, ".2f"),
    ("peak_mem_mib", "peak MiB", 8, ".1f"),
    ("speedup_vs_best", "vs best", 7, ".2f"),
]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--suite",
        default="all",
        choices=["attention", "attention-bwd", "decode-kvcache", "ffn", "all"],
        help="what to time: the attention forward, its backward (alone and with the forward), "
        "a decode step over a KV cache, the feed-forward block, or all four (default: all)",
    )
    bc.add_common_args(ap)
    ap.add_argument("--seqlens", default=None, help="comma list replacing the grid's sequence lengths")
    ap.add_argument("--headdims", default=None, help="comma list replacing the grid's head dims")
    ap.add_argument("--ffn-tokens", default=None, help="comma list replacing the FFN grid's token counts")
    ap.add_argument("--ffn-dmodel", default=None, help="comma list replacing the FFN grid's d_model values")
    ap.add_argument("--providers", default=None,
                    help='comma list of attention provider names to run, e.g. "pyfastattn,torch sdpa (flash)"')  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new steps after this many seconds (their rows say so); "
                    "default 140 for --quick on CUDA, else none (0: none)")  # fmt: skip
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    load = bc.LoadWatch()

    device = args.device if args.device != "auto" else ("cuda" if bc.cuda_available() else "cpu")
    if device == "cuda" and not bc.cuda_available():
        ap.error("--device cuda but no CUDA device is visible")
    smoke = args.smoke
    quick = not args.full
    mode = bc.mode_name(args)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if smoke:
        default_dtypes = "float32" if device == "cpu" else "bfloat16"
    else:
        default_dtypes = (
            "float32,bfloat16" if device == "cpu" else ("bfloat16" if quick else "bfloat16,float16")
        )
    dtypes = [getattr(torch, n.strip()) for n in (args.dtype or default_dtypes).split(",")]
    suites = ["attention", "attention-bwd", "decode-kvcache", "ffn"] if args.suite == "all" else [args.suite]
    ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731
    provs, unavailable = providers(device)
    if args.providers:
        wanted = [p.strip() for p in args.providers.split(",")]
        unknown = [p for p in wanted if p not in provs and p not in unavailable]
        if unknown:
            ap.error(f"unknown providers {unknown}; available: {list(provs) + list(unavailable)}")
        provs = {n: f for n, f in provs.items() if n in wanted}
        unavailable = {n: r for n, r in unavailable.items() if n in wanted}
    env = bc.environment(device, threads)
    out_dir = bc.out_dir_for(args, env["device"], args.suite)
    bc.prepare_out_dir(out_dir, args.record)
    command = bc.command_line("benchmarks/run.py", argv)
    print(f"pyfastattn benchmark ({mode}, {device}, {threads} threads): results go to {out_dir}", flush=True)

    jobs = [
        (su, dt, sh)
        for su in suites
        if su in ("attention", "attention-bwd")
        for dt in dtypes
        for sh in shapes_for(
            device,
            quick,
            ints(args.seqlens),
            ints(args.headdims),
            su == "attention",
            su == "attention-bwd",
            smoke=smoke,
        )  # fmt: skip
    ]
    budget_s = args.budget_s if args.budget_s is not None else (140.0 if quick and device == "cuda" else 0.0)
    prog = bc.Progress(len(dtypes) + 1 + len(jobs) + ("decode-kvcache" in suites) + ("ffn" in suites) + 1)
    # The roofs every row is a fraction of. CPU: the physical peak of the
    # vector units and the read bandwidth, probed in this run (issue 21);
    # torch.matmul's rate is one more baseline (--full). CUDA: torch.matmul's
    # best rate and the device-copy bandwidth.
    ceilings, isas, matmuls = {}, {}, {}

    def cpu_roof_desc(probes: str) -> tuple[str, str]:
        """The header's two CPU roof lines, from the probes taken so far."""
        lines = []
        for dt in dtypes:
            line = f"{str(dt)[6:]} {ceilings[dt]:.3f} TFLOP/s ({isas[dt]})"
            if dt in matmuls:
                line += f", torch.matmul reaches {matmuls[dt]:.3f} ({matmuls[dt] / ceilings[dt]:.0%} of it)"
            lines.append(line)
        return (
            f"peak (csrc/cpu/peak_probe.cpp: independent multiply-adds in registers on every thread, {probes}): "
            + "; ".join(lines),
            f"read bandwidth (every thread sums its slice of a {'16 MiB' if smoke else '256 MiB' if quick else '1 GiB'} "
            f"buffer once, with and without software prefetches {bc.READ_PROBE_PREFETCH_BYTES // 1024} KB ahead, the best of the samples, this run): "
            f"{copy_gbps:.1f} GB/s",
        )

    for dt in dtypes:
        if device == "cpu":
            prog.step(f"peak probe {dt}")
            ceilings[dt], isas[dt] = bc.cpu_peak(dt, threads, quick, smoke=smoke)
            if not quick and not smoke:
                matmuls[dt] = bc.matmul_ceiling(device, dt, threads, quick)
        else:
            prog.step(f"matmul ceiling {dt}")
            ceilings[dt] = bc.matmul_ceiling(device, dt, threads, quick, smoke=smoke)
    if device == "cpu":
        prog.step("read bandwidth")
        copy_gbps = bc.cpu_read_bandwidth(threads, quick, smoke=smoke)
        roof_desc = cpu_roof_desc("the best of the samples, this run")
    else:
        prog.step("device-copy bandwidth")
        copy_gbps = bc.copy_bandwidth(device, threads, quick, smoke=smoke)
        roof_desc = (
            "matmul ceiling (torch.matmul, best square size, this run): "
            + ", ".join(f"{str(dt)[6:]} {ceilings[dt]:.3f} TFLOP/s" for dt in dtypes),
            f"device-copy bandwidth (dst.copy_(src), read + write, this run): {copy_gbps:.1f} GB/s",
        )
    cpu_timing = CPU_TIMING[mode]

    def header(done: str, plots=(), plot_skip=None, warnings=()) -> list[str]:
        mem_method = bc.PEAK_MEMORY_METHOD[device]
        if device == "cpu":
            timing = (f"torch.utils.benchmark.Timer, threads {threads}, adaptive repetition per provider "
                      f"and pass: samples of >= 1 ms of calls until >= {cpu_timing[2]} samples, "
                      f">= {cpu_timing[0]} s and a spread <= {bc.SPREAD_WARN:.0%}, or {cpu_timing[1]} s, "
                      "after a warm-up call (the peak-memory call)")  # fmt: skip
        else:
            timing = (f"CUDA events around each call, rotating over input sets that together exceed 2x the "
                      f"L2 ({bc.l2_bytes() >> 20} MiB); two warm-up calls per set")  # fmt: skip
        h = [
            f"device: {env['device']} ({device}{'; ' + env['cpu'] if device == 'cpu' else ''}); torch {env['torch']}"
            + (f", CUDA {env['cuda']}" if env["cuda"] else "")
            + f"; pyfastattn {env['sha']}; {env['timestamp']}",
            f"{done}; wall time {time.perf_counter() - t_start:.0f} s; 1-minute load average "
            f"{load.start:.2f} at the start, {load.now:.2f} at the end, {load.max:.2f} at most "
            f"({threads} benchmark threads)",
            f"timing: {timing}; median with p20/p80; spread = (p80 - p20) / p50",
            "FLOPs: 4*B*H*Sq*Sk*D forward (half for causal), x2.5 backward, x3.5 fwd+bwd; "
            "FFN: 2*tokens*d_model*d_ff per GEMM",
            "GB/s: the least bytes a pass must move (each input read once, each output written once) / p50; "
            "'bound' says which roof applies (memory when FLOP/byte is below the machine's ceiling/bandwidth)",
            *roof_desc,
            f"peak memory: {mem_method}",
            *(
                [
                    f"thread scaling ('1->N'): pyfastattn's forward at S >= {SCALING_MIN_S} timed again on 1 thread; "
                    f"its time there / its time on {threads} threads (ideal {threads})"
                ]  # fmt: skip
                if device == "cpu" and threads > 1
                else []
            ),
            "correctness: every provider checked against the float64 pyfastattn reference with "
            "pyfastattn.testing's tolerance rule before timing (large shapes: 64 evenly spaced query rows); "
            "FAIL rows are never timed",
        ]
        if smoke:
            h.append(
                "smoke run: tiny shapes and minimal timing, to show that everything runs; the numbers mean nothing"
            )
        h += [f"unavailable: {n}: {r}" for n, r in unavailable.items()]
        h.append(f"plots: {', '.join(plots)}" if plots else f"plots skipped: {plot_skip or 'not drawn yet'}")
        h += [f"WARNING: {w}" for w in warnings]
        return h

    def write_files(rows, head, summary, plots=()):
        bc.write_csv(os.path.join(out_dir, "results.csv"), rows)
        bc.write_csv(os.path.join(out_dir, "summary.csv"), summary, bc.SUMMARY_FIELDS)
        bc.write_markdown(
            os.path.join(out_dir, "results.md"),
            "pyfastattn benchmark",
            command,
            head,
            summary,
            rows,
            plots,
            device=device,
        )

    def over_budget() -> str | None:
        spent = time.perf_counter() - t_start
        if budget_s and spent > budget_s:
            return f"skipped: the run's time budget (--budget-s {budget_s:.0f}) was spent ({spent:.0f} s)"
        return None

    rows = []
    for i, (suite, dtype, shape) in enumerate(jobs):
        prog.step(f"{suite} {str(dtype)[6:]} {shape}")
        rows += attention_rows(
            suite, dtype, shape, provs, unavailable, device, threads, quick, env, ceilings[dtype], copy_gbps,
            skip=over_budget(), smoke=smoke,
        )  # fmt: skip
        # after every step, so that a run killed by an outer timeout still leaves its results
        write_files(rows, header(f"partial: {i + 1} of {len(jobs)} attention jobs done"), bc.summarize(rows))
    if "decode-kvcache" in suites:
        import decode_kvcache

        prog.step("decode-kvcache")
        if skip := over_budget():
            dec = [dict(provider="pyfastattn", suite="decode-kvcache", shape="(the decode suite)", dtype="",
                        status=skip, **{"pass": ""})]  # fmt: skip
        else:
            dec = decode_kvcache.run(device, ["bfloat16"], quick, threads, smoke=smoke)
        for r in dec:
            r.update(env)
            r["variant"] = "fwd decode with append"
            if r["status"] == "ok" and r.get("gbps"):
                r["frac_copy_bw"], r["bound"] = r["gbps"] / copy_gbps, "memory"
        rows += dec
    if "ffn" in suites:
        import ffn_bench

        prog.step("ffn suite")
        if skip := over_budget():
            ffn_rows = [
                dict(provider="pyfastattn", suite="ffn", shape="(the ffn suite)", dtype="", status=skip)
            ]
            ffn_rows[0]["pass"] = ""
        else:
            ffn_rows = ffn_bench.run(
                device, dtypes, quick, threads, ints(args.ffn_tokens), ints(args.ffn_dmodel), smoke=smoke
            )
        for r in ffn_rows:
            r.update(env)
            if r["status"] == "ok":
                bc.add_roofline(r, ceilings[getattr(torch, r["dtype"])], copy_gbps)
        rows += ffn_rows
    if device == "cpu":
        # The peak again, at the end: a probe taken while the hypervisor lent
        # a thread's core elsewhere reads low (half, once, at load 1.2), which
        # would inflate every share. The roof is the best of both probes, and
        # every row's share is recomputed against it.
        for dt in dtypes:
            ceilings[dt] = max(ceilings[dt], bc.cpu_peak(dt, threads, quick, smoke=smoke)[0])
        for r in rows:
            if "frac_ceiling" in r and r.get("dtype"):
                bc.add_roofline(r, ceilings[getattr(torch, r["dtype"])], copy_gbps)
        roof_desc = cpu_roof_desc(
            "the best of the samples of a probe at the start and one at the end of this run"
        )
    prog.step("summary and plots")
    summary = bc.summarize(rows)
    plots, plot_skip = bc.write_plots(
        out_dir, rows, {str(d)[6:]: c for d, c in ceilings.items()}, copy_gbps, env, device=device
    )
    load.stop()
    warnings = bc.noise_warnings(rows, load, threads if device == "cpu" else None)
    head = header("complete", plots, plot_skip, warnings)
    prog.finish()

    print(f"\n{command}")
    for h in head:
        if not h.startswith("WARNING"):
            print(h)
    attn = [r for r in rows if r["suite"] != "ffn" and not r["status"].startswith("unavailable")]
    if attn:
        print()
        bc.print_table(attn, COLUMNS)
    ffn_rows = [r for r in rows if r["suite"] == "ffn"]
    if ffn_rows:
        import ffn_bench

        print()
        ffn_bench.print_table(ffn_rows)
    bc.print_summary(summary)
    write_files(rows, head, summary, plots)
    print(f"\nwrote {out_dir}:\n  results.csv, summary.csv, results.md" + "".join(f", {p}" for p in plots))
    if plot_skip:
        print(f"plots skipped: {plot_skip}")
    for w in warnings:
        print(f"WARNING: {w}")
    return 1 if any(r["status"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
