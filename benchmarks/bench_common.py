"""What run.py and ffn_bench.py share: the environment, timing, memory and
bandwidth measurements, and the output files (CSV, summary, markdown, PNGs).

Rows are plain dicts. Keys every suite fills: provider, suite, shape, pass,
dtype, status ("ok", "FAIL (...)", "unsupported: ...", "unavailable: ..."),
and for "ok" rows p20_ms/p50_ms/p80_ms, tflops, gbps, peak_mem_mib. ``seqlen``
(the x axis of the plots) and ``variant`` (the rest of the shape: one subplot
each) place a row in the plots.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch.utils.benchmark imports torch.utils.cpp_extension, which logs "No CUDA
# runtime is found" on a CUDA build of torch without a GPU: noise for a benchmark.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# Providers that are pyfastattn itself or a floor, not a baseline to beat.
NOT_BASELINES = ("pyfastattn", "GEMM floor")


def is_baseline(provider: str) -> bool:
    return not provider.startswith(NOT_BASELINES)


# ---------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model string from /proc/cpuinfo."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# AMD's CPU family numbers (cpuid leaf 1, as /proc/cpuinfo prints them): 23 =
# 17h, 25 = 19h, 26 = 1Ah. 19h spans two generations (Zen 4 halved the FMA
# width per clock of its AVX-512 against Zen 5's full datapath: what a
# peak means depends on it), so the model number is reported beside it.
AMD_FAMILIES = {23: "Zen 1/Zen 2", 25: "Zen 3/Zen 4", 26: "Zen 5"}


def cpu_identity() -> str:
    """'family 26 model 2 = AMD Zen 5, avx512f avx512_bf16' from /proc/cpuinfo:
    what the model name alone does not say in a VM ('AMD EPYC')."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, val = line.partition(":")
                info[key.strip()] = val.strip()
    except OSError:
        return platform.machine() or "cpu"
    parts = []
    if "cpu family" in info:
        fam = int(info["cpu family"])
        name = AMD_FAMILIES.get(fam) if info.get("vendor_id") == "AuthenticAMD" else None
        parts.append(f"family {fam} model {info.get('model', '?')}" + (f" = AMD {name}" if name else ""))
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in flags]
    if isa:
        parts.append(" ".join(isa))
    return ", ".join(parts) or (platform.machine() or "cpu")


def sanitize(name: str) -> str:
    """A directory name from a device name: 'NVIDIA H200' -> 'NVIDIA-H200'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-.") or "unknown"


def git_sha() -> str:
    """Short sha of the tree that ran, '+dirty' when it had uncommitted changes
    (outside benchmarks/results, which a run itself rewrites)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except Exception:
        return "unknown"


def environment(device: str, threads: int) -> dict:
    """The columns every CSV row carries."""
    return dict(
        device=device_name(device),
        cpu=cpu_identity(),
        threads=threads if device == "cpu" else "",
        torch=torch.__version__,
        cuda=torch.version.cuda or "",
        sha=git_sha(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def command_line(script: str, argv: list[str]) -> str:
    return shlex.join(["python", script, *argv])


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def pct(xs, p):
    """The p-th percentile (nearest rank) of xs."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


SPREAD_WARN = 0.10  # (p80 - p20) / p50 above this: the row is flagged as noisy


def spread(times: list[float]) -> float:
    """(p80 - p20) / p50 of a list of timings: the relative spread reported
    beside every median and the stopping rule of the adaptive timers."""
    if len(times) < 2:
        return float("nan")
    return (pct(times, 80) - pct(times, 20)) / statistics.median(times)


def print_infer_train_round(r: int, infer_ms: tuple[float, float], train_ms: tuple[float, float]) -> None:
    """One round of an A/B of a model as it is (first) and with pyfastattn
    (second): inference and training step in ms, their ratios and the load
    (benchmarks/patched_encoder.py, override_sdpa_model.py)."""
    (ie, io), (te, to) = infer_ms, train_ms
    print(
        f"round {r + 1}: inference {ie:8.1f} -> {io:8.1f} ms ({ie / io:.2f}x)   "
        f"training step {te:8.1f} -> {to:8.1f} ms ({te / to:.2f}x)   load {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def median_pass_us(fns, timer, reps: int = 7) -> float:
    """Microseconds per call: the median over ``reps`` passes of one call of
    each of ``fns`` in turn. The cold/hot decode benchmarks pass one call per
    "layer" (distinct K/V, read from memory as a decode step reads them) or
    one layer's call repeated (read from cache). ``timer``: time.thread_time
    on one thread (CPU time), time.perf_counter on more."""
    res = []
    for _ in range(reps):
        a = timer()
        for f in fns:
            f()
        res.append((timer() - a) / len(fns) * 1e6)
    return statistics.median(res)


def time_cpu(
    fn,
    threads: int,
    min_run_time: float,
    max_run_time: float | None = None,
    warmup: bool = True,
    min_samples: int = 5,
    threshold: float = SPREAD_WARN,
) -> list[float]:
    """ms per call, by adaptive repetition: torch.utils.benchmark's Timer at an
    explicit thread count, samples of >= 1 ms of calls each (blocks of calls
    for fast ones), repeated until there are ``min_samples`` of them, at least
    ``min_run_time`` s were spent and their spread ((p80 - p20) / p50) is at
    most ``threshold``, or until ``max_run_time`` s (default 5x min_run_time)
    are spent. Noise on a busy machine thus buys more samples, within a bound,
    and what is left of it shows in the spread. A warm-up call first (unless
    the caller just made one)."""
    from torch.utils import benchmark

    if max_run_time is None:
        max_run_time = 5 * min_run_time
    if warmup:
        fn()
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    first = t.timeit(1).times[0]
    number = max(1, min(1000, int(1e-3 / max(first, 1e-7))))
    times = [first] if number == 1 else []
    spent = first
    while True:
        if len(times) >= min_samples and (
            spent >= max_run_time or (spent >= min_run_time and spread(times) <= threshold)
        ):
            break
        x = t.timeit(number).times[0]
        times.append(x)
        spent += x * number
    return [x * 1e3 for x in times]


def l2_bytes() -> int:
    """L2 size of the current CUDA device (50 MiB on an H100 if unknown)."""
    return int(
        getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    ) or (50 << 20)


def rotation_sets(set_bytes: int, max_sets: int = 8, max_total: int = 8 << 30) -> int:
    """How many input sets to rotate over on CUDA so that together they are
    larger than twice the L2: each timed call then reads its inputs from HBM."""
    need = math.ceil(2 * l2_bytes() / max(set_bytes, 1)) + 1
    return max(2, min(need, max_sets, max(1, max_total // max(set_bytes, 1))))


def time_cuda(fns, budget_s: float, min_reps: int = 10, max_reps: int = 200) -> list[float]:
    """ms per call from CUDA events around each call, calls rotating over
    ``fns`` (one per input set). Warm-up: every fn twice. The number of calls
    fills ``budget_s`` (from a synchronised estimate), within [min, max]."""
    for _ in range(2):
        for f in fns:
            f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for f in fns:
        f()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / len(fns)
    reps = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-6))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (a, b) in enumerate(ev):
        a.record()
        fns[i % len(fns)]()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def stats(times: list[float]) -> dict:
    """p20/p50/p80 in ms, the spread ((p80 - p20) / p50) and the sample count."""
    return dict(
        p20_ms=pct(times, 20),
        p50_ms=statistics.median(times),
        p80_ms=pct(times, 80),
        spread=spread(times),
        samples=len(times),
    )


def add_common_args(ap) -> None:
    """The flags run.py and ffn_bench.py share: --device, --dtype,
    --quick/--full/--smoke, --threads, --out, --record."""
    ap.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to run; auto: cuda when a GPU is visible, else cpu (default: auto)",
    )
    ap.add_argument(
        "--dtype",
        default=None,
        help="comma list of dtypes, e.g. float32,bfloat16 (default: float32,bfloat16 on CPU; "
        "on CUDA bfloat16,float16, or bfloat16 alone for run.py --quick; --smoke: the first of these)",
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument(
        "--quick",
        action="store_true",
        default=True,
        help="the default: a grid with >= 4 sizes per curve and short adaptive timing "
        "(run.py, all suites: sized for about 2 minutes on 2 idle CPU cores)",
    )
    g.add_argument("--full", action="store_true", help="the whole grid, longer timing (tens of minutes)")
    g.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes and minimal timing: checks that everything runs (seconds); numbers mean nothing",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads to time with (default: torch's, i.e. the cores)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="output directory (default: benchmarks/results/local/<date-time>-<mode>-<suite>/, "
        "not tracked by git; the path is printed)",
    )
    ap.add_argument(
        "--record",
        action="store_true",
        help="write the results of record for this device instead, "
        "benchmarks/results/<device>/<mode>-<suite>/, replacing what is there; commit them on purpose",
    )


def mode_name(args) -> str:
    return "smoke" if getattr(args, "smoke", False) else ("full" if args.full else "quick")


def out_dir_for(args, device_label: str, suite: str, stamp: str | None = None) -> str:
    """Where a run writes: --out, else (with --record) the committed results of
    record for this device, else a new folder under benchmarks/results/local/."""
    if args.out and args.record:
        raise SystemExit("--out and --record exclude each other: --record writes the results of record")
    if args.out:
        return os.path.abspath(args.out)
    mode = mode_name(args)
    if args.record:
        return os.path.join(ROOT, "benchmarks", "results", sanitize(device_label), f"{mode}-{suite}")
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(ROOT, "benchmarks", "results", "local", f"{stamp}-{mode}-{suite}")


OUTPUT_SUFFIXES = (".csv", ".md", ".png", ".log")


def prepare_out_dir(path: str, record: bool) -> None:
    """Create the folder; for --record, first delete the files an earlier run
    left there (CSV, markdown, PNG, logs), so nothing stale sits beside the
    new results. Other folders are never emptied: a user's --out keeps its files."""
    os.makedirs(path, exist_ok=True)
    if record:
        for name in os.listdir(path):
            if name.endswith(OUTPUT_SUFFIXES) and os.path.isfile(os.path.join(path, name)):
                os.unlink(os.path.join(path, name))


# ---------------------------------------------------------------------------
# a quiet console and the machine's load
# ---------------------------------------------------------------------------


def cuda_available() -> bool:
    """torch.cuda.is_available() without the 'CUDA initialization' warning a
    CUDA build of torch prints on a machine without a GPU."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


# Lines of native stderr dropped around profiled calls: Kineto's probe lines, its
# CUDA device query failing on a CUDA build of torch without a GPU, and the
# profiler's note that a tensor allocated before it started was freed during the
# call (the peak is measured above what was allocated before the call anyway).
NATIVE_NOISE = re.compile(
    r"^USDT:|gpuGetDeviceCount failed|Memory block of unknown size was allocated before the profiling started"
)


@contextlib.contextmanager
def quiet_native_stderr(drop: re.Pattern = NATIVE_NOISE):
    """Run a block with the process's native stderr (fd 2) captured, then
    write back every line but those matching ``drop``: torch.profiler's
    Kineto prints a 'USDT: ... profiler_start/stop' pair per profiled call
    from C++ (and, on a CUDA torch without a GPU, 'gpuGetDeviceCount failed'),
    which Python's sys.stderr cannot filter."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real fd (e.g. pytest capture): nothing to hide
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True) if not drop.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class LoadWatch:
    """Samples the 1-minute load average every few seconds in a daemon thread
    (Linux/macOS), so that a run can say whether the machine was busy."""

    def __init__(self, period_s: float = 2.0):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        if hasattr(os, "getloadavg"):
            self.samples.append(os.getloadavg()[0])
            self._thread.start()

    def _run(self):
        while not self._stop.wait(self._period):
            self.samples.append(os.getloadavg()[0])

    def stop(self):
        self._stop.set()

    @property
    def start(self) -> float:
        return self.samples[0] if self.samples else float("nan")

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    @property
    def now(self) -> float:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def noise_warnings(rows: list[dict], load: LoadWatch | None, threads: int | None) -> list[str]:
    """Why this run's verdicts may not hold: a busy machine (1-minute load
    average above the thread count) or rows whose spread exceeds 10%."""
    out = []
    if load is not None and threads and load.samples and load.max > threads:
        out.append(
            f"the machine was busy: 1-minute load average up to {load.max:.2f} (start {load.start:.2f}) "
            f"with {threads} benchmark threads; other work shares the cores, so timings are noisy and "
            "ratios may flip between runs: rerun on an idle machine before believing a verdict"
        )
    noisy = [r for r in rows if r.get("status") == "ok" and (r.get("spread") or 0) > SPREAD_WARN]
    if noisy:
        worst = sorted(noisy, key=lambda r: -r["spread"])[:3]
        out.append(
            f"{len(noisy)} of {sum(r.get('status') == 'ok' for r in rows)} timed rows have a spread "
            f"(p80 - p20) / p50 above {SPREAD_WARN:.0%}, e.g. "
            + "; ".join(f"{r['provider']} {r['shape']} {r['dtype']} {r['spread']:.0%}" for r in worst)
        )
    return out


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------

PEAK_MEMORY_METHOD = {
    "cuda": "peak bytes allocated by PyTorch's CUDA caching allocator during one call "
    "(torch.cuda.max_memory_allocated), above what was allocated before it",
    "cpu": "peak bytes held through PyTorch's CPU allocator (every tensor, inputs excluded) during "
    "one call, above what was allocated before it, from torch.profiler's memory events "
    "(profile_memory=True). Scratch a C++ kernel takes outside that allocator (operator new, "
    "std::vector: e.g. pyfastattn's per-thread tile arena, oneDNN's internal buffers) is not counted. "
    "The FFN's per-thread scratch (PYFASTATTN_CPU_FFN_SCRATCH_MB) is switched off for this call, so "
    "the temporaries it would hold between calls are counted as fresh allocations",
}


@contextlib.contextmanager
def _ffn_scratch_off():
    """pyfastattn's CPU FFN keeps its [tokens, d_ff] temporaries in a per-thread
    buffer held between calls (csrc/ffn/ffn_ops.cpp), which a peak measured
    above the memory held before the call would miss. The cap is read on every
    call; 0 frees the buffer and allocates the temporaries afresh."""
    key = "PYFASTATTN_CPU_FFN_SCRATCH_MB"
    old = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def peak_mib(fn, device: str) -> float:
    """Peak MiB allocated during one call of fn, above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with (
        _ffn_scratch_off(),
        quiet_native_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    # "Total Allocated" is the allocator's running total after each (de)allocation.
    mem = sorted(
        (e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    )
    if not mem:
        return 0.0
    start = mem[0][1] - mem[0][2]
    return max(0, max(m[1] for m in mem) - start) / 2**20


# ---------------------------------------------------------------------------
# roofs measured in the same run
# ---------------------------------------------------------------------------


def matmul_ceiling(device: str, dtype: torch.dtype, threads: int, quick: bool, smoke: bool = False) -> float:
    """TFLOP/s of torch.matmul on square matrices, the best over a few sizes:
    the roof for 'fraction of ceiling'. A kernel can beat it (it is what torch
    reaches, not the hardware's peak)."""
    if smoke:
        sizes = [256]
    else:
        sizes = ([1024, 2048] if quick else [1024, 2048, 4096]) if device == "cpu" else [4096, 8192]
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        if device == "cpu":
            ms = statistics.median(
                time_cpu(lambda a=a, b=b: a @ b, threads, 0.01 if smoke else 0.3 if quick else 1.0)
            )
        else:
            ms = statistics.median(time_cuda([lambda a=a, b=b: a @ b], 0.2))
        best = max(best, 2 * n**3 / (ms * 1e-3) / 1e12)
    return best


def _best_rate(call, work: float, samples: int) -> float:
    """work / seconds of ``call()``, the best of ``samples`` timed calls. The
    best, not the median: a probe measures what the hardware can do, and other
    work on the machine only ever subtracts from it."""
    call()  # warm-up: page faults, frequency ramp, lazy initialisation
    best = 0.0
    for _ in range(samples):
        t = time.perf_counter()
        call()
        best = max(best, work / (time.perf_counter() - t))
    return best


def cpu_peak(dtype: torch.dtype, threads: int, quick: bool, smoke: bool = False) -> tuple[float, str]:
    """(TFLOP/s, instruction) of the CPU's vector units on every benchmark
    thread: independent multiply-adds in registers (csrc/cpu/peak_probe.cpp),
    vdpbf16ps for bf16 where the CPU has AVX512_BF16, the fp32 FMA otherwise
    (fp16 data is converted to fp32 by the kernels, so its peak is fp32's).
    The physical roof for 'fraction of peak': no kernel can exceed it."""
    import pyfastattn  # noqa: F401  (loads the extension)

    torch.set_num_threads(threads)
    kind = "bf16_dot" if dtype == torch.bfloat16 else "fp32_fma"
    probe = torch.ops.pyfastattn.cpu_peak_probe
    target = 0.01 if smoke else 0.04 if quick else 0.2
    iters = 1 << 12
    while True:  # calibrate the loop count to about `target` seconds a call
        t = time.perf_counter()
        probe(kind, iters)
        dt = time.perf_counter() - t
        if dt >= target / 4:
            break
        iters *= 4
    iters = max(1, int(iters * target / dt))
    flops = probe(kind, iters)
    best = _best_rate(lambda: probe(kind, iters), flops, 3 if smoke else 5 if quick else 9)
    return best / 1e12, torch.ops.pyfastattn.cpu_peak_probe_isa(kind)


# The read probe's software prefetch distance for its second reader: on Zen 4
# the hardware prefetchers alone read 5-20 % less than with prefetches 16 KB
# ahead (and than torch's buf.sum()), the most in the VM's fast memory state
# (PERF_NOTES.md "Session 13: the read probe").
READ_PROBE_PREFETCH_BYTES = 16384


def read_probe_times(buf: torch.Tensor, reps: int) -> dict[int, list[float]]:
    """Wall seconds of ``reps`` calls of the read probe over ``buf`` with
    torch's threads, without and with READ_PROBE_PREFETCH_BYTES of software
    prefetch: {prefetch_bytes: [seconds, ...]}; the caller picks its
    statistic (a median under load, the best when idle)."""
    import pyfastattn  # noqa: F401

    out = {}
    for pf in (0, READ_PROBE_PREFETCH_BYTES):
        out[pf] = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.ops.pyfastattn.cpu_read_probe(buf, pf)
            out[pf].append(time.perf_counter() - t)
    return out


def cpu_read_bandwidth(threads: int, quick: bool, smoke: bool = False) -> float:
    """GB/s (1e9 B/s) of reading a float32 buffer far larger than the caches
    once, every benchmark thread summing its own slice with vector loads
    (csrc/cpu/peak_probe.cpp), with and without software prefetches, the
    faster of the two: the roof of a memory-bound kernel, which must at least
    read its inputs (decode, small-token FFN)."""
    import pyfastattn  # noqa: F401

    torch.set_num_threads(threads)
    nbytes = (16 << 20) if smoke else (256 << 20) if quick else (1 << 30)
    buf = torch.ones(nbytes // 4)
    read = torch.ops.pyfastattn.cpu_read_probe
    samples = 2 if smoke else 5 if quick else 9
    rates = [
        _best_rate(lambda pf=pf: read(buf, pf), nbytes, samples) for pf in (0, READ_PROBE_PREFETCH_BYTES)
    ]
    return max(rates) / 1e9


def copy_bandwidth(device: str, threads: int, quick: bool, smoke: bool = False) -> float:
    """GB/s (1e9 B/s) of dst.copy_(src) for a tensor far larger than the
    caches, counting the bytes read and the bytes written."""
    nbytes = (16 << 20) if smoke else (256 << 20) if device == "cpu" else (2 << 30)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    if device == "cpu":
        ms = statistics.median(
            time_cpu(lambda: dst.copy_(src), threads, 0.01 if smoke else 0.3 if quick else 1.0)
        )
    else:
        ms = statistics.median(time_cuda([lambda: dst.copy_(src)], 0.2))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def roof_names(device: str) -> tuple[str, str]:
    """What the two roofs are on ``device``: the compute roof and the bandwidth
    roof (run.py measures the physical ones on CPU, torch's on CUDA)."""
    return ("peak", "read bandwidth") if device == "cpu" else ("matmul ceiling", "copy bandwidth")


def add_roofline(row: dict, ceiling_tflops: float, copy_gbps: float) -> None:
    """Fractions of the two roofs, and which one bounds the case: memory when
    its arithmetic intensity (FLOP per byte moved) is below the machine's
    (ceiling / bandwidth)."""
    if row.get("status") != "ok":
        return
    row["frac_ceiling"] = row["tflops"] / ceiling_tflops
    if row.get("gbps"):
        row["frac_copy_bw"] = row["gbps"] / copy_gbps
        intensity = row["tflops"] * 1e3 / row["gbps"]  # FLOP / byte
        row["bound"] = "memory" if intensity < ceiling_tflops * 1e3 / copy_gbps else "compute"


# ---------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------


class Progress:
    """A progress line on stderr: a bar on a terminal, one line per step in a log."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        self._write(label)
        self.done += 1

    def finish(self, label: str = "done") -> None:
        self.done = self.total
        self._write(label)
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _write(self, label: str) -> None:
        width = 30
        n = min(self.done, self.total)
        fill = int(width * n / max(self.total, 1))
        el = time.perf_counter() - self.t0
        eta = f" eta {el / n * (self.total - n):4.0f}s" if 0 < n < self.total else ""
        line = f"[{'#' * fill}{'.' * (width - fill)}] {n}/{self.total} {el:5.0f}s{eta} {label[:70]}"
        if self.tty:
            self.stream.write("\r" + line.ljust(130))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

CSV_FIELDS = [
    "provider",
    "suite",
    "shape",
    "pass",
    "dtype",
    "causal",
    "status",
    "note",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "spread",
    "samples",
    "tflops",
    "frac_ceiling",
    "gbps",
    "frac_copy_bw",
    "bound",
    "thread_scaling",
    "speedup_vs_best",
    "vs_eager",
    "vs_floor",
    "peak_mem_mib",
    "saved_mib",
    "seqlen",
    "device",
    "cpu",
    "threads",
    "torch",
    "cuda",
    "sha",
    "timestamp",
]

SUMMARY_FIELDS = [
    "suite",
    "dtype",
    "shape",
    "pass",
    "pyfastattn_status",
    "pyfastattn_ms",
    "best_baseline",
    "best_baseline_ms",
    "speedup",
]


def write_csv(path: str, rows: list[dict], fields: list[str] = CSV_FIELDS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _key(r: dict) -> tuple:
    return (r["suite"], r["dtype"], r["shape"], r.get("pass", ""))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (suite, dtype, shape, pass): pyfastattn's p50 beside the fastest
    baseline that passed the gate; speedup = baseline ms / pyfastattn ms (> 1:
    pyfastattn is faster). Also sets each ok row's speedup_vs_best."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        base = min((r for r in ok if is_baseline(r["provider"])), key=lambda r: r["p50_ms"], default=None)
        for r in ok:
            r["speedup_vs_best"] = base["p50_ms"] / r["p50_ms"] if base else float("nan")
        ours = next((r for r in rs if r["provider"] == "pyfastattn"), None)
        if ours is None:
            continue
        good = ours["status"] == "ok"
        out.append(
            dict(
                zip(("suite", "dtype", "shape", "pass"), key),
                pyfastattn_status=ours["status"],
                pyfastattn_ms=ours["p50_ms"] if good else "",
                best_baseline=base["provider"] if base else "",
                best_baseline_ms=base["p50_ms"] if base else "",
                speedup=base["p50_ms"] / ours["p50_ms"] if good and base else "",
            )
        )
    return out


def fmt(x, spec: str) -> str:
    if x is None or x == "" or (isinstance(x, float) and math.isnan(x)):
        return ""
    return format(x, spec)


def print_table(rows: list[dict], columns: list[tuple[str, str, int, str]], file=None) -> None:
    """A console table: columns are (key, header, width, format spec or '' for
    str). A row that is not ok prints its status after the text columns."""
    file = file or sys.stdout
    text_cols = [c for c in columns if not c[3]]
    print(" ".join(f"{h:>{w}s}" if s else f"{h:{w}s}" for _, h, w, s in columns), file=file)
    print("-" * sum(w + 1 for *_, w, _ in columns), file=file)
    for r in rows:
        if r["status"] != "ok":
            lead = " ".join(f"{str(r.get(k, '')):{w}s}" for k, _, w, _ in text_cols)
            print(f"{lead} {r['status']}", file=file)
            continue
        print(
            " ".join(
                f"{fmt(r.get(k), s):>{w}s}" if s else f"{str(r.get(k, '')):{w}s}" for k, _, w, s in columns
            ),
            file=file,
        )


def print_summary(summary: list[dict], file=None) -> None:
    file = file or sys.stdout
    print(
        "\nsummary: pyfastattn against the fastest baseline of each shape (speedup > 1: pyfastattn is faster)"
    )
    hdr = f"{'suite':13s} {'dtype':9s} {'shape':40s} {'pass':7s} {'pyfastattn ms':>13s} {'best baseline':28s} {'ms':>9s} {'speedup':>8s}"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for s in summary:
        if s["pyfastattn_status"] != "ok":
            ours = s["pyfastattn_status"][:60]
        else:
            ours = f"{s['pyfastattn_ms']:13.3f}"
        print(
            f"{s['suite']:13s} {s['dtype']:9s} {s['shape']:40s} {s['pass']:7s} {ours:>13s} "
            f"{s['best_baseline'] or '(none passed)':28s} {fmt(s['best_baseline_ms'], '9.3f'):>9s} "
            f"{fmt(s['speedup'], '7.2f') + 'x' if s['speedup'] != '' else '':>8s}",
            file=file,
        )


def _md_table(headers: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(x.replace("|", "/") for x in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def write_markdown(
    path: str,
    title: str,
    command: str,
    header: list[str],
    summary: list[dict],
    rows: list[dict],
    plots: list[str],
    device: str = "cpu",
) -> None:
    """The report: the exact command, the header lines (environment, method,
    roofs), the summary, every row, and the plots. ``device``: "cpu" or
    "cuda", which names the roofs (``roof_names``)."""
    parts = [f"# {title}\n", f"```\n{command}\n```\n", "\n".join(f"- {h}" for h in header) + "\n"]
    parts.append("## Summary: pyfastattn against the fastest baseline\n")
    parts.append("speedup = the baseline's p50 / pyfastattn's p50 (> 1: pyfastattn is faster).\n")
    parts.append(
        _md_table(
            ["suite", "dtype", "shape", "pass", "pyfastattn ms", "best baseline", "ms", "speedup"],
            [
                [
                    s["suite"],
                    s["dtype"],
                    s["shape"],
                    s["pass"],
                    fmt(s["pyfastattn_ms"], ".3f")
                    if s["pyfastattn_status"] == "ok"
                    else s["pyfastattn_status"],
                    s["best_baseline"] or "(none passed)",
                    fmt(s["best_baseline_ms"], ".3f"),
                    (fmt(s["speedup"], ".2f") + "x") if s["speedup"] != "" else "",
                ]
                for s in summary
            ],
        )
    )
    parts.append("## All rows\n")
    lines = []
    for r in rows:
        head = [r["suite"], r["dtype"], r["shape"], r.get("pass", ""), r["provider"]]
        if r["status"] != "ok":
            lines.append(head + [r["status"]] + [""] * 10)
            continue
        lines.append(
            head
            + [
                fmt(r["p50_ms"], ".3f"),
                f"{r['p20_ms']:.3f} / {r['p80_ms']:.3f}",
                fmt(100 * r["spread"], ".0f") + "%" if r.get("spread") is not None else "",
                fmt(r.get("tflops"), ".3f"),
                fmt(100 * r["frac_ceiling"], ".1f") + "%" if r.get("frac_ceiling") is not None else "",
                fmt(r.get("gbps"), ".1f")
                + (f" ({100 * r['frac_copy_bw']:.0f}%)" if r.get("frac_copy_bw") else ""),
                r.get("bound", ""),
                fmt(r.get("thread_scaling"), ".2f"),
                fmt(r.get("peak_mem_mib"), ".1f"),
                fmt(r.get("speedup_vs_best"), ".2f") + ("x" if r.get("speedup_vs_best") is not None else ""),
            ]
            + ([r["note"]] if r.get("note") else [""])
        )
    parts.append(
        _md_table(
            [
                "suite",
                "dtype",
                "shape",
                "pass",
                "provider",
                "p50 ms",
                "p20 / p80 ms",
                "spread",
                "TFLOP/s",
                f"of {roof_names(device)[0]}",
                f"GB/s (of {roof_names(device)[1]})",
                "bound",
                "1 -> N threads",
                "peak MiB",
                "vs best baseline",
                "note",
            ],  # fmt: skip
            lines,
        )
    )
    if plots:
        parts.append("## Plots\n")
        parts += [f"![{os.path.splitext(p)[0]}]({p})\n" for p in plots]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) for n panels with no empty cell: the squarest grid whose
    cells n fills exactly, a single row when n has no such grid (primes > 3)."""
    for cols in range(math.ceil(math.sqrt(n)), n + 1):
        if n % cols == 0 and (cols <= 4 or cols == n):
            return n // cols, cols
    return 1, n


def machine_title(env: dict | None) -> str:
    """'AMD EPYC ..., torch 2.13.0, 2 threads' for a plot's title."""
    if not env:
        return ""
    parts = [env.get("device", "")]
    if env.get("cpu") and env.get("threads"):  # a CPU run
        parts[0] += f" ({env['cpu'].split(',')[0]})"
    if env.get("torch"):
        parts.append(f"torch {env['torch']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else ""))
    if env.get("threads"):
        n = int(env["threads"])
        parts.append(f"{n} thread{'s' if n != 1 else ''}")
    return ", ".join(p for p in parts if p)


def _panels(rows: list[dict]) -> dict[str, list[dict]]:
    panels: dict[str, list[dict]] = {}
    for r in rows:
        panels.setdefault(r.get("variant") or "", []).append(r)
    return panels


def write_plots(
    out_dir: str,
    rows: list[dict],
    ceilings: dict,
    copy_gbps: float,
    env: dict | None = None,
    device: str = "cpu",
) -> tuple[list[str], str | None]:
    """Per (suite, dtype), two PNGs, a panel per variant of the shape (the
    pass, the mask, the head dim), sequence length (tokens for the FFN) on a
    log2 x axis:

    - ``speedup-<suite>-<dtype>.png``: pyfastattn's speedup over each baseline
      (the baseline's p50 / pyfastattn's p50; above the 1.0 line pyfastattn is
      faster), error bars from the p20/p80 of both (baseline p20 / ours p80 to
      baseline p80 / ours p20);
    - ``<suite>-<dtype>.png``: TFLOP/s of every provider against the compute
      roof (GB/s against the bandwidth roof for a memory-bound panel; see
      ``roof_names``),
      error bars from p20/p80.

    Titles carry the machine, torch version and thread count. Returns
    (file names, None) or ([], why the plots were skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        return [], f"matplotlib is not installed ({e}); pip install matplotlib, or the [bench] extra"
    files = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        # decode-kvcache: one context length per run, no curve to draw
        if r["status"] == "ok" and r.get("seqlen") and r["suite"] != "decode-kvcache":
            groups.setdefault((r["suite"], r["dtype"]), []).append(r)
    machine = machine_title(env)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: cycle[i % len(cycle)] for i, p in enumerate(all_providers)}

    def figure(n):
        nr, nc = grid_shape(n)
        fig, axes = plt.subplots(nr, nc, figsize=(5.0 * nc, 3.7 * nr + 0.5), squeeze=False)
        return fig, list(axes.flat)

    def x_axis(ax, xs):
        ax.set_xscale("log", base=2)
        xs = sorted(set(xs))
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)

    def finish(fig, title, name):
        fig.suptitle(title + (f"\n{machine}" if machine else ""), fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=90)
        plt.close(fig)
        files.append(name)

    for (suite, dtype), rs in groups.items():
        panels = _panels(rs)
        xlabel = "tokens" if suite == "ffn" else "sequence length (keys)"

        # speedup over each baseline
        fig, axes = figure(len(panels))
        for ax, (variant, vr) in zip(axes, panels.items()):
            ours = {int(r["seqlen"]): r for r in vr if r["provider"] == "pyfastattn"}
            for prov in dict.fromkeys(r["provider"] for r in vr if is_baseline(r["provider"])):
                pts = []
                for r in vr:
                    o = ours.get(int(r["seqlen"]))
                    if r["provider"] != prov or o is None:
                        continue
                    mid = r["p50_ms"] / o["p50_ms"]
                    lo, hi = r["p20_ms"] / o["p80_ms"], r["p80_ms"] / o["p20_ms"]
                    pts.append((int(r["seqlen"]), mid, max(0.0, mid - lo), max(0.0, hi - mid)))
                if pts:
                    pts.sort()
                    x, y, lo, hi = zip(*pts)
                    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=f"vs {prov}",
                                color=colors[prov])  # fmt: skip
            ax.axhline(1.0, color="black", linewidth=1)
            # log y: a 2x speedup and a 2x slowdown are the same distance from the 1.0 line
            ax.set_yscale("log", base=2)
            lo_y, hi_y = ax.get_ylim()
            ax.set_ylim(min(lo_y, 0.5), max(hi_y, 2.0))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
            x_axis(ax, [int(r["seqlen"]) for r in vr])
            ax.set_title(variant, fontsize=9)
            ax.set_ylabel("speedup (> 1x: pyfastattn faster)", fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        finish(
            fig, f"pyfastattn speedup over each baseline: {suite}, {dtype}", f"speedup-{suite}-{dtype}.png"
        )

        # absolute throughput
        fig, axes = figure(len(panels))
        for ax, (variant, vr) in zip(axes, panels.items()):
            memory = all(r.get("bound") == "memory" for r in vr)
            key, roof, label = (
                ("gbps", copy_gbps, f"GB/s ({roof_names(device)[1]} dashed)")
                if memory
                else ("tflops", ceilings.get(dtype), f"TFLOP/s ({roof_names(device)[0]} dashed)")
            )
            for prov in dict.fromkeys(r["provider"] for r in vr):
                pts = sorted(
                    (int(r["seqlen"]), r[key], r[key] * (1 - r["p50_ms"] / r["p80_ms"]),
                     r[key] * (r["p50_ms"] / r["p20_ms"] - 1))
                    for r in vr
                    if r["provider"] == prov and r.get(key)
                )  # fmt: skip
                if pts:
                    x, y, lo, hi = zip(*pts)
                    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=prov, color=colors[prov])
            if roof:
                ax.axhline(roof, color="gray", linestyle="--", linewidth=1)
            ax.set_ylim(bottom=0)
            x_axis(ax, [int(r["seqlen"]) for r in vr])
            ax.set_title(variant, fontsize=9)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        finish(fig, f"{suite}, {dtype}: throughput of every provider", f"{suite}-{dtype}.png")
    return files, None
