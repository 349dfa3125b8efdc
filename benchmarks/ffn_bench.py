#!/usr/bin/env python
"""The fused FFN beside torch eager, torch.compile and the bare GEMMs.

    python benchmarks/ffn_bench.py [--device auto|cpu|cuda] [--dtype float32,bfloat16]
                                   [--quick|--full|--smoke] [--threads N] [--out DIR | --record]

or, from a harness, ``run(device, dtypes, quick, threads) -> list[dict]``.

Providers, all in this process on the same inputs:
  pyfastattn              pyfastattn.ffn (backend "kernel"), saving activations
  pyfastattn recompute    the same with recompute=True (memory row; not in --quick)
  torch eager             nn.Linear -> act -> nn.Linear (gated: the LLaMA MLP)
  torch.compile           torch.compile of that eager module
  GEMM floor              the same GEMMs alone (plain: 2 forward, 6 forward+
                          backward; gated: 3 and 9) as torch.mm calls, no bias,
                          no elementwise work. The issue judges the FFN by its
                          time over this floor.

Shapes (the issue): d_model in {1024, 4096}, d_ff = 4 d_model (gated: 8/3
d_model rounded up to 256), tokens in {16, 512, 8192}; plain gelu and gated
silu; forward and forward+backward. --quick (the default): both forms at
D1024, tokens 16, 64, 256, 512 (4 points per curve); --full: the whole grid;
--smoke: one tiny shape; --tokens/--dmodel: your own grid. torch.compile
compiles with the token count dynamic (torch._dynamo.maybe_mark_dynamic),
once per form, d_model, dtype and pass, as a model that sees many batch sizes
would.

Before timing, every provider is checked against the float64 reference with
the tolerance rule of tests/_helpers.py (error <= 2x torch eager's in the same
dtype + the rounding floor): the output and dx on the first 64 tokens (rows
are independent), and, where tokens * d_model * d_ff <= 2^30 (--quick: 2^28),
all gradients.
A provider that fails is reported FAIL and not timed.

FLOPs: plain 4 T D F forward, 12 T D F forward+backward; gated 6 and 18.
Timing: the providers of one shape and pass are called in turn, round after
round, so that a change in load on a shared machine hits every provider alike,
by adaptive repetition: rounds go on until every provider's spread
((p80 - p20) / p50) is at most 10%, within bounds (quick: 3 rounds and 0.2 s
at least, 0.6 s at most; full: 7 rounds, 2 s and 6 s); host clock on CPU
(explicit thread count), CUDA events on GPU; median with p20/p80 and the
spread. Output: ffn_results.csv in a new folder under
benchmarks/results/local/ (or --out / --record), path printed. Memory: peak bytes
allocated during one call above what was allocated before it (CPU: the
profiler's allocator trace; CUDA: max_memory_allocated), and `saved_mib`:
what a forward keeps for its backward (inputs, parameters, output excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_common  # noqa: E402
from bench_common import pct, peak_mib  # noqa: E402, F401  (shared with run.py)

import pyfastattn  # noqa: E402
from pyfastattn import _ffn_cuda, ffn, reference  # noqa: E402
from pyfastattn.testing import tolerance_failure  # noqa: E402

CHECK_ROWS = 64
FULL_GRAD_CHECK = 2**30
# --quick checks every gradient up to T64 at D1024 (T256 adds ~0.5 s of float64
# reference and comparison per provider over 4M-element weight gradients)
QUICK_FULL_GRAD_CHECK = 2**28


class Shape:
    def __init__(self, tokens: int, d_model: int, gated: bool):
        self.tokens, self.d_model, self.gated = tokens, d_model, gated
        self.d_ff = (math.ceil(8 * d_model / 3 / 256) * 256) if gated else 4 * d_model
        self.activation = "silu" if gated else "gelu"

    def flops(self, backward: bool) -> float:
        n = (6 if self.gated else 4) * self.tokens * self.d_model * self.d_ff
        return n * (3 if backward else 1)

    def bytes_moved(self, backward: bool, elsize: int) -> float:
        """The least a pass must move: weights and x read, y written (forward);
        forward+backward adds the weights read again, their gradients written,
        dy read and dx written. T16 is bound by this (the weights)."""
        w = (3 if self.gated else 2) * self.d_model * self.d_ff
        act = self.tokens * self.d_model
        return elsize * ((3 * w + 4 * act) if backward else (w + 2 * act))

    @property
    def form(self) -> str:
        return "gated-silu" if self.gated else "plain-gelu"

    def __str__(self) -> str:
        return f"{self.form} T{self.tokens} D{self.d_model} F{self.d_ff}"


QUICK_TOKENS = [16, 64, 256, 512]


def shapes_for(
    quick: bool, tokens: list[int] | None = None, dims: list[int] | None = None, smoke: bool = False
) -> list[Shape]:
    """The issue's grid, ordered by (form, d_model) and then tokens. quick:
    both forms at D1024 and 16 to 512 tokens (from weight-bandwidth-bound to
    compute-bound; T8192 takes seconds a call on 2 cores); smoke: one tiny
    shape per form."""
    if smoke:
        tokens, dims = tokens or [16], dims or [64]
    elif quick:
        tokens, dims = tokens or QUICK_TOKENS, dims or [1024]
    tokens = tokens or [16, 512, 8192]
    dims = dims or [1024, 4096]
    return [Shape(t, d, g) for g in (False, True) for d in dims for t in tokens]


# ---------------------------------------------------------------------------
# the modules and providers
# ---------------------------------------------------------------------------


class EagerFFN(nn.Module):
    """What a user writes: Linear -> act -> Linear, or the LLaMA MLP."""

    def __init__(self, shape: Shape, device, dtype):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.gated = shape.gated
        self.act = reference.ACTIVATIONS[shape.activation]
        if shape.gated:
            self.gate_proj = nn.Linear(shape.d_model, shape.d_ff, bias=False, **kw)
            self.up_proj = nn.Linear(shape.d_model, shape.d_ff, bias=False, **kw)
            self.down_proj = nn.Linear(shape.d_ff, shape.d_model, bias=False, **kw)
        else:
            self.fc1 = nn.Linear(shape.d_model, shape.d_ff, **kw)
            self.fc2 = nn.Linear(shape.d_ff, shape.d_model, **kw)

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))

    def weights(self):
        """(w1, b1, w2, b2, w3, b3) in pyfastattn.ffn's order."""
        if self.gated:
            return (self.gate_proj.weight, None, self.down_proj.weight, None, self.up_proj.weight, None)
        return (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, None, None)


def _fused(module: EagerFFN, activation: str, recompute: bool, cuda_path: str = "auto"):
    """cuda_path: "fused" / "cublas" force one CUDA path (pyfastattn/_ffn_cuda.py)."""
    w1, b1, w2, b2, w3, b3 = module.weights()

    def run(x):
        with pyfastattn.backend("kernel"), _ffn_cuda.force_path(cuda_path):
            if w3 is None:
                return ffn.feed_forward(x, w1, b1, w2, b2, activation=activation, recompute=recompute)
            return ffn.gated_feed_forward(
                x, w1, w3, w2, b1, b3, b2, activation=activation, recompute=recompute
            )

    return run


class GemmFloor:
    """The FFN's GEMMs alone, as torch.mm calls that allocate their outputs
    like any provider must (the issue's floor: eager's time inside its GEMMs).
    Inputs stand in for the intermediates: GEMM time does not depend on values."""

    def __init__(self, module: EagerFFN, x: torch.Tensor, dy: torch.Tensor):
        w1, _, w2, _, w3, _ = (t.detach() if t is not None else None for t in module.weights())
        self.w1, self.w2, self.w3, self.x, self.dy = w1, w2, w3, x.detach(), dy

    def forward(self):
        g = torch.mm(self.x, self.w1.t())
        if self.w3 is not None:
            torch.mm(self.x, self.w3.t())
        return g, torch.mm(g, self.w2.t())

    def forward_backward(self):
        g, _ = self.forward()
        dh = torch.mm(self.dy, self.w2)
        grads = [torch.mm(self.dy.t(), g), torch.mm(dh.t(), self.x), torch.mm(dh, self.w1)]
        if self.w3 is not None:
            grads.append(torch.mm(dh.t(), self.x))
            grads[2].addmm_(dh, self.w3)
        return grads


# ---------------------------------------------------------------------------
# correctness gate
# ---------------------------------------------------------------------------


def _tolerance_failure(name, out, ref, base, dtype) -> str | None:
    failure = tolerance_failure(name, out, ref, base, dtype)
    return None if failure is None else f"FAIL {failure}"


def _grads(fn, x, params, dy):
    x = x.detach().requires_grad_()
    y = fn(x)
    return [y, *torch.autograd.grad(y, [x, *params], dy)]


class Checker:
    """The float64 reference and torch eager's error for one shape and pass,
    computed once; ``check(fn)`` then holds a provider to the tolerance rule."""

    def __init__(
        self, module: EagerFFN, x, dy, shape: Shape, backward: bool, full_limit: int = FULL_GRAD_CHECK
    ):
        self.module, self.backward = module, backward
        self.params = list(module.parameters())
        self.full = backward and shape.tokens * shape.d_model * shape.d_ff <= full_limit
        rows = slice(None) if self.full else slice(0, CHECK_ROWS)
        self.x, self.dy = x[rows], dy[rows]
        ref_mod = EagerFFN(shape, "cpu", torch.float64)
        ref_mod.load_state_dict({k: v.detach().double().cpu() for k, v in module.state_dict().items()})
        self.names = ["y", "dx"] + [f"d{n}" for n, _ in module.named_parameters()]
        self.refs = self._run(
            ref_mod, self.x.double().cpu(), list(ref_mod.parameters()), self.dy.double().cpu()
        )
        self.base = self._run(module, self.x, self.params, self.dy)

    def _run(self, fn, x, params, dy):
        if not self.backward:
            with torch.no_grad():
                return [fn(x)]
        out = _grads(fn, x, params, dy)
        return out if self.full else out[:2]  # on a slice of the tokens only row-local results

    def check(self, fn) -> str | None:
        outs = self._run(fn, self.x, self.params, self.dy)
        for name, o, r, b in zip(self.names, outs, self.refs, self.base):
            bad = _tolerance_failure(name, o.cpu(), r, b.cpu(), self.x.dtype)
            if bad:
                return bad
        return None


# ---------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------


def time_interleaved(
    calls: dict,
    device: str,
    budget_s: float,
    min_rounds: int = 5,
    max_rounds: int = 200,
    min_s: float = 0.0,
    threshold: float = bench_common.SPREAD_WARN,
) -> dict:
    """ms per call for each provider, timed in rounds that call every provider
    once in turn, so that a change in machine load (this is a shared 2-core
    box) hits all of them alike. Adaptive: after ``min_rounds`` rounds and
    ``min_s`` seconds, stops as soon as every provider's spread is at most
    ``threshold``; otherwise goes on until ``budget_s`` or ``max_rounds``.
    CPU: host clock (the ops are synchronous); CUDA: events, after writing a
    buffer of twice the L2 (outside the events) so that no call finds its
    weights in the L2 left by the previous one."""
    times = {k: [] for k in calls}
    flush = (
        torch.empty(2 * bench_common.l2_bytes(), dtype=torch.uint8, device="cuda")
        if device == "cuda"
        else None
    )
    t0 = time.perf_counter()
    rounds = 0

    def settled() -> bool:
        return time.perf_counter() - t0 >= min_s and all(
            bench_common.spread(t) <= threshold for t in times.values()
        )

    while rounds < min_rounds or (
        time.perf_counter() - t0 < budget_s and rounds < max_rounds and not settled()
    ):
        for name, fn in calls.items():
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                flush.zero_()
                a.record()
                fn()
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b))
            else:
                a = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - a) * 1e3)
        rounds += 1
    return times


def saved_mib(fn, x, params) -> float:
    """Bytes a forward keeps for its backward (inputs and parameters excluded)."""
    known = {t.data_ptr() for t in [x, *params]}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in known:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.detach().requires_grad_())
    return sum(seen.values()) / 2**20


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def run(
    device: str,
    dtypes: list,
    quick: bool,
    threads: int,
    tokens: list[int] | None = None,
    dims: list[int] | None = None,
    dispatch_only: bool = False,
    smoke: bool = False,
) -> list[dict]:
    """Rows: provider, suite "ffn", shape (with the pass), dtype, p20/p50/p80_ms,
    tflops, status, peak_mem_mib, plus pass, saved_mib, vs_eager, vs_floor.
    ``tokens``/``dims`` replace the issue's token counts / d_model values.
    On CUDA two more providers time each path alone ("pyfastattn fused": our
    GEMMs, "pyfastattn cublas": cuBLAS + the elementwise kernel);
    ``dispatch_only`` keeps just those two and eager (for --write-dispatch)."""
    if device == "cpu":
        torch.set_num_threads(threads)
    # timing per shape and pass: (min seconds, max seconds, min rounds)
    min_s, budget, min_rounds = (0.0, 0.01, 2) if smoke else (0.2, 0.6, 3) if quick else (2.0, 6.0, 7)
    # one compiled graph per (form, d_model, dtype, pass): more than dynamo's default 8 in --full
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    rows = []
    group = None
    for dtype in dtypes:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        for shape in shapes_for(quick, tokens, dims, smoke):
            if group != (dtype, shape.gated, shape.d_model):
                # a new graph family: drop the old graphs (token counts of one family share one)
                group = (dtype, shape.gated, shape.d_model)
                torch._dynamo.reset()
            torch.manual_seed(0)
            module = EagerFFN(shape, device, dtype)
            x = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype)
            dy = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype)
            # token counts vary within a family: compile once with a symbolic token count
            torch._dynamo.maybe_mark_dynamic(x, 0)
            params = list(module.parameters())
            floor = GemmFloor(module, x, dy)
            compiled = torch.compile(module, fullgraph=True)
            providers = {
                "pyfastattn": _fused(module, shape.activation, False),
                "pyfastattn recompute": _fused(module, shape.activation, True),
                "torch eager": module,
                "torch.compile": compiled,
                "GEMM floor": None,
            }
            if device == "cuda":
                providers["pyfastattn fused"] = _fused(module, shape.activation, False, "fused")
                providers["pyfastattn cublas"] = _fused(module, shape.activation, False, "cublas")
            if dispatch_only:
                providers = {
                    k: v for k, v in providers.items() if k in CUDA_PATH_PROVIDERS + ("torch eager",)
                }
            for backward in (False, True):
                pass_name = "fwd+bwd" if backward else "fwd"
                checker = Checker(
                    module, x, dy, shape, backward, QUICK_FULL_GRAD_CHECK if quick else FULL_GRAD_CHECK
                )
                calls, these = {}, []
                for name, fn in providers.items():
                    if name == "pyfastattn recompute" and (not backward or (quick and not smoke)):
                        # without a backward it is the same call as "pyfastattn"; an
                        # ablation (memory against time), so --quick leaves it to --full
                        continue
                    row = dict(
                        provider=name,
                        suite="ffn",
                        shape=f"{shape} {pass_name}",
                        pass_=pass_name,
                        seqlen=shape.tokens,  # the x axis of run.py's plots
                        variant=f"{pass_name} {shape.form} D{shape.d_model}",
                        dtype=str(dtype).replace("torch.", ""),
                        status="ok",
                        device=device,
                        threads=threads if device == "cpu" else "",
                        torch=torch.__version__,
                        tokens=shape.tokens,
                        d_model=shape.d_model,
                        gated=shape.gated,
                    )
                    these.append(row)
                    try:
                        if fn is not None:
                            if name.startswith("pyfastattn") and (reason := ffn.ffn_unsupported_reason(x, mode="kernel")):
                                raise RuntimeError(reason)
                            bad = checker.check(fn)
                            if bad:
                                row["status"] = bad
                                continue
                    except Exception as e:  # unsupported here: say why, keep going
                        row["status"] = f"unsupported: {str(e).splitlines()[0][:100]}"
                        continue
                    if fn is None:
                        call = floor.forward_backward if backward else floor.forward
                    elif backward:

                        def call(fn=fn, x=x, params=params, dy=dy):
                            xg = x.detach().requires_grad_()
                            return torch.autograd.grad(fn(xg), [xg, *params], dy)
                    else:

                        def call(fn=fn, x=x):
                            with torch.no_grad():
                                return fn(x)

                    call()  # warm-up (and compile)
                    call()
                    calls[name] = call
                    row["peak_mem_mib"] = peak_mib(call, device)
                    if backward and fn is not None:
                        row["saved_mib"] = saved_mib(fn, x, params)
                times = time_interleaved(calls, device, budget, min_rounds, min_s=min_s)
                for row in these:
                    if row["provider"] not in times:
                        continue
                    t = times[row["provider"]]
                    p50 = statistics.median(t)
                    row.update(
                        **bench_common.stats(t),
                        tflops=shape.flops(backward) / (p50 * 1e-3) / 1e12,
                        gbps=shape.bytes_moved(backward, x.element_size()) / (p50 * 1e-3) / 1e9,
                    )
                rows.extend(these)
            del compiled, providers
    torch._dynamo.reset()
    # ratios: to eager and to the GEMM floor of the same shape, pass, dtype
    by_key = {(r["shape"], r["dtype"], r["provider"]): r for r in rows}
    for r in rows:
        for other, key in (("torch eager", "vs_eager"), ("GEMM floor", "vs_floor")):
            o = by_key.get((r["shape"], r["dtype"], other))
            if r["status"] == "ok" and o and o["status"] == "ok":
                r[key] = r["p50_ms"] / o["p50_ms"]
    for r in rows:
        r["pass"] = r.pop("pass_")
    return rows


COLUMNS = [
    ("shape", "shape", 40, ""),
    ("dtype", "dtype", 8, ""),
    ("provider", "provider", 21, ""),
    ("p50_ms", "p50 ms", 9, ".2f"),
    ("p20_ms", "p20", 8, ".2f"),
    ("p80_ms", "p80", 8, ".2f"),
    ("spread", "spread", 6, ".0%"),
    ("tflops", "TFLOP/s", 8, ".3f"),
    ("gbps", "GB/s", 7, ".1f"),
    ("vs_eager", "/eager", 7, ".3f"),
    ("vs_floor", "/floor", 7, ".3f"),
    ("peak_mem_mib", "peak MiB", 9, ".1f"),
    ("saved_mib", "saved MiB", 9, ".1f"),
]

FIELDS = [
    "provider", "suite", "shape", "pass", "dtype", "status", "p20_ms", "p50_ms", "p80_ms", "spread", "samples",
    "tflops", "gbps",
    "vs_eager", "vs_floor", "peak_mem_mib", "saved_mib", "device", "threads", "torch",
]  # fmt: skip


# ---------------------------------------------------------------------------
# CUDA: the dispatch table between the two CUDA paths
# ---------------------------------------------------------------------------

CUDA_PATH_PROVIDERS = ("pyfastattn fused", "pyfastattn cublas")


def _class_bounds(values: list[int]) -> list[int]:
    """Upper bounds of one class per measured value: up to the geometric mean
    with the next value; -1 (unbounded) for the last."""
    v = sorted(set(values))
    return [int(math.sqrt(a * b)) for a, b in zip(v, v[1:])] + [-1]


def dispatch_rules(rows: list[dict], dtype: str = "bfloat16") -> list[dict]:
    """One rule per measured (gated, tokens, d_model) of ``dtype``: the path
    with the lower median forward time, and the one with the lower median
    backward time (fwd+bwd minus fwd of the same path). Ordered so that the
    first rule matching a call is its class."""
    t = {
        (r["gated"], r["tokens"], r["d_model"], r["pass"], r["provider"]): r["p50_ms"]
        for r in rows
        if r["dtype"] == dtype and r["status"] == "ok" and r["provider"] in CUDA_PATH_PROVIDERS
    }
    rules = []
    for gated in (False, True):
        toks = sorted({k[1] for k in t if k[0] == gated})
        dims = sorted({k[2] for k in t if k[0] == gated})
        for tok, tb in zip(toks, _class_bounds(toks)):
            for dm, db in zip(dims, _class_bounds(dims)):
                ms = {}
                for prov in CUDA_PATH_PROVIDERS:
                    f, fb = t.get((gated, tok, dm, "fwd", prov)), t.get((gated, tok, dm, "fwd+bwd", prov))
                    if f is not None and fb is not None:
                        ms[prov.split()[-1]] = {"fwd_ms": round(f, 4), "bwd_ms": round(fb - f, 4)}
                if len(ms) != 2:
                    continue  # a path failed or was not measured: no rule, the default applies
                rules.append(
                    dict(
                        gated=gated,
                        max_tokens=tb,
                        max_d_model=db,
                        fwd=min(ms, key=lambda p: ms[p]["fwd_ms"]),
                        bwd=min(ms, key=lambda p: ms[p]["bwd_ms"]),
                        measured=f"T{tok} D{dm} {dtype}",
                        ms=ms,
                    )
                )
    return rules


def write_dispatch(path: str, rows: list[dict], command: str) -> None:
    """Adds this device's rules to the table file at ``path`` (the format of
    pyfastattn/ffn_cuda_dispatch.py), keeping other devices' entries."""
    import pprint

    from pyfastattn.ffn_cuda_dispatch import TABLE

    table = dict(TABLE)
    if os.path.exists(path):
        ns: dict = {}
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), ns)  # our own generated file
        table.update(ns.get("TABLE", {}))
    table[torch.cuda.get_device_name()] = {
        "command": command,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rules": dispatch_rules(rows),
    }
    doc = _ffn_cuda_dispatch_doc()
    with open(path, "w") as f:
        f.write(doc + "\nTABLE: dict = " + pprint.pformat(table, width=110, sort_dicts=False) + "\n")


def _ffn_cuda_dispatch_doc() -> str:
    import pyfastattn.ffn_cuda_dispatch as m

    return '"""' + m.__doc__ + '"""\n'


def print_table(rows: list[dict]) -> None:
    bench_common.print_table(rows, COLUMNS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_common_args(ap)
    ap.add_argument(
        "--tokens", default=None, help="comma list of token counts replacing the grid's (e.g. 16,512,8192)"
    )
    ap.add_argument(
        "--dmodel", default=None, help="comma list of d_model values replacing the grid's (e.g. 1024,4096)"
    )
    ap.add_argument(
        "--write-dispatch",
        default=None,
        metavar="PATH",
        help="CUDA: time both CUDA paths and write the dispatch table to PATH "
        "(e.g. pyfastattn/ffn_cuda_dispatch.py); times only the two paths and eager",
    )
    args = ap.parse_args(argv)
    load = bench_common.LoadWatch()
    device = args.device if args.device != "auto" else ("cuda" if bench_common.cuda_available() else "cpu")
    threads = args.threads or torch.get_num_threads()
    default_dtypes = "float32,bfloat16" if device == "cpu" else "bfloat16,float16"
    if args.smoke:
        default_dtypes = default_dtypes.split(",")[0]
    dtypes = (args.dtype or default_dtypes).split(",")
    t0 = time.time()
    ints = lambda v: [int(t) for t in v.split(",")] if v else None  # noqa: E731
    if args.write_dispatch and device != "cuda":
        ap.error("--write-dispatch needs --device cuda")
    dev = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {threads} threads"
    out_dir = bench_common.out_dir_for(args, bench_common.device_name(device), "ffn-bench")
    bench_common.prepare_out_dir(out_dir, args.record)
    print(f"ffn benchmark ({bench_common.mode_name(args)}, {dev}): results go to {out_dir}", flush=True)
    rows = run(
        device,
        [d.strip() for d in dtypes],
        not args.full,
        threads,
        ints(args.tokens),
        ints(args.dmodel),
        dispatch_only=bool(args.write_dispatch),
        smoke=args.smoke,
    )
    load.stop()
    print(f"\nffn benchmark: {dev}; torch {torch.__version__}; {time.time() - t0:.0f} s")
    print(bench_common.command_line("benchmarks/ffn_bench.py", argv))
    print_table(rows)
    if args.write_dispatch:
        write_dispatch(args.write_dispatch, rows, "python benchmarks/ffn_bench.py " + " ".join(argv))
        print(f"dispatch table for {dev} written to {args.write_dispatch}")
    bench_common.write_csv(os.path.join(out_dir, "ffn_results.csv"), rows, FIELDS)
    print(f"\nwrote {os.path.join(out_dir, 'ffn_results.csv')}")
    for w in bench_common.noise_warnings(rows, load, threads if device == "cpu" else None):
        print(f"WARNING: {w}")
    return 1 if any(r["status"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
